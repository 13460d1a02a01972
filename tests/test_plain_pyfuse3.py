"""The same semantics where the kernel sends OPEN and OPENDIR: on pyfuse3's own request loop and
handlers (-o noextras, which a mount falls back to when unionfs/session.py cannot find the
/dev/fuse fd it would serve), and on the session as kernels before 5.1 drive it (-o opens)."""

import os
import stat

import pytest

from conftest import pyunion, wait_filled


@pytest.fixture(params=["noextras", "opens"])
def plain(union, request):
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("lower")
    (union["low"] / "big").write_bytes(os.urandom(2 << 20))
    if request.param == "opens":  # with -d, to see the requests
        r = pyunion("mount", "-d", "-o", f"logfile={union.log},opens", union.spec, union.mnt)
        assert r.returncode == 0, r.stderr
    else:
        union.mount(request.param)
    yield union
    log = union.log.read_text()
    if request.param == "noextras":
        assert "pyfuse3's own request loop" in log
    else:  # the kernel did send them, and the session answered
        assert "open(" in log
        if "readdirplus(" in log:
            assert "opendir(" in log and "releasedir(" in log


def test_files_and_copy_up(plain):
    u = plain
    with open(u / "d" / "f", "a") as f:
        f.write("+")
    assert (u / "d" / "f").read_text() == "lower+"
    assert wait_filled(u["up"]) == []  # (an append copies no data first: see test_appends)
    assert (u["up"] / "d" / "f").read_text() == "lower+"
    with open(u / "big", "r+b") as f:  # a threaded copy-up
        f.write(b"X")
    assert (u / "big").read_bytes()[:1] == b"X"
    with open(u / "d" / "f", "w") as f:  # O_TRUNC reaches the daemon as an open flag here
        f.write("new")
    assert (u / "d" / "f").read_text() == "new"
    os.truncate(u / "d" / "f", 1)
    assert (u / "d" / "f").read_text() == "n"
    assert (u["low"] / "d" / "f").read_text() == "lower"


def test_namespace_and_attributes(plain):
    u = plain
    os.mkdir(u / "n")
    (u / "n" / "x").write_text("x")
    os.chmod(u / "n" / "x", 0o600)
    os.setxattr(u / "n" / "x", "user.k", b"v")
    assert os.getxattr(u / "n" / "x", "user.k") == b"v"
    assert stat.S_IMODE(os.stat(u / "n" / "x").st_mode) == 0o600
    os.rename(u / "d", u / "e")
    assert os.listdir(u / "e") == ["f"]
    os.unlink(u / "e" / "f")
    os.rmdir(u / "e")
    assert sorted(os.listdir(u.mnt)) == ["big", "n"]
    fd = os.open(u / "n" / "x", os.O_RDONLY)
    os.unlink(u / "n" / "x")
    assert os.read(fd, 10) == b"x"
    os.close(fd)
