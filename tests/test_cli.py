"""Bad input to `pyunion mount`: one line on stderr, non-zero exit, nothing mounted or changed."""

import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import as_user, is_mounted, pyunion, tree


def _fails(args, base, expect):
    before = tree(base)
    r = pyunion(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pyunion: ") and expect in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert tree(base) == before
    return lines[0]


@pytest.fixture
def dirs(tmp_path):
    for d in ("a", "b", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "a" / "f").write_text("data")
    (tmp_path / "file").write_text("x")
    return tmp_path


def test_missing_branch(dirs):
    _fails(["mount", f"{dirs}/a:{dirs}/nope", dirs / "mnt"], dirs, "nope")
    assert not is_mounted(dirs / "mnt")


def test_branch_not_a_directory(dirs):
    _fails(["mount", f"{dirs}/a:{dirs}/file", dirs / "mnt"], dirs, "not a directory")


def test_writable_branch_on_a_read_only_filesystem(dirs):
    """The error names the branch, not the work area's name inside it."""
    (dirs / "ro").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", dirs / "ro"], check=True)
    try:
        _fails(["mount", f"{dirs}/ro:{dirs}/a", dirs / "mnt"], dirs,
               f"branch {dirs}/ro: cannot make its work area .wh..wh.pyunion: Read-only file system")
        assert not is_mounted(dirs / "mnt")
        r = pyunion("mount", f"{dirs}/ro=ro:{dirs}/a", dirs / "mnt")  # read-only there: fine
        assert r.returncode == 0, r.stderr
        assert (dirs / "mnt" / "f").read_text() == "data"
        assert pyunion("umount", dirs / "mnt").returncode == 0
    finally:
        subprocess.run(["umount", dirs / "ro"], check=True)


def test_unknown_mode(dirs):
    _fails(["mount", f"{dirs}/a=rw:{dirs}/b=sideways", dirs / "mnt"], dirs, "sideways")


def test_missing_mountpoint(dirs):
    _fails(["mount", f"{dirs}/a:{dirs}/b", dirs / "nomnt"], dirs, "nomnt")


def test_same_branch_twice(dirs):
    os.symlink(dirs / "a", dirs / "alias")
    _fails(["mount", f"{dirs}/a:{dirs}/alias", dirs / "mnt"], dirs, "twice")


def test_branch_inside_mountpoint(dirs):
    (dirs / "mnt" / "inner").mkdir()
    _fails(["mount", f"{dirs}/a:{dirs}/mnt/inner", dirs / "mnt"], dirs, "inside the mountpoint")


def test_mountpoint_inside_branch(dirs):
    (dirs / "a" / "m").mkdir()
    _fails(["mount", f"{dirs}/a:{dirs}/b", dirs / "a" / "m"], dirs, "inside the branch")


def test_unknown_option(dirs):
    _fails(["mount", "-o", "frobnicate", f"{dirs}/a:{dirs}/b", dirs / "mnt"], dirs, "frobnicate")


@pytest.mark.parametrize("option, expect", [
    ("poll=soon", "poll: not a number"), ("poll=-1", "poll: must not be negative"),
    ("poll=200000", "poll: must be at most 100000 microseconds"),
    ("timeout=never", "timeout: not a number"), ("attr_timeout=-5", "must not be negative"),
    ("timeout=inf", "timeout: not a number"), ("entry_timeout=nan", "not a number"),
    ("negative_timeout=1e30", "must be at most"),
    ("logfile=", "logfile needs a value"),
    ("readdirplus=sometimes", "readdirplus: 'always' or 'auto'"),
    ("metacopy=maybe", "metacopy: 'fill', 'on' or 'off'"),
    ("readdirplus=auto,noextras", "readdirplus=auto needs pyunion's own session"),
    ("lowlatency,noextras", "lowlatency needs pyunion's own session"),
    ("lowlatency,poll=0", "drop poll=0"),
])
def test_bad_option_values(dirs, option, expect):
    _fails(["mount", "-o", option, f"{dirs}/a:{dirs}/b", dirs / "mnt"], dirs, expect)
    assert not is_mounted(dirs / "mnt")


def test_wrong_argument_count(dirs):
    _fails(["mount", f"{dirs}/a"], dirs, "usage")


def test_umount_not_mounted(dirs):
    _fails(["umount", dirs / "mnt"], dirs, "not mounted")


def test_umount_refuses_other_mounts(dirs):
    """`pyunion umount` unmounts pyunion mounts only: a tmpfs there stays, with its data."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", dirs / "mnt"], check=True)
    try:
        (dirs / "mnt" / "kept").write_text("data")
        _fails(["umount", dirs / "mnt"], dirs, "is not a pyunion mount (it is tmpfs)")
        assert (dirs / "mnt" / "kept").read_text() == "data"
    finally:
        subprocess.run(["umount", dirs / "mnt"], check=True)


def _mount_as_user(user, fuse_mode, *opts) -> tuple[int, str]:
    """`pyunion mount [OPTS] a:b mnt` by USER (uid, gid) in a fresh directory of theirs, with
    /dev/fuse at FUSE_MODE meanwhile: (exit code, stderr); asserts nothing got mounted."""
    uid, gid = user
    base = tempfile.mkdtemp(prefix="pyunion-user-", dir="/tmp")
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    r, w = os.pipe()
    try:
        for d in ("a", "b", "mnt"):
            os.mkdir(os.path.join(base, d))
            os.chown(os.path.join(base, d), uid, gid)
        os.chmod(base, 0o755)
        os.chmod("/dev/fuse", fuse_mode)

        def run():
            res = pyunion("mount", *opts, f"{base}/a:{base}/b", f"{base}/mnt")
            os.write(w, f"{res.returncode}\n{res.stderr}".encode())

        assert as_user(uid, gid, run) == 0
        os.close(w)
        w = None
        code, err = os.read(r, 65536).decode().split("\n", 1)
        assert not is_mounted(f"{base}/mnt")
        return int(code), err
    finally:
        os.chmod("/dev/fuse", mode)
        os.close(r)
        if w is not None:
            os.close(w)
        shutil.rmtree(base)


def test_no_usable_dev_fuse(test_user):
    code, err = _mount_as_user(test_user, 0o600)  # as shipped here: root only
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "/dev/fuse" in err, err


def test_help_lists_commands():
    r = pyunion("--help")
    assert r.returncode == 0 and "pyunion mount" in r.stdout and "pyunion umount" in r.stdout


@pytest.mark.parametrize("command", ["mount", "umount", "refresh"])
def test_subcommand_help(command):
    r = pyunion(command, "--help")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"usage: pyunion {command} ")
    if command == "mount":
        assert "readdirplus=always|auto" in r.stdout and "-f " in r.stdout


def test_low_latency_needs_root(test_user):
    """-o lowlatency asks the kernel to keep every CPU awake: an unprivileged user may not,
    and is told so before anything is mounted."""
    code, err = _mount_as_user(test_user, 0o666, "-o", "lowlatency")  # FUSE as distributions ship it
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "lowlatency" in lines[0] and "needs root" in lines[0], err
