"""Hostile branches: the daemon never follows a symlink that lives inside a branch."""

import errno
import os
import subprocess

import pytest


@pytest.fixture
def hostile(make_union, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host data")
    u = make_union(("up", "rw"), ("mid", "ro+wh"), ("low", "ro+wh"))
    # lower layers whose directories are really symlinks out of the branch
    os.symlink(host, u["low"] / "etc")
    os.symlink("../../../host", u["low"] / "up")
    (u["mid"] / "etc").mkdir()
    (u["mid"] / "etc" / "hello").write_text("layer data")
    (u["mid"] / "up").mkdir()
    os.symlink(host / "secret", u["mid"] / "link")
    (u["mid"] / "tree" / "sub").mkdir(parents=True)
    os.symlink(host, u["mid"] / "tree" / "sub" / "out")
    u.mount()
    return u, host


def test_symlinked_lower_directories_are_not_merged(hostile):
    u, host = hostile
    assert os.listdir(u / "etc") == ["hello"]
    assert os.listdir(u / "up") == []
    for p in (u / "etc" / "secret", u / "up" / "secret"):
        with pytest.raises(FileNotFoundError):
            p.read_text()


def test_writes_stay_in_the_writable_branch(hostile):
    u, host = hostile
    (u / "etc" / "new").write_text("x")
    os.mkdir(u / "up" / "d")
    os.unlink(u / "etc" / "hello")
    os.rename(u / "tree", u / "tree2")  # a whole-tree copy-up through the symlink's parent
    assert sorted(os.listdir(host)) == ["secret"]
    assert (host / "secret").read_text() == "host data"
    assert (u["up"] / "etc" / "new").read_text() == "x"
    assert os.readlink(u["up"] / "tree2" / "sub" / "out") == str(host)
    assert os.path.islink(u["mid"] / "tree" / "sub" / "out")


def test_symlinks_reach_the_kernel_as_symlinks(hostile):
    u, host = hostile
    assert os.readlink(u / "link") == str(host / "secret")
    assert os.path.islink(u / "link")
    # changing the link itself (not its target) copies the link up
    os.chown(u / "link", 12, 34, follow_symlinks=False)
    assert os.path.islink(u["up"] / "link")
    assert os.lstat(host / "secret").st_uid == os.getuid()


def test_listing_and_find_never_leave_the_union(hostile):
    u, host = hostile
    out = subprocess.run(["find", u.mnt], capture_output=True, text=True, check=True).stdout
    assert "secret" not in out and "host data" not in out


def test_unexpected_exception_answers_eio_and_keeps_serving(union):
    (union["low"] / "f").write_text("still served")
    union.mount()
    union.expected_log.append("unexpected error in setxattr")
    union.expected_log.append("Traceback")
    with pytest.raises(OSError) as e:
        os.setxattr(union.mnt, "pyunion.selftest.fail", b"1")
    assert e.value.errno == errno.EIO
    assert (union / "f").read_text() == "still served"
    (union / "g").write_text("and writable")
    assert (union["up"] / "g").read_text() == "and writable"
    assert "self-test failure" in union.log.read_text()
