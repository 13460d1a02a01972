"""Hard links and inode numbers: unique, stable across copy-up, shared by a lower file's names."""

import os

import pytest


def test_link_to_lower_file_copies_up(union):
    (union["low"] / "f").write_text("x")
    union.mount()
    os.link(union / "f", union / "g")
    assert os.stat(union / "f").st_nlink == 2 and os.stat(union / "g").st_nlink == 2
    assert os.stat(union / "f").st_ino == os.stat(union / "g").st_ino
    assert os.stat(union["up"] / "f").st_ino == os.stat(union["up"] / "g").st_ino
    assert os.stat(union["low"] / "f").st_nlink == 1
    with open(union / "g", "a") as f:
        f.write("y")
    assert (union / "f").read_text() == "xy"


def test_lower_hard_links_share_one_inode_and_writes(union):
    (union["low"] / "a").write_text("same")
    os.link(union["low"] / "a", union["low"] / "b")
    union.mount()
    assert os.stat(union / "a").st_ino == os.stat(union / "b").st_ino
    with open(union / "a", "a") as f:
        f.write("+a")
    assert (union / "b").read_text() == "same+a"
    with open(union / "b", "a") as f:
        f.write("+b")
    assert (union / "a").read_text() == "same+a+b"
    assert os.stat(union["up"] / "a").st_ino == os.stat(union["up"] / "b").st_ino
    assert (union["low"] / "a").read_text() == "same"


def test_inode_numbers_unique_and_stable_across_copy_up(union):
    for i in range(50):
        (union["low"] / f"l{i}").write_text("l")
        (union["up"] / f"u{i}").write_text("u")
    (union["low"] / "d").mkdir()
    union.mount()
    inos = {n: os.lstat(union / n).st_ino for n in os.listdir(union.mnt)}
    assert len(set(inos.values())) == len(inos)
    listed = {e.name: e.inode() for e in os.scandir(union.mnt)}
    assert listed == inos
    (union / "l7").write_text("changed")  # copy-up
    (union / "d" / "new").write_text("n")  # copies the directory up
    assert os.lstat(union / "l7").st_ino == inos["l7"]
    assert os.lstat(union / "d").st_ino == inos["d"]
    assert os.lstat(union.mnt).st_ino == 1 or os.lstat(union.mnt).st_ino not in inos.values()


def test_link_count_after_unlink(union):
    union.mount()
    (union / "a").write_text("x")
    os.link(union / "a", union / "b")
    os.unlink(union / "a")
    assert os.stat(union / "b").st_nlink == 1
    assert (union / "b").read_text() == "x"


def test_lower_hard_links_stay_one_file_after_remount(union):
    (union["low"] / "a").write_text("same")
    (union["low"] / "d").mkdir()
    os.link(union["low"] / "a", union["low"] / "d" / "b")
    os.link(union["low"] / "a", union["low"] / "c")
    union.mount()
    with open(union / "a", "a") as f:  # only "a" was ever looked up
        f.write("+a")
    union.remount()
    assert (union / "d" / "b").read_text() == "same+a"
    assert sorted(os.listdir(union.mnt)) == ["a", "c", "d"]
    assert (union / "c").read_text() == "same+a"
    inos = {os.stat(union / p).st_ino for p in ("a", "c", "d/b")}
    assert len(inos) == 1
    assert os.stat(union / "a").st_nlink == 3
    with open(union / "c", "a") as f:
        f.write("+c")
    assert (union / "d" / "b").read_text() == "same+a+c"
    assert (union["low"] / "a").read_text() == "same"
    assert os.stat(union["low"] / "a").st_nlink == 3


def test_hard_link_found_first_survives_its_directory_moving_and_the_other_name_going(union):
    """The kernel knows a hard-linked lower file by one name (hl) when its other name (p/f)
    is copied up by moving p: hl stays a name of the copy, also once p/f is removed (it used
    to be forgotten, and hl then answered ENOENT). Found by the differential test."""
    (union["low"] / "p").mkdir()
    (union["low"] / "p" / "f").write_text("data")
    os.link(union["low"] / "p" / "f", union["low"] / "hl")
    (union["low"] / "d").mkdir()
    union.mount()
    os.stat(union / "hl")
    os.rename(union / "p", union / "d" / "q")
    assert (union / "d" / "q" / "f").read_text() == "data"
    os.unlink(union / "d" / "q" / "f")
    os.chown(union / "hl", 1, 2)
    with open(union / "hl", "a") as f:
        f.write("+")
    assert (union / "hl").read_text() == "data+"
    assert os.stat(union / "hl").st_uid == 1
    assert (union["up"] / "hl").read_text() == "data+"
    assert (union["low"] / "hl").read_text() == "data"  # the lower branch as it was
    union.remount()
    assert (union / "hl").read_text() == "data+"
    assert os.listdir(union / "d" / "q") == []


@pytest.mark.parametrize("how", ["renamed over", "removed"])
@pytest.mark.parametrize("known", [False, True])
def test_writing_an_open_lower_file_whose_name_went(union, known, how):
    """A hard-linked lower file open for writing whose name went (a rename gave it to another
    file, or it was removed), then written through the open file: the write lands in a copy
    (it used to fail with EEXIST), and the file's other name shows that copy, as on overlayfs
    (which copies up at open), whether or not the kernel knew that name already (it used to
    keep the lower data when it did not), after a remount too."""
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("data")
    os.link(union["low"] / "d" / "f", union["low"] / "hl")
    (union["low"] / "other").write_text("other")
    union.mount()
    if known:
        os.stat(union / "d" / "f")
    fd = os.open(union / "hl", os.O_RDWR)
    try:
        if how == "removed":
            os.unlink(union / "hl")
        else:
            os.rename(union / "other", union / "hl")
        os.pwrite(fd, b"XX", 0)
        assert os.pread(fd, 100, 0) == b"XXta"
        assert sorted(os.listdir(union.mnt)) == (["d", "hl"] if how == "renamed over" else ["d", "other"])
        if how == "renamed over":
            assert (union / "hl").read_text() == "other"
        assert os.listdir(union / "d") == ["f"]
        assert (union / "d" / "f").read_text() == "XXta"
        os.pwrite(fd, b"YY", 2)
        assert (union / "d" / "f").read_text() == "XXYY"
        assert os.stat(union / "d" / "f").st_ino == os.fstat(fd).st_ino
    finally:
        os.close(fd)
    assert (union["up"] / "d" / "f").read_text() == "XXYY"
    union.remount()
    assert (union / "d" / "f").read_text() == "XXYY"
    assert (union["low"] / "d" / "f").read_text() == "data"  # the lower branch as it was
    assert (union["low"] / "hl").read_text() == "data"


def test_exchange_of_a_directory_and_a_hard_link_of_a_file_inside_it(union):
    """RENAME_EXCHANGE of lower directory `a` (holding `a/b`) and `hl`, another name of
    `a/b`'s file: copying `a` up links every known name of that file, `hl` too, which the
    exchange then found taken (EEXIST; found by the differential test, seed 216)."""
    from unionfs.syscalls import RENAME_EXCHANGE, renameat2

    (union["low"] / "a").mkdir()
    (union["low"] / "a/b").write_text("one file")
    os.link(union["low"] / "a/b", union["low"] / "hl")
    union.mount()
    assert os.stat(union / "hl").st_ino == os.stat(union / "a/b").st_ino  # both names known
    renameat2(-100, os.fsencode(union / "a"), -100, os.fsencode(union / "hl"), RENAME_EXCHANGE)
    assert (union / "a").read_text() == "one file" and (union / "hl/b").read_text() == "one file"
    assert os.stat(union / "a").st_ino == os.stat(union / "hl/b").st_ino
    assert sorted(os.listdir(union.mnt)) == ["a", "hl"]
    union.remount()
    assert (union / "a").read_text() == "one file" and (union / "hl/b").read_text() == "one file"
    assert os.stat(union["low"] / "a/b").st_nlink == 2 and (union["low"] / "hl").is_file()


@pytest.mark.parametrize("replacement", ["fifo", "dir", "none"])
def test_writing_an_open_lower_file_removed_then_its_directory_renamed(union, replacement):
    """A lower file held open whose name was removed, then its directory renamed (and
    something else made at the old name): a write through the open file lands in a copy with
    no name. It used to look the lower file up under the directory's new path (ENOENT), or
    under the old path in the merged tree, where the branches now hold something else
    (ENOTDIR; found by the differential test with the writeback cache, seed 798)."""
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("data")
    (union["low"] / "d" / "g").write_text("stays")
    union.mount()
    fd = os.open(union / "d" / "f", os.O_RDWR)
    try:
        os.unlink(union / "d" / "f")
        os.rename(union / "d", union / "e")
        if replacement == "fifo":
            os.mkfifo(union / "d")
        elif replacement == "dir":
            os.mkdir(union / "d")
        os.pwrite(fd, b"XX", 0)
        assert os.pread(fd, 100, 0) == b"XXta"
        assert os.fstat(fd).st_size == 4
    finally:
        os.close(fd)
    assert sorted(os.listdir(union / "e")) == ["g"] and (union / "e" / "g").read_text() == "stays"
    assert sorted(os.listdir(union.mnt)) == (["e"] if replacement == "none" else ["d", "e"])
    if replacement == "dir":
        assert os.listdir(union / "d") == []
    assert (union["low"] / "d" / "f").read_text() == "data"
    union.remount()
    assert sorted(os.listdir(union / "e")) == ["g"]
