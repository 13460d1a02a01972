"""The union mounted by an unprivileged user (FUSE through fusermount3), as rootless users run it."""

import os
import stat
import subprocess
from pathlib import Path

from conftest import PYUNION, as_user, fuse_for_everyone, reachable_by_others

REPO = Path(__file__).resolve().parent.parent


def test_unprivileged_user_mounts_and_writes(tmp_path, test_user):
    uid, gid = test_user
    base = tmp_path / "rootless"
    for d in ("up", "low", "low/d", "mnt"):
        (base / d).mkdir(parents=True)
    (base / "low" / "f").write_text("lower")
    (base / "low" / "d" / "g").write_text("g")
    (base / "low" / "gone").write_text("x")
    long = "L" * 253  # too long for a .wh. whiteout: hidden with a 0/0 device (no CAP_MKNOD)
    (base / "low" / long).write_text("x")
    for p in [base, *base.rglob("*")]:
        os.chown(p, uid, gid)
    os.chown(base / "low" / "gone", 0, 0)  # not the user's: its copy-up cannot keep the owner
    log = base / "log"

    def session():
        env = {"PATH": "/usr/bin:/bin", "HOME": str(base)}
        run = lambda *a: subprocess.run([*PYUNION, *a], check=True, env=env, capture_output=True)  # noqa: E731
        run("mount", "-o", f"logfile={log}", f"{base}/up:{base}/low", f"{base}/mnt")
        try:
            with open(base / "mnt" / "f", "a") as f:
                f.write("+user")
            os.unlink(base / "mnt" / "gone")
            os.unlink(base / "mnt" / long)
            os.rename(base / "mnt" / "d", base / "mnt" / "e")
            os.mkdir(base / "mnt" / "new")
            assert sorted(os.listdir(base / "mnt")) == ["e", "f", "new"]
        finally:
            run("umount", f"{base}/mnt")

    with reachable_by_others(base, REPO), fuse_for_everyone():
        assert as_user(uid, gid, session) == 0
    assert (base / "up" / "f").read_text() == "lower+user"
    assert (base / "up" / ".wh.gone").exists() and (base / "low" / "gone").exists()
    st = os.lstat(base / "up" / long)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and (base / "low" / long).exists()
    assert (base / "up" / "e" / "g").read_text() == "g" and (base / "up" / ".wh.d").exists()
    assert os.stat(base / "up" / "new").st_uid == uid
    assert (base / "low" / "f").read_text() == "lower"
    assert "INFO" in log.read_text() and "Traceback" not in log.read_text()


def _users_union(base: Path, owner: tuple[int, int], files: dict[str, bytes]) -> Path:
    """BASE with branches up and low and a mount point mnt, FILES in low, all OWNER's."""
    for d in ("up", "low", "mnt"):
        (base / d).mkdir(parents=True)
    for name, data in files.items():
        (base / "low" / name).write_bytes(data)
    for p in [base, *base.rglob("*")]:
        os.chown(p, *owner)
    return base


def _pyunion_as_user(base: Path):
    """A function running the pyunion CLI (as whoever calls it), with BASE as its home."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(base)}
    return lambda *a: subprocess.run([*PYUNION, *a], check=True, env=env, capture_output=True)


def test_unprivileged_user_makes_metadata_only_copies(tmp_path, test_user):
    """-o metacopy as a user: the mark is a user.* xattr, which an unprivileged daemon may set."""
    uid, gid = test_user
    data = os.urandom(200_000)
    base = _users_union(tmp_path / "rootless-meta", test_user, {"kept": data, "filled": data})
    log = base / "log"

    def session():
        run = _pyunion_as_user(base)
        for again in (False, True):  # (the second mount finds the copies in the branch)
            run("mount", "-o", f"metacopy,logfile={log}", f"{base}/up:{base}/low", f"{base}/mnt")
            try:
                os.chmod(base / "mnt" / "kept", 0o600)
                os.chmod(base / "mnt" / "filled", 0o640)
                assert (base / "mnt" / "kept").read_bytes() == data
                if not again:
                    continue
                with open(base / "mnt" / "filled", "r+b") as f:  # (not an append: a tail)
                    f.write(b"+")
                assert (base / "mnt" / "filled").read_bytes() == b"+" + data[1:]
            finally:
                run("umount", f"{base}/mnt")

    with reachable_by_others(base, REPO), fuse_for_everyone():
        assert as_user(uid, gid, session) == 0
    kept = os.lstat(base / "up" / "kept")
    assert kept.st_blocks == 0 and stat.S_IMODE(kept.st_mode) == 0o600
    assert os.getxattr(base / "up" / "kept", "user.pyunion.metacopy") == b"kept"
    assert (base / "up" / "filled").read_bytes() == b"+" + data[1:]
    assert "user.pyunion.metacopy" not in os.listxattr(base / "up" / "filled")
    assert (base / "low" / "kept").read_bytes() == data == (base / "low" / "filled").read_bytes()
    assert "Traceback" not in log.read_text() and "WARNING" not in log.read_text()


def test_unprivileged_daemon_fills_copies_it_may_not_write(tmp_path, test_user):
    """The default fills metadata-only copies in the background; a daemon without root's
    powers fills read-only ones too (made writable while filled, their mode put back)."""
    uid, gid = test_user
    data = os.urandom(100_000)
    names = ("readonly", "renamed", "noaccess")
    base = _users_union(tmp_path / "rootless-fill", test_user, dict.fromkeys(names, data))
    for name in names:
        os.chmod(base / "low" / name, 0o444)
    log = base / "log"

    def session():
        run = _pyunion_as_user(base)
        run("mount", "-o", f"logfile={log}", f"{base}/up:{base}/low", f"{base}/mnt")
        try:
            os.utime(base / "mnt" / "readonly", ns=(1_000_000_000, 2_000_000_000))
            os.rename(base / "mnt" / "renamed", base / "mnt" / "moved")
            os.chmod(base / "mnt" / "noaccess", 0)
        finally:
            run("umount", f"{base}/mnt")  # (returns once the daemon has filled them)

    with reachable_by_others(base, REPO), fuse_for_everyone():
        assert as_user(uid, gid, session) == 0
    for name, mode in (("readonly", 0o444), ("moved", 0o444), ("noaccess", 0)):
        p = base / "up" / name
        assert (p.read_bytes(), stat.S_IMODE(os.lstat(p).st_mode)) == (data, mode), name
        assert "user.pyunion.metacopy" not in os.listxattr(p)
    assert os.lstat(base / "up" / "readonly").st_mtime_ns == 2_000_000_000
    assert (base / "low" / "renamed").read_bytes() == data
    assert "Traceback" not in log.read_text() and "WARNING" not in log.read_text()
