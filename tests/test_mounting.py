"""Ways to mount and unmount: overlay-style options, mount(8), fstab, signals, refresh."""

import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import PYUNION, force_unmount, is_mounted, pyunion, wait_filled


@pytest.fixture
def layers(tmp_path):
    for d in ("l1", "l2", "up", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "l1" / "top").write_text("l1")
    (tmp_path / "l2" / "top").write_text("l2")
    (tmp_path / "l2" / "base").write_text("l2")
    (tmp_path / "l1" / ".wh.gone").write_text("")
    (tmp_path / "l2" / "gone").write_text("hidden by l1")
    yield tmp_path
    if is_mounted(tmp_path / "mnt"):
        subprocess.run(["fusermount3", "-u", "-z", tmp_path / "mnt"])


def _check_union(t, writable=True):
    m = t / "mnt"
    assert sorted(os.listdir(m)) == ["base", "top"]
    assert (m / "top").read_text() == "l1"
    if writable:
        (m / "base").write_text("changed")
        assert (t / "up" / "base").read_text() == "changed"
        assert (t / "l2" / "base").read_text() == "l2"


def _overlay_opts(t):
    return f"lowerdir={t}/l1:{t}/l2,upperdir={t}/up,workdir={t}/work"


def test_containers_storage_form(layers):
    r = pyunion("-o", _overlay_opts(layers), layers / "mnt")
    assert r.returncode == 0, r.stderr
    _check_union(layers)
    (layers / "mnt" / "new").write_text("n")
    assert os.listdir(layers / "work" / "pyunion") == []  # the work area lives in workdir
    assert not (layers / "up" / ".wh..wh.pyunion").exists()
    assert pyunion("umount", layers / "mnt").returncode == 0


def test_mount_t_fuse_pyunion(layers):
    assert os.path.exists("/usr/local/bin/pyunion"), "run .ci/setup: mount(8) needs pyunion on its PATH"
    r = subprocess.run(["mount", "-t", "fuse.pyunion", "none", layers / "mnt", "-o", _overlay_opts(layers)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fuse.pyunion" in open("/proc/self/mounts").read()
    _check_union(layers)
    subprocess.run(["umount", layers / "mnt"], check=True)
    assert not is_mounted(layers / "mnt")


def test_fstab_line(layers):
    fstab = layers / "fstab"
    fstab.write_text(f"none {layers}/mnt fuse.pyunion {_overlay_opts(layers)},nodev,noauto 0 0\n")
    r = subprocess.run(["mount", "-T", fstab, layers / "mnt"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_union(layers)
    subprocess.run(["umount", layers / "mnt"], check=True)


def test_lowerdir_alone_is_read_only(layers):
    r = pyunion("-o", f"lowerdir={layers}/l1:{layers}/l2", layers / "mnt")
    assert r.returncode == 0, r.stderr
    _check_union(layers, writable=False)
    with pytest.raises(OSError):
        (layers / "mnt" / "x").write_text("no")
    assert pyunion("umount", layers / "mnt").returncode == 0


def test_unknown_overlay_option_warns_once(layers):
    r = pyunion("-o", _overlay_opts(layers) + ",index=on,xino=auto", layers / "mnt")
    assert r.returncode == 0
    assert r.stderr.strip() == "pyunion: ignoring unknown option(s): index=on,xino=auto"
    assert pyunion("umount", layers / "mnt").returncode == 0


def test_sigterm_unmounts_cleanly(union):
    union.mount()
    pid = union.daemon_pid()
    (union / "f").write_text("x")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while is_mounted(union.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(union.mnt)
    assert (union["up"] / "f").read_text() == "x"
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}/cmdline") and \
            open(f"/proc/{pid}/cmdline").read():
        time.sleep(0.05)
    assert not (union["up"] / ".wh..wh.pyunion").exists()


def test_sigterm_right_after_mounting_unmounts_cleanly(union):
    """A stop signal that comes as the mount returns, before the daemon's loop listens for
    signals, still unmounts cleanly (it used to kill the daemon, leaving a dead mount)."""
    (union["low"] / "f").write_text("x")
    for _ in range(5):
        union.mount()
        pid = union.daemon_pid()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while is_mounted(union.mnt) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not is_mounted(union.mnt)
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}/cmdline") and \
                open(f"/proc/{pid}/cmdline").read():  # (until it exits: a zombie has none)
            time.sleep(0.02)
        log = union.log.read_text()
        assert log.count("unionfs: unmounted ") == log.count("unionfs: mounted ")
    assert os.listdir(union["up"]) == []


def test_umount_right_after_mounting_finds_the_mount_free(union):
    """`pyunion mount` returns once the daemon's start-up probe is done with the mount, so a
    plain umount(8) right after it never finds the mount busy (it did, now and then: the
    probe held a directory of the mount open)."""
    d = union["low"]
    for i in range(8):
        d = d / f"d{i}"  # (the probe looks through directories for a file to open)
    d.mkdir(parents=True)
    (d / "f").write_text("x")
    for delay in range(12):
        union.mount()
        time.sleep(delay / 1000)
        r = subprocess.run(["umount", union.mnt], capture_output=True, text=True)
        assert r.returncode == 0, f"{delay} ms after mounting: {r.stderr.strip()}"
        assert not is_mounted(union.mnt)


def test_foreground_mode(union):
    (union["low"] / "f").write_text("fg")
    proc = subprocess.Popen([*PYUNION, "mount", "-f", "-o", f"logfile={union.log}", union.spec, union.mnt])
    try:
        deadline = time.monotonic() + 10
        while not is_mounted(union.mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (union / "f").read_text() == "fg"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not is_mounted(union.mnt)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_refresh_sees_direct_branch_edits(union):
    (union["low"] / "old").write_text("1")
    union.mount()
    assert os.listdir(union.mnt) == ["old"]
    assert not (union / "later").exists()  # now cached as absent
    (union["low"] / "later").write_text("2")
    (union["low"] / "old").write_text("changed directly")
    r = pyunion("refresh", union.mnt)
    assert r.returncode == 0, r.stderr
    assert (union / "later").read_text() == "2"
    assert (union / "old").read_text() == "changed directly"
    assert sorted(os.listdir(union.mnt)) == ["later", "old"]


def test_short_timeouts_see_data_changed_directly(union):
    """-o timeout=1: data changed in a branch directly shows once the attributes expire (the
    kernel drops a file's cached data when the mtime it fetches again has moved)."""
    p = union["low"] / "f"
    p.write_text("first")
    union.mount("timeout=1")
    assert (union / "f").read_text() == "first"
    p.write_text("again")  # (the same size)
    os.utime(p, ns=(0, 3_000_000_000))
    time.sleep(1.5)
    assert (union / "f").read_text() == "again"


def test_data_written_through_the_mount_stays_cached(union):
    """With the default day-long cache, what was written through the mount is read back
    from the kernel's cache, also after the kernel fetched the file's attributes again
    (SQLite stats its database after each commit)."""
    union.mount(debug=True)
    data = os.urandom(8192)
    with open(union / "g", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    os.stat(union / "g")
    reads = union.requests().count("read")
    assert (union / "g").read_bytes() == data
    assert union.requests().count("read") == reads


def test_second_mount_of_a_writable_branch_is_refused(union, make_union):
    from unionfs.layers import branch_in_use

    union.mount()
    assert branch_in_use(union["up"])
    other = make_union(name="other")
    other.branches = [("../u/up", "rw")]
    r = pyunion("mount", union["up"], other.mnt)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"pyunion: branch {union['up']}: in use by another pyunion mount"]
    assert not is_mounted(other.mnt)
    union.umount()
    assert not branch_in_use(union["up"])


def test_debug_flag_logs_every_request(union):
    (union["low"] / "f").write_text("x")  # (the mount opens a file like this one: see show_no_open)
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "e").write_text("x")
    r = pyunion("mount", "-d", "-o", f"logfile={union.log}", union.spec, union.mnt)
    assert r.returncode == 0, r.stderr
    (union / "d" / "e").read_text()
    (union / "g").write_bytes(b"y" * 4096)
    union.umount()
    log = union.log.read_text()
    assert re.search(r"lookup\(\d+, b'e'\)", log)
    for request in ("read(", "create(1, b'g'", "write("):
        assert request in log, request
    assert "<4096 bytes>" in log


@pytest.mark.parametrize("opens", [False, True])
def test_created_files_get_no_release(union, opens):
    """The daemon opens a file through the mount as it starts, so the kernel learns that it
    needs no OPEN, and then sends no RELEASE for created files either (unless -o opens)."""
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("lower")
    union.mount(*(["opens"] if opens else []), debug=True)
    deadline = time.monotonic() + 5
    while not opens and "open" not in union.requests() and time.monotonic() < deadline:
        time.sleep(0.05)  # (the daemon's probe opens it as the mount starts)
    for i in range(20):
        (union / f"new{i}").write_text("x")
    union.umount()
    requests = union.requests()
    assert requests.count("create") == 20
    if opens:
        assert requests.count("release") >= 20
    else:
        assert requests.count("open") == 1 and "release" not in requests
    assert sorted(p.name for p in union["up"].iterdir()) == sorted(f"new{i}" for i in range(20))
    assert os.listdir(union["low"]) == ["d"]


def test_daemon_sends_no_request_to_its_own_mount(union):
    """What the daemon asks of its own mount as it starts (the probe's OPEN; the read-ahead's
    device number) comes from a child process or from mountinfo, never from one of its threads:
    a thread waiting on a request the daemon has read keeps /dev/fuse open after a SIGKILL, and
    the killed daemon and its mount then hang for good."""
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("lower")
    union.mount(debug=True)
    daemon = union.daemon_pid()
    deadline = time.monotonic() + 5
    while "open" not in union.requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    callers = {int(pid) for pid in re.findall(r"unionfs\.session: \w+\(.*\) from pid (\d+)$",
                                               union.log.read_text(), re.M)}
    assert "open" in union.requests() and callers
    # (a thread that sent one would still be alive: trio keeps idle threads for seconds)
    ours = {int(t) for t in os.listdir(f"/proc/{daemon}/task")}
    assert not callers & ours, f"requests from the daemon's own threads {callers & ours}"
    if os.geteuid() == 0:
        st = os.stat(union.mnt)
        ahead = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        assert open(ahead).read().strip() == "1024"
    os.kill(daemon, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{daemon}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{daemon}"), "the killed daemon did not go away"
    force_unmount(union.mnt)
    assert not is_mounted(union.mnt)
    assert (union["low"] / "d" / "f").read_text() == "lower"
    union.check_log()
    union.log.unlink()  # (a killed daemon logs no "unmounted": the fixture need not wait for it)


def test_umount_of_a_stopped_daemon(union):
    """A daemon that answers nothing (here: stopped) does not hang `pyunion umount`: the daemon
    is found from /proc, not asked; the mount goes at once, and the daemon exits once continued."""
    (union["low"] / "f").write_text("lower")
    union.mount(debug=True)
    (union / "f").write_text("upper")
    daemon = union.daemon_pid()
    deadline = time.monotonic() + 5
    while _children(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)  # (the probe: while it waits on the mount, the mount is busy)
    os.kill(daemon, signal.SIGSTOP)
    try:
        r = pyunion("umount", union.mnt, timeout=30)
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"pyunion: the daemon (pid {daemon}) is stopped; it exits once continued\n"
    assert not is_mounted(union.mnt)
    deadline = time.monotonic() + 10
    while "unmounted" not in union.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "unmounted" in union.log.read_text()
    assert (union["up"] / "f").read_text() == "upper"
    assert (union["low"] / "f").read_text() == "lower"


def _children(pid: int) -> list[str]:
    return [c for t in os.listdir(f"/proc/{pid}/task")
            for c in open(f"/proc/{pid}/task/{t}/children").read().split()]


def test_mount_without_polling(union):
    """-o poll=0: the session sleeps between every two requests, and serves the same."""
    (union["low"] / "f").write_text("lower")
    union.mount("poll=0")
    with open(union / "f", "a") as f:
        f.write("+")
    os.mkdir(union / "d")
    (union / "d" / "g").write_text("new")
    assert sorted(os.listdir(union.mnt)) == ["d", "f"]
    assert (union / "f").read_text() == "lower+"
    assert (union["up"] / "d" / "g").read_text() == "new"
    assert (union["low"] / "f").read_text() == "lower"
    union.umount()


def _cpu_latency_allowed() -> int:
    """The kernel's CPU latency QoS now: the least wake-up latency any request asks for (µs)."""
    fd = os.open("/dev/cpu_dma_latency", os.O_RDONLY)
    try:
        return struct.unpack("=i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


def test_low_latency_holds_its_request_only_while_requests_flow(union):
    """-o lowlatency: while requests come close together the daemon asks the kernel to keep
    idle CPUs awake (latency 0); once they stop it drops that request, so an idle mount
    leaves the machine's power management alone. The union serves the same meanwhile."""
    idle = _cpu_latency_allowed()
    assert idle > 0, "another process holds a CPU latency request"
    (union["low"] / "f").write_text("lower")
    union.mount("lowlatency")
    # (the kernel caches no xattr answers: each query is a request)
    busy = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "end = time.monotonic() + 20\n"
        "while time.monotonic() < end:\n"
        "    try: os.getxattr(sys.argv[1], 'user.absent')\n"
        "    except OSError: pass\n"), str(union / "f")])
    try:
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 0 not in seen:
            seen.append(_cpu_latency_allowed())
            time.sleep(0.01)
        assert 0 in seen, f"no request held while the mount was busy: {seen[-5:]}"
        with open(union / "f", "a") as f:
            f.write("+")
        assert (union / "f").read_text() == "lower+"
    finally:
        busy.kill()
        busy.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _cpu_latency_allowed() != idle:
        time.sleep(0.01)
    assert _cpu_latency_allowed() == idle, "the request outlived the burst"
    assert wait_filled(union["up"]) == [] and (union["up"] / "f").read_text() == "lower+"
    assert (union["low"] / "f").read_text() == "lower"
    union.umount()
