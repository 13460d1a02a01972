"""The request loop polls on its client's CPU at idle priority (unionfs/colocate.py): it follows
a client from CPU to CPU, stays apart for reads of data and on a machine whose CPUs are all
busy, never sleeps at idle priority, and is left alone where the daemon may not turn back."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import PYUNION, as_user, fuse_for_everyone, pyunion, reachable_by_others

REPO = Path(__file__).resolve().parent.parent

CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")

# a client pinned to one CPU making files: each costs several requests it waits for
CREATE_FILES = r"""
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
d, count = sys.argv[2], int(sys.argv[3])
for i in range(count):
    p = os.path.join(d, f"f{i}")
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"%d\n" % i)
    os.fchmod(fd, 0o600)
    os.close(fd)
    os.stat(p)
"""
READ_FILE = r"""
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
with open(sys.argv[2], "rb", buffering=0) as f:
    while f.read(1 << 16):
        pass
"""


class Watch(threading.Thread):
    """Samples the CPU and scheduling policy of the daemon's request loop (its main thread)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[int, int]] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.002):
            try:
                with open(f"/proc/{self.pid}/stat", "rb") as f:
                    data = f.read()
                policy = os.sched_getscheduler(self.pid)
            except OSError:
                return
            self.samples.append((int(data[data.rindex(b")") + 2:].split()[36]), policy))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()

    def share_on(self, cpu: int) -> float:
        return sum(c == cpu for c, _ in self.samples) / max(len(self.samples), 1)

    def policies(self) -> set[int]:
        return {p for _, p in self.samples}


def run_client(code: str, cpu: int, *args) -> None:
    subprocess.run([sys.executable, "-c", code, str(cpu), *map(str, args)], check=True, timeout=300)


def settled_policy(pid: int) -> int:
    """The loop's policy once its poll window is over and it sleeps."""
    time.sleep(0.5)
    return os.sched_getscheduler(pid)


@needs_two_cpus
def test_loop_follows_its_client_from_cpu_to_cpu(make_union):
    u = make_union(("rw", "rw"), ("low", "ro"))
    (u["low"] / "kept").write_bytes(b"lower")
    u.mount()
    pid = u.daemon_pid()
    for cpu in (CPUS[1], CPUS[0]):
        # (the loop stays apart while the machine is busy, as with earlier tests' writeback:
        # settle it first, and give it three tries)
        os.sync()
        shares = []
        for attempt in range(3):
            d = f"on{cpu}-{attempt}"
            (u / d).mkdir()
            with Watch(pid) as watch:
                run_client(CREATE_FILES, cpu, u / d, 3000)
            assert settled_policy(pid) == os.SCHED_OTHER  # never sleeps at idle priority
            assert sorted(os.listdir(u["rw"] / d), key=lambda n: int(n[1:])) == \
                [f"f{i}" for i in range(3000)]
            assert (u / d / "f2999").read_bytes() == b"2999\n"
            assert os.stat(u["rw"] / d / "f7").st_mode & 0o777 == 0o600
            assert len(watch.samples) > 20
            shares.append(watch.share_on(cpu))
            if shares[-1] > 0.7 and os.SCHED_IDLE in watch.policies():  # (polling between requests)
                break
        else:
            pytest.fail(f"the loop did not follow its client to CPU {cpu}: {shares}")
    assert sorted(os.listdir(u["low"])) == ["kept"] and (u["low"] / "kept").read_bytes() == b"lower"
    u.umount()
    u.check_log()


@needs_two_cpus
def test_reading_data_keeps_the_loop_apart(make_union):
    """A client reading a big file has work of its own after each reply: the loop does not
    share its CPU (see colocate.READS_APART)."""
    u = make_union(("rw", "rw"), ("low", "ro"))
    data = os.urandom(1 << 20) * 96
    (u["low"] / "big").write_bytes(data)
    u.mount()
    pid = u.daemon_pid()
    with Watch(pid) as watch:
        run_client(READ_FILE, CPUS[1], u / "big")
    assert len(watch.samples) > 5
    assert os.SCHED_IDLE not in watch.policies()
    assert not os.path.exists(u["rw"] / "big")  # (read, not copied up)
    u.umount()
    u.check_log()


@needs_two_cpus
def test_busy_machine_is_still_served(make_union):
    """With every CPU busy, a SCHED_IDLE loop would hardly run: the loop stays at its own
    priority, and the client's requests are answered as they come."""
    u = make_union(("rw", "rw"), ("low", "ro"))
    u.mount()
    pid = u.daemon_pid()
    hogs = [subprocess.Popen([sys.executable, "-c",
                              f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
            for cpu in CPUS]
    try:
        time.sleep(0.3)
        (u / "d").mkdir()
        start = time.monotonic()
        with Watch(pid) as watch:
            run_client(CREATE_FILES, CPUS[1], u / "d", 1500)
        took = time.monotonic() - start
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    # (a starved loop takes a good part of a second a request; a served one, milliseconds)
    assert took < 120, took
    assert len(os.listdir(u["rw"] / "d")) == 1500
    assert settled_policy(pid) == os.SCHED_OTHER
    assert len(watch.samples) > 0
    u.umount()
    u.check_log()


@needs_two_cpus
@pytest.mark.parametrize("option", ["nocolocate", "lowlatency"])
def test_loop_stays_at_its_own_priority(make_union, option):
    """As asked, or with lowlatency (idle CPUs poll: the client does better beside the loop)."""
    u = make_union(("rw", "rw"), ("low", "ro"), options=[option])
    u.mount()
    (u / "d").mkdir()
    with Watch(u.daemon_pid()) as watch:
        run_client(CREATE_FILES, CPUS[1], u / "d", 1500)
    assert len(watch.samples) > 10 and watch.policies() == {os.SCHED_OTHER}
    assert len(os.listdir(u["rw"] / "d")) == 1500
    u.umount()
    u.check_log()


@pytest.mark.parametrize("options, message", [
    ("colocate,noextras", "option colocate needs pyunion's own session"),
    ("colocate,poll=0", "option colocate moves the daemon's polling"),
])
def test_colocate_usage_errors(tmp_path, options, message):
    for d in ("rw", "low", "mnt"):
        (tmp_path / d).mkdir()
    r = pyunion("mount", "-o", options, f"{tmp_path}/rw:{tmp_path}/low", tmp_path / "mnt")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(tmp_path / "mnt") and os.listdir(tmp_path / "rw") == []


@needs_two_cpus
def test_unprivileged_daemon_is_left_alone(tmp_path, test_user):
    """A plain user's daemon could not turn back from SCHED_IDLE: `colocate` is refused, and
    by default the loop polls at its own priority."""
    uid, gid = test_user
    base = tmp_path / "rootless-colocate"
    for d in ("up", "low", "mnt"):
        (base / d).mkdir(parents=True)
    for p in [base, *base.rglob("*")]:
        os.chown(p, uid, gid)
    branches, mnt = f"{base}/up:{base}/low", f"{base}/mnt"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(base)}

    def refused():
        r = subprocess.run([*PYUNION, "mount", "-o", "colocate", branches, mnt], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 2 and "CAP_SYS_NICE" in r.stderr, r.stderr
        assert not os.path.ismount(mnt)

    def mounted():
        subprocess.run([*PYUNION, "mount", branches, mnt], env=env, check=True)

    def client():  # (only the user reaches the user's mount)
        os.mkdir(f"{mnt}/d")
        run_client(CREATE_FILES, CPUS[1], f"{mnt}/d", 1000)

    def unmounted():
        subprocess.run([*PYUNION, "umount", mnt], env=env, check=True)

    with reachable_by_others(base, REPO), fuse_for_everyone():
        assert as_user(uid, gid, refused) == 0
        assert as_user(uid, gid, mounted) == 0
        try:
            with Watch(_daemon_serving(mnt)) as watch:
                assert as_user(uid, gid, client) == 0
        finally:
            assert as_user(uid, gid, unmounted) == 0
    assert len(watch.samples) > 5 and watch.policies() == {os.SCHED_OTHER}
    assert len(os.listdir(base / "up" / "d")) == 1000


def _daemon_serving(mnt: str) -> int:
    """The pid of the pyunion daemon mounted on MNT (found by its command line)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"mount" in argv and os.fsencode(mnt) in argv:
            return int(entry)
    raise AssertionError(f"no daemon serves {mnt}")
