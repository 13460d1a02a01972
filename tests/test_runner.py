"""`pyunion run` end to end: real namespaces, FUSE union, cgroups, as root and as a plain user."""

import os
import pathlib
import pwd
import re
import select
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSYBOX = "/bin/busybox"
TEST_USER = "pyunion-rt"
TIMEOUT = 120

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the runner tests set up users as root")


# --- fixtures ---------------------------------------------------------------------------


def snapshot(root: str) -> dict:
    """Every path under root with its type, mode, owner and content (for "unchanged" checks)."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.islink(path):
                data = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    data = f.read()
            else:
                data = None
            result[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, data)
    return result


@pytest.fixture(scope="module")
def rootfs():
    """A busybox root filesystem (world-readable, so the unprivileged user can use it too)."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="pyunion-rt-test-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield _build_rootfs(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmp_path():
    """A scratch directory the unprivileged user can reach (pytest's own is private to root)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="pyunion-rt-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _build_rootfs(base: pathlib.Path) -> dict:
    root = base / "rootfs"
    for d in ("bin", "etc", "tmp", "root", "home/user", "run", "var"):
        os.makedirs(root / d)
    os.symlink("/run", root / "var/run")
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "home/user", 1000, 1000)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nuser:x:1000:\n")
    (root / "etc/motd").write_text("image layer\n")
    upper = base / "upper"  # a second read-only layer with a whiteout
    os.makedirs(upper / "etc")
    (upper / "etc/motd").write_text("upper layer\n")
    (upper / "etc/.wh.group").write_text("")
    return {"root": str(root), "upper": str(upper), "base": str(base)}


def _python_for(uid: int) -> list[str]:
    """An interpreter the user can execute, with the repository and its dependencies importable."""
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3"]
    for py in candidates:
        try:
            probe = subprocess.run(
                [py, "-c", "import pyfuse3, trio, xxhash, unionfs"],
                user=uid,
                group=pwd.getpwuid(uid).pw_gid,
                extra_groups=[],
                env=_user_env(uid),
                cwd="/",
                capture_output=True,
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return [py]
    pytest.fail("no Python interpreter usable by the test user")


def _user_env(uid: int) -> dict:
    paths = [REPO, *site.getsitepackages()]
    entry = pwd.getpwuid(uid)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": entry.pw_dir,
        "USER": entry.pw_name,
        "PYTHONPATH": ":".join(paths),
        "LANG": "C.UTF-8",
    }


@pytest.fixture(scope="module")
def plain_user():
    """An unprivileged user with subordinate id ranges, and /dev/fuse usable by it."""
    created = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", TEST_USER], check=True)
        created = True
    entry = pwd.getpwnam(TEST_USER)
    added = []
    for path in ("/etc/subuid", "/etc/subgid"):
        with open(path) as f:
            has = any(line.startswith(TEST_USER + ":") for line in f)
        if not has:
            with open(path, "a") as f:
                f.write(f"{TEST_USER}:300000:65536\n")
            added.append(path)
    fuse_mode = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield entry
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        for path in added:
            with open(path) as f:
                lines = [ln for ln in f if not ln.startswith(TEST_USER + ":")]
            with open(path, "w") as f:
                f.writelines(lines)
        if created:
            remove_user(TEST_USER)


@pytest.fixture(params=["root", "rootless"])
def runner(request, rootfs, tmp_path):
    """A function running `pyunion run ARGS` as root or as the plain user; returns CompletedProcess."""
    if request.param == "root":
        cmd = [sys.executable, "-m", "unionfs", "run"]
        uid, gid, env = 0, 0, dict(os.environ)
    else:
        user = request.getfixturevalue("plain_user")
        uid, gid = user.pw_uid, user.pw_gid
        cmd = [*_python_for(uid), "-m", "unionfs", "run"]
        env = _user_env(uid)
    marker = uuid.uuid4().hex
    env["PYUNION_TEST_MARKER"] = marker
    workspaces = tmp_path / "tmpdir"  # where the runner makes its temporary directories
    os.makedirs(workspaces)
    os.chown(workspaces, uid, gid)
    env["TMPDIR"] = str(workspaces)

    def run(*args, input=None, check_clean=True):
        res = subprocess.run(
            cmd + list(args),
            input=input,
            capture_output=True,
            env=env,
            user=uid,
            group=gid,
            extra_groups=[],
            cwd="/",
            timeout=TIMEOUT,
        )
        if check_clean:
            assert_nothing_left(marker)
            assert os.listdir(workspaces) == []
        return res

    def popen(*args):
        """`pyunion run ARGS` started, not waited for (stdout and stderr piped)."""
        return subprocess.Popen(cmd + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, user=uid, group=gid, extra_groups=[], cwd="/")

    run.popen = popen
    run.mode = request.param
    run.uid = uid
    run.gid = gid
    run.cmd = cmd
    run.env = env
    run.marker = marker
    run.workspaces = workspaces
    yield run
    kill_marked(marker)


def remove_user(name: str) -> None:
    """userdel, after ending whatever the tests left running as that user."""
    uid = pwd.getpwnam(name).pw_uid
    for _ in range(50):
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        if subprocess.run(["userdel", "-r", name], capture_output=True).returncode in (0, 12):
            return
        time.sleep(0.1)


def marked_pids(marker: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(name))
        except OSError:
            pass
    return pids


def kill_marked(marker: str) -> None:
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_nothing_left(marker: str) -> None:
    """No process of the run survives it (the marker is in every runner process's environment)."""
    left = marked_pids(marker)
    assert left == [], f"processes left behind: {left}"
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    assert "pyunion-run-" not in mounts
    assert "pyunion-rt-test-" not in mounts


def lines(data: bytes) -> list[str]:
    return data.decode().splitlines()


# --- basics -----------------------------------------------------------------------------


def test_output_and_exit_status(runner, rootfs):
    res = runner(rootfs["root"], "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert res.returncode == 7
    assert res.stdout == b"out\n"
    assert res.stderr == b"err\n"


def test_killed_by_signal_gives_128_plus_n(runner, rootfs):
    res = runner(rootfs["root"], "--", "sh", "-c", "kill -9 $$")
    assert res.returncode == 137
    assert res.stdout == b""


def test_default_command_is_sh_and_stdin_passes_through(runner, rootfs):
    res = runner(rootfs["root"], input=b"echo from-stdin; cat /etc/motd\n")
    assert res.returncode == 0, res.stderr
    assert lines(res.stdout) == ["from-stdin", "image layer"]
    res = runner(rootfs["root"], "--", "cat", input=b"piped data\n")
    assert res.stdout == b"piped data\n"


def test_layers_are_merged_top_first(runner, rootfs):
    spec = f"{rootfs['upper']}:{rootfs['root']}"
    res = runner(spec, "--", "sh", "-c", "cat /etc/motd; ls /etc/group || echo no-group")
    assert res.returncode == 0, res.stderr
    assert lines(res.stdout)[0] == "upper layer"
    assert lines(res.stdout)[-1] == "no-group"


def test_command_not_found(runner, rootfs):
    res = runner(rootfs["root"], "--", "/no/such/program")
    assert res.returncode == 127
    assert res.stdout == b""
    assert lines(res.stderr) == ["pyunion: /no/such/program: No such file or directory"]


# --- writable layer ---------------------------------------------------------------------


def test_temporary_writable_layer_is_removed_and_lowers_unchanged(runner, rootfs):
    before = snapshot(rootfs["root"])
    script = "echo new > /bin/newfile; rm /bin/ls; echo changed > /etc/motd; cat /etc/motd"
    res = runner(rootfs["root"], "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"changed\n"
    assert snapshot(rootfs["root"]) == before
    res = runner(rootfs["root"], "--", "sh", "-c", "cat /etc/motd; ls /bin/newfile")
    assert lines(res.stdout) == ["image layer"]
    assert res.returncode != 0


def test_rw_dir_is_kept_and_seen_by_later_runs(runner, rootfs, tmp_path):
    rw = tmp_path / "rw"
    os.makedirs(rw)
    os.chown(rw, runner.uid, -1)
    before = snapshot(rootfs["root"])
    res = runner("--rw", str(rw), rootfs["root"], "--", "sh", "-c", "echo kept > /data.txt")
    assert res.returncode == 0, res.stderr
    assert (rw / "data.txt").read_text() == "kept\n"
    res = runner("--rw", str(rw), rootfs["root"], "--", "cat", "/data.txt")
    assert res.stdout == b"kept\n"
    assert snapshot(rootfs["root"]) == before
    # the init layer's files and mountpoints never land in the writable layer
    assert sorted(os.listdir(rw)) == ["data.txt"]


def test_rw_dir_holds_whole_files(runner, rootfs, tmp_path):
    """A --rw DIR is the user's, so it stays complete by itself: a chmod copies the data
    (the layers the runner manages get metadata-only copies, see test_image_run)."""
    rw = tmp_path / "rw"
    os.makedirs(rw)
    os.chown(rw, runner.uid, -1)
    res = runner("--rw", str(rw), rootfs["root"], "--", "chmod", "600", "/etc/motd")
    assert res.returncode == 0, res.stderr
    assert (rw / "etc/motd").read_text() == "image layer\n"
    assert stat.S_IMODE(os.stat(rw / "etc/motd").st_mode) == 0o600
    assert "user.pyunion.metacopy" not in os.listxattr(rw / "etc/motd")


def test_init_layer_hostname_hosts_resolv(runner, rootfs, tmp_path):
    rw = tmp_path / "rw"
    os.makedirs(rw)
    os.chown(rw, runner.uid, -1)
    script = "hostname; cat /etc/hostname; cat /etc/hosts; cat /etc/resolv.conf"
    res = runner("--rw", str(rw), "--hostname", "box1", rootfs["root"], "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert out.startswith("box1\nbox1\n")
    assert re.search(r"^127\.0\.1\.1\s+box1$", out, re.M)
    with open("/etc/resolv.conf") as f:
        assert out.endswith(f.read())
    assert os.listdir(rw) == []
    res = runner(rootfs["root"], "--", "hostname")
    assert re.fullmatch(rb"[0-9a-f]{12}\n", res.stdout)


# --- options ----------------------------------------------------------------------------


def test_env_workdir_user(runner, rootfs):
    script = 'echo "$FOO|$HOME|$(pwd)|$(id -u):$(id -g)"; grep -E "^CapEff" /proc/self/status'
    res = runner(
        "-e", "FOO=bar baz", "-w", "/tmp", "-u", "1000", rootfs["root"], "--", "sh", "-c", script
    )
    assert res.returncode == 0, res.stderr
    assert lines(res.stdout) == ["bar baz|/home/user|/tmp|1000:1000", "CapEff:\t0000000000000000"]
    res = runner("-u", "user:root", rootfs["root"], "--", "sh", "-c", "id -u; id -g; touch /f")
    assert lines(res.stdout) == ["1000", "0"]
    assert res.returncode != 0  # / belongs to root and is not writable by uid 1000


def test_files_written_by_a_user_belong_to_it(runner, rootfs, tmp_path):
    rw = tmp_path / "rw"
    os.makedirs(rw)
    os.chown(rw, runner.uid, -1)
    res = runner(
        "--rw",
        str(rw),
        "-u",
        "1000",
        rootfs["root"],
        "--",
        "sh",
        "-c",
        "echo x > /tmp/f; ls -n /tmp/f",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[2:4] == [b"1000", b"1000"]
    expected = 1000
    if runner.mode == "rootless":
        with open("/etc/subuid") as f:
            start = [ln.split(":")[1] for ln in f if ln.startswith(TEST_USER + ":")][0]
        expected = int(start) + 999  # container uid 1 is the first subordinate id
    assert os.stat(rw / "tmp/f").st_uid == expected


def test_volumes(runner, rootfs, tmp_path):
    shared = tmp_path / "shared"
    os.makedirs(shared)
    os.chown(shared, runner.uid, -1)
    (shared / "in.txt").write_text("from host\n")
    ro = tmp_path / "ro"
    os.makedirs(ro)
    (ro / "r.txt").write_text("read only\n")
    conf = tmp_path / "app.conf"
    conf.write_text("setting=1\n")
    rw = tmp_path / "rw"
    os.makedirs(rw)
    os.chown(rw, runner.uid, -1)
    script = (
        "cat /mnt/shared/in.txt; echo back > /mnt/shared/out.txt; cat /opt/ro/r.txt;"
        " echo no > /opt/ro/w.txt && echo WROTE; cat /etc/app.conf"
    )
    res = runner(
        "--rw", str(rw), "-v", f"{shared}:/mnt/shared", "-v", f"{ro}:/opt/ro:ro",
        "-v", f"{conf}:/etc/app.conf:ro", rootfs["root"], "--", "sh", "-c", script,
    )  # fmt: skip
    assert lines(res.stdout) == ["from host", "read only", "setting=1"]
    assert b"Read-only file system" in res.stderr
    assert (shared / "out.txt").read_text() == "back\n"
    assert sorted(os.listdir(ro)) == ["r.txt"]
    assert os.listdir(rw) == []  # bind-mount targets live in the init layer


def test_net_none_has_only_loopback_up(runner, rootfs):
    res = runner("--net", "none", rootfs["root"], "--", "sh", "-c", "cat /proc/net/dev; ip link")
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    interfaces = re.findall(r"^\s*([^\s:]+):", out.split("\n", 2)[2], re.M)
    assert interfaces[0] == "lo"
    assert re.search(r"^1: lo: <[A-Z_,]*\bUP\b", out, re.M)
    with open("/proc/net/dev") as f:
        host_ifaces = re.findall(r"^\s*([^\s:]+):", f.read(), re.M)
    res = runner("--net", "host", rootfs["root"], "--", "cat", "/proc/net/dev")
    assert sorted(re.findall(r"^\s*([^\s:]+):", res.stdout.decode(), re.M)) == sorted(host_ifaces)


# --- isolation --------------------------------------------------------------------------


def test_pid_namespace_and_zombie_reaping(runner, rootfs):
    script = (
        "echo $$; sh -c 'sleep 0.1 & exit 0';"  # an orphan: pid 1 inherits and must reap it
        " for i in $(seq 200); do ps -o stat,comm | grep -q -e '^Z' -e ' sleep$' || break;"
        " sleep 0.05; done;"
        " ps -o pid,stat,args"
    )
    res = runner(rootfs["root"], "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    out = lines(res.stdout)
    assert out[0] == "2"
    pids = [int(line.split()[0]) for line in out[2:]]
    assert pids[0] == 1 and all(p < 50 for p in pids)
    assert not any(line.split()[1].startswith("Z") for line in out[2:])
    assert not any(" mount " in line for line in out[2:])  # the union daemon is outside


def test_root_is_the_union_and_host_is_unreachable(runner, rootfs):
    res = runner(rootfs["root"], "--", "sh", "-c", "ls /; cat /proc/self/mountinfo")
    assert res.returncode == 0, res.stderr
    out = lines(res.stdout)
    assert sorted(out[: out.index("tmp") + 1]) == [
        "bin",
        "dev",
        "etc",
        "home",
        "proc",
        "root",
        "run",
        "sys",
        "tmp",
    ]
    mounts = [line.split(" - ") for line in out if " - " in line]
    root_mounts = [right.split()[0] for left, right in mounts if left.split()[4] == "/"]
    assert root_mounts and all(t.startswith("fuse") for t in root_mounts)
    assert not any(right.startswith("overlay") for _, right in mounts)


def test_chroot_is_used_only_when_asked(runner, rootfs):
    res = runner("--chroot", rootfs["root"], "--", "cat", "/etc/motd")
    assert res.returncode == 0
    assert res.stdout == b"image layer\n"
    assert len(lines(res.stderr)) == 1 and "chroot" in res.stderr.decode()
    res = runner(rootfs["root"], "--", "cat", "/etc/motd")
    assert res.stderr == b""


def test_dev_proc_sys(runner, rootfs):
    script = (
        "ls /dev; echo ==; echo x > /dev/null; head -c 3 /dev/zero | od -An -tx1;"
        " head -c 8 /dev/urandom | wc -c; ls /dev/pts; touch /sys/x 2>&1;"
        " grep -E ' /(sys|proc|dev|dev/pts|dev/shm) ' /proc/self/mounts"
    )
    res = runner(rootfs["root"], "--", "sh", "-c", script)
    out = res.stdout.decode()
    assert "==" in out, res.stderr
    listing = set(out.split("==")[0].split())
    for name in ("null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm"):
        assert name in listing
    for name in ("fd", "stdin", "stdout", "stderr"):
        assert name in listing
    assert " 00 00 00\n" in out
    assert "\n8\n" in out
    assert "Read-only file system" in out
    assert re.search(r"^\S+ /sys sysfs ro,", out, re.M)
    assert re.search(r"^proc /proc proc ", out, re.M)
    assert re.search(r"^\S+ /dev/pts devpts ", out, re.M)
    assert re.search(r"^\S+ /dev/shm tmpfs ", out, re.M)


def test_own_cgroup_is_shown(runner, rootfs):
    script = "cat /proc/self/cgroup; ls /sys/fs/cgroup"
    res = runner(rootfs["root"], "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    out = lines(res.stdout)
    cgroups = [line for line in out if re.match(r"^\d+:", line)]
    assert cgroups and all(line.endswith(":/") for line in cgroups)
    assert len(out) > len(cgroups)  # /sys/fs/cgroup is populated


def test_capabilities_and_no_new_privs(runner, rootfs):
    res = runner(
        rootfs["root"], "--", "grep", "-E", "^(CapBnd|CapEff|NoNewPrivs)", "/proc/self/status"
    )
    assert lines(res.stdout) == [
        "CapEff:\t00000000a80425fb",
        "CapBnd:\t00000000a80425fb",
        "NoNewPrivs:\t1",
    ]


def test_tty(runner, rootfs):
    res = runner("-t", rootfs["root"], "--", "sh", "-c", "tty; test -t 0 && test -t 1 && echo both")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"/dev/pts/0\r\nboth\r\n"


# --- signals ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_reach_the_command(runner, rootfs, sig):
    script = f"trap 'echo got; exit 3' {sig.name[3:]}; echo ready; while :; do sleep 1; done"
    proc = runner.popen(rootfs["root"], "--", "sh", "-c", script)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready and proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == b"got\n"
    assert proc.returncode == 3
    deadline = time.monotonic() + 30
    while marked_pids(runner.marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_nothing_left(runner.marker)
    assert os.listdir(runner.workspaces) == []


def test_background_processes_are_killed_at_the_end(runner, rootfs):
    res = runner(
        "-e", f"M={runner.marker}", rootfs["root"], "--", "sh", "-c", "sleep 1000 & echo started"
    )
    assert res.stdout == b"started\n"  # and assert_nothing_left found no sleep


# --- limits -----------------------------------------------------------------------------


def test_limits_are_applied(runner, rootfs):
    if runner.mode == "rootless":
        script = (
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null"
            " || cat /sys/fs/cgroup/memory.max"
        )
        res = runner("--memory", "64m", rootfs["root"], "--", "sh", "-c", script)
        if res.returncode == 0:  # a host that delegates a cgroup to the user: applied
            assert res.stdout == f"{64 << 20}\n".encode()
        else:  # no delegation (as here): refused, never run unlimited
            assert res.stdout == b""
            assert len(lines(res.stderr)) == 1 and "--memory" in res.stderr.decode()
        return
    script = (
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max;"
        " cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max;"
        " cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max;"
        " sh -c 'for i in $(seq 30); do sleep 5 & done';"
        " read n < /sys/fs/cgroup/pids/pids.current || read n < /sys/fs/cgroup/pids.current; echo $n"
    )
    res = runner(
        "--memory",
        "64m",
        "--pids-limit",
        "12",
        "--cpus",
        "0.5",
        rootfs["root"],
        "--",
        "sh",
        "-c",
        script,
    )
    out = lines(res.stdout)
    assert out[:3] == [str(64 << 20), "12", "50000"]
    assert 8 <= int(out[3]) <= 12  # the 30 background sleeps were held at the limit
    assert b"can't fork" in res.stderr
    with open("/proc/self/cgroup") as f:
        own = {line.split(":")[1]: line.split(":")[2].strip() for line in f}
    leftover = (
        [
            d
            for d in os.listdir(
                os.path.join("/sys/fs/cgroup/memory", own.get("memory", "/").lstrip("/"))
            )
            if d.startswith("pyunion-")
        ]
        if os.path.isdir("/sys/fs/cgroup/memory")
        else []
    )
    assert leftover == []


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus", "ROOT"],
        [],
        ["/no/such/dir"],
        ["-v", "/no/such:/x", "ROOT"],
        ["-v", "/tmp", "ROOT"],
        ["--net", "bridge", "ROOT"],
        ["--memory", "lots", "ROOT"],
        ["--cpus", "-1", "ROOT"],
        ["--pids-limit", "0", "ROOT"],
        ["-w", "relative", "ROOT"],
        ["--hostname", "bad name", "ROOT"],
        ["ROOT=rw"],
        ["--name", "c1", "ROOT"],
        ["--rw", "NEW", "/no/such/dir"],
        ["--rw", "ROOT", "ROOT"],
        ["--rw", "NEW", "-v", "/no/such:/x", "ROOT"],
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(runner, rootfs, tmp_path, args):
    before = snapshot(rootfs["root"])
    new = tmp_path / "new"
    args = [a.replace("ROOT", rootfs["root"]).replace("NEW", str(new)) for a in args]
    res = runner(*args, "--", "touch", "/created")
    assert res.returncode == 2
    assert res.stdout == b""
    err = lines(res.stderr)
    assert len(err) == 1 and err[0].startswith("pyunion: ")
    assert snapshot(rootfs["root"]) == before
    assert not new.exists()


# --- rootless without subordinate ids ---------------------------------------------------

SINGLE_USER = "pyunion-rt1"


@pytest.fixture(scope="module")
def single_id_user():
    """A plain user without /etc/subuid or /etc/subgid ranges (only its own id can be mapped)."""
    subprocess.run(["userdel", "-r", SINGLE_USER], capture_output=True)  # left by a crashed run
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", SINGLE_USER], check=True, capture_output=True)
    saved = {}
    for path in ("/etc/subuid", "/etc/subgid"):
        with open(path) as f:
            saved[path] = f.read()
        with open(path, "w") as f:
            f.writelines(
                ln for ln in saved[path].splitlines(True) if not ln.startswith(SINGLE_USER + ":")
            )
    fuse_mode = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield pwd.getpwnam(SINGLE_USER)
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        remove_user(SINGLE_USER)
        for path in saved:
            with open(path) as f:
                lines_now = [ln for ln in f if not ln.startswith(SINGLE_USER + ":")]
            with open(path, "w") as f:
                f.writelines(lines_now)


def test_rootless_with_only_its_own_id(single_id_user, rootfs, tmp_path):
    uid, gid = single_id_user.pw_uid, single_id_user.pw_gid
    env = _user_env(uid)
    cmd = [*_python_for(uid), "-m", "unionfs", "run"]
    rw = tmp_path / "rw"
    os.makedirs(rw)
    os.chown(rw, uid, gid)

    def run(*args):
        return subprocess.run(
            cmd + list(args), capture_output=True, env=env, user=uid, group=gid,
            extra_groups=[], cwd="/", timeout=TIMEOUT,
        )  # fmt: skip

    script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; echo x > /f; ls /dev/pts"
    res = run("--rw", str(rw), rootfs["root"], "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    out = [line.split() for line in lines(res.stdout)]
    assert out[:3] == [["0", str(uid), "1"], ["0", str(gid), "1"], ["0"]]
    assert "ptmx" in out[3]
    assert os.stat(rw / "f").st_uid == uid
    res = run("-u", "1000", rootfs["root"], "--", "id")
    assert res.returncode == 2
    assert len(lines(res.stderr)) == 1 and b"/etc/subuid" in res.stderr


def test_namespaces_are_new(runner, rootfs):
    kinds = ["mnt", "pid", "uts", "ipc", "cgroup", "net", "user"]
    script = "for n in " + " ".join(kinds) + "; do readlink /proc/self/ns/$n; done"
    res = runner("--net", "none", rootfs["root"], "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    inside = dict(zip(kinds, lines(res.stdout), strict=True))
    host = {k: os.readlink(f"/proc/self/ns/{k}") for k in kinds}
    for kind in ("mnt", "pid", "uts", "ipc", "cgroup", "net"):
        assert inside[kind] != host[kind], kind
    assert (inside["user"] != host["user"]) == (runner.mode == "rootless")
    res = runner("--net", "host", rootfs["root"], "--", "readlink", "/proc/self/ns/net")
    assert res.stdout.decode().strip() == host["net"]


def test_signal_during_start_leaves_nothing(runner, rootfs):
    proc = runner.popen(rootfs["root"], "--", "sleep", "1000")
    try:
        time.sleep(0.3)  # somewhere in the start-up: the outcome must be the same wherever
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (143, -signal.SIGTERM)
    assert out == b""
    deadline = time.monotonic() + 30
    while marked_pids(runner.marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_nothing_left(runner.marker)
    assert os.listdir(runner.workspaces) == []


def test_paths_follow_the_images_symlinks(runner, rootfs, tmp_path):
    shared = tmp_path / "shared"
    os.makedirs(shared)
    (shared / "in.txt").write_text("through a symlink\n")
    rw = tmp_path / "rw"
    os.makedirs(rw)
    os.chown(rw, runner.uid, -1)
    script = "readlink /var/run; cat /run/app/in.txt; pwd"
    args = ["--rw", str(rw), "-v", f"{shared}:/var/run/app", "-w", "/srv/work"]
    res = runner(*args, rootfs["root"], "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert lines(res.stdout) == ["/run", "through a symlink", "/srv/work"]
    assert os.listdir(rw) == []  # the volume target and the working directory are in the init layer
