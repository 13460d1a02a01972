"""Shared fixtures: real pyunion mounts over real branch directories, always unmounted."""

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PYUNION = [sys.executable, "-m", "unionfs"]
# log lines that fail a test unless it says it expects them (S3QL style)
BAD_LOG = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def pyunion(*args, check=False, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run([*PYUNION, *map(str, args)], check=check, **kw)


def is_mounted(path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def force_unmount(path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def tree(root) -> dict:
    """Everything under ROOT, for before/after comparisons: path -> (mode, owner, link count,
    size, mtime, content/target)."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if p.is_symlink():
                data = os.readlink(p)
            elif p.is_file():
                data = p.read_bytes()
            else:
                data = None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
                                             st.st_size, st.st_mtime_ns, data)
    return out


def origin_mark(path) -> bytes | None:
    """The lower path named by the mark of PATH, a metadata-only copy (see unionfs.metacopy);
    None if it is not one."""
    from unionfs.metacopy import MARKER

    try:
        return os.getxattr(path, MARKER, follow_symlinks=False)
    except OSError as e:
        assert e.errno == errno.ENODATA
        return None


def marked(root) -> list[str]:
    """Files under ROOT that are metadata-only copies (see unionfs.metacopy)."""
    from unionfs.metacopy import MARKER

    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and MARKER.decode() in os.listxattr(p):
                found.append(os.path.relpath(p, root))
    return sorted(found)


def wait_filled(root, timeout: float = 10.0) -> list[str]:
    """Wait until the mount's filler gave every metadata-only copy under ROOT its data (see
    unionfs.filler); what is still marked then."""
    deadline = time.monotonic() + timeout
    while (left := marked(root)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def kill_while_writing(union, rel, meanwhile) -> None:
    """Write to the start of REL through the mount (a write that needs the file's data,
    unlike an append: see unionfs.metacopy); once MEANWHILE() returns, SIGKILL the daemon,
    then detach the dead mount."""
    pid = union.daemon_pid()
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(union / rel)!r}, 'r+b').write(b'NEW')"],
                              stderr=subprocess.DEVNULL)
    try:
        meanwhile()
        os.kill(pid, signal.SIGKILL)
        writer.wait(30)
    finally:
        if writer.poll() is None:
            writer.kill()
    force_unmount(union.mnt)


def work_leftovers(work) -> list[str]:
    """What a work area holds but the shared empty file its whiteouts link (see
    Branch.add_empty_file): copies in progress, or left behind."""
    from unionfs.layers import SHARED_EMPTY

    return [n for n in os.listdir(work) if n != os.fsdecode(SHARED_EMPTY)]


class UnionMount:
    """A union of branch directories under a temporary directory, mounted on demand."""

    def __init__(self, base: Path, branches, options=()):
        self.base = base
        self.mnt = base / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.log = base / "daemon.log"
        self.branches = list(branches)  # [(name, mode)]
        self.options = list(options)
        self.expected_log: list[str] = []
        self._extra: tuple[str, ...] = ()
        for name, _ in self.branches:
            (base / name).mkdir(exist_ok=True)

    def __getitem__(self, name) -> Path:
        return self.base / name

    def __truediv__(self, rel) -> Path:
        return self.mnt / rel

    @property
    def spec(self) -> str:
        return ":".join(f"{self.base / n}={m}" for n, m in self.branches)

    def mount(self, *extra_opts, debug=False):
        """Mount with the union's options and EXTRA_OPTS; DEBUG logs every request."""
        self._extra = extra_opts
        opts = ",".join([f"logfile={self.log}", *self.options, *extra_opts])
        r = pyunion("mount", *(["-d"] if debug else []), "-o", opts, self.spec, self.mnt)
        assert r.returncode == 0, r.stderr
        assert is_mounted(self.mnt)
        return self

    def umount(self):
        r = pyunion("umount", self.mnt)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(self.mnt)

    def remount(self):
        """Unmount, and mount again with the same options."""
        self.umount()
        return self.mount(*self._extra)

    def requests(self) -> list[str]:
        """Names of the requests served so far (mounted with debug=True), in order."""
        found = re.findall(r"unionfs\.session: ([a-z_0-9]+)\(", self.log.read_text())
        return found

    def daemon_pid(self) -> int:
        return int(os.getxattr(self.mnt, "pyunion.pid"))

    def check_log(self):
        if not self.log.exists():
            return
        for line in self.log.read_text().splitlines():
            if BAD_LOG.search(line) and not any(e in line for e in self.expected_log):
                pytest.fail(f"unexpected daemon log line: {line}")


@pytest.fixture
def make_union(tmp_path):
    """make_union(("up", "rw"), ("low", "ro+wh"), options=[...]) -> UnionMount (not yet mounted)."""
    mounts = []

    def make(*branches, options=(), name="u", shared=False):
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        if shared:  # other users will use it: let them reach it, and let FUSE let them in
            p = base
            while p != p.parent:
                os.chmod(p, os.stat(p).st_mode | 0o011)
                p = p.parent
            options = [*options, "allow_other"]
        m = UnionMount(base, branches or [("up", "rw"), ("low", "ro+wh")], options)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        if is_mounted(m.mnt):
            r = pyunion("umount", m.mnt)
            if r.returncode != 0 or is_mounted(m.mnt):
                force_unmount(m.mnt)
    for m in mounts:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and m.log.exists() and "unmounted" not in m.log.read_text():
            time.sleep(0.05)
        m.check_log()


@pytest.fixture
def fuse_uring():
    """The fuse module's enable_uring turned on for the test (see unionfs.uring), then back."""
    from unionfs.uring import ENABLE_PARAMETER

    knob = Path(ENABLE_PARAMETER)
    if not knob.exists():
        pytest.skip("this kernel has no FUSE over io_uring (Linux 6.14 or later)")
    old = knob.read_text().strip()
    knob.write_text("Y\n")
    try:
        yield
    finally:
        knob.write_text(f"{old}\n")


@pytest.fixture
def shared_union(make_union):
    """Like union, but reachable by other users (allow_other)."""
    return make_union(shared=True)


@pytest.fixture
def union(make_union):
    """A two-branch union (up=rw over low=ro+wh), not yet mounted: fill the branches, then .mount()."""
    return make_union()


@pytest.fixture
def shared_dir():
    """A world-writable directory an unprivileged user can use (pytest's tmp_path is root-only)."""
    d = tempfile.mkdtemp(prefix="pyunion-rootless-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


TEST_USER = "pyuniontest"


@pytest.fixture(scope="session")
def test_user():
    """An unprivileged user (created if missing): (uid, gid)."""
    import pwd

    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", TEST_USER],
                       check=True, capture_output=True)
        pw = pwd.getpwnam(TEST_USER)
    return pw.pw_uid, pw.pw_gid


@contextlib.contextmanager
def reachable_by_others(*paths):
    """Let other users traverse to PATHS (o+x on every ancestor), restoring the modes after."""
    saved = {}
    for path in paths:
        p = Path(path).resolve()
        for d in [p, *p.parents]:
            if d not in saved:
                mode = os.stat(d).st_mode & 0o7777
                saved[d] = mode
                if mode & 0o001 == 0:
                    os.chmod(d, mode | 0o001)
    try:
        yield
    finally:
        for d, mode in saved.items():
            os.chmod(d, mode)


@contextlib.contextmanager
def fuse_for_everyone():
    """/dev/fuse usable by unprivileged users, as common distributions ship it (0666)."""
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def as_user(uid, gid, fn):
    """Run FN in a child process with the given ids; returns its exit code (0 = FN returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fn()
            code = 0
        except BaseException as e:  # report through the exit code
            print(f"as_user: {e!r}", file=sys.stderr)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
