"""Appends to lower files copy no data first: the write goes into a metadata-only copy, whose
lower file keeps supplying the data before it, and which holds the bytes past that end
itself, its tail (see unionfs.metacopy). With the default the copy is filled soon after."""

import errno
import os
import stat
import subprocess
import time

import pytest

from conftest import as_user, marked, origin_mark, tree, wait_filled

BIG = 3 << 20  # a copy-up of this copies in a worker thread (see unionfs.fs.THREAD_COPY_BYTES)


def _lower(root, rel, data, mode=0o644):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chmod(p, mode)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    return data


def _append(path, data, at=None):
    """Append DATA to PATH (O_APPEND), or write it at offset AT."""
    if at is None:
        with open(path, "ab") as f:
            f.write(data)
    else:
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, at) == len(data)
        finally:
            os.close(fd)


def _lower_files(union):
    return {"d/big": _lower(union["low"], "d/big", os.urandom(BIG)),
            "small": _lower(union["low"], "small", b"small\n", 0o4755)}


def _appended(union, lower):
    """Append to the lower files through the mount; what each then reads."""
    big, small = lower["d/big"], lower["small"]
    _append(union / "d/big", b"appended")
    _append(union / "small", b"past a hole", at=10_000)
    return {"d/big": big + b"appended", "small": small + bytes(10_000 - 6) + b"past a hole"}


@pytest.mark.parametrize("mode", ["fill", "metacopy"])
def test_an_append_copies_no_data(union, mode):
    """The branch gets a marked copy holding only what was appended, the mount shows the
    whole file at once; `fill` (the default) gives it its data soon after."""
    lower = _lower_files(union)
    before = tree(union["low"])
    union.mount(*(["metacopy"] if mode == "metacopy" else []))
    want = _appended(union, lower)
    for rel, data in want.items():
        assert (union / rel).read_bytes() == data, rel
        assert os.stat(union / rel).st_size == len(data)
    assert stat.S_IMODE(os.stat(union / "small").st_mode) == 0o4755  # (root wrote it: kept)
    up = union["up"]
    if mode == "metacopy":  # (filled only by a write of data below the tail)
        assert origin_mark(up / "d/big") == b"d/big" and origin_mark(up / "small") == b"small"
        assert os.lstat(up / "d/big").st_blocks * 512 < BIG // 2  # the tail's blocks alone
        assert (up / "d/big").read_bytes()[-8:] == b"appended"
        assert (up / "d/big").read_bytes()[:BIG] == bytes(BIG)
        union.remount()  # found again from the branch alone
        for rel, data in want.items():
            assert (union / rel).read_bytes() == data, rel
        union.umount()
        assert marked(up) == ["d/big", "small"]
        union.mount()  # a mount that fills fills them as it meets them
        for rel, data in want.items():
            assert (union / rel).read_bytes() == data, rel
    assert wait_filled(up) == []
    for rel, data in want.items():
        assert (up / rel).read_bytes() == data, rel
        assert (union / rel).read_bytes() == data, rel
    assert os.lstat(up / "d/big").st_blocks * 512 >= BIG
    union.remount()
    for rel, data in want.items():
        assert (union / rel).read_bytes() == data, rel
    assert tree(union["low"]) == before


def test_reads_and_seeks_across_the_end_of_the_lower_data(union):
    """Reads that span the lower file's end and the tail, SEEK_DATA and SEEK_HOLE."""
    lower = os.urandom(10_000)
    _lower(union["low"], "f", lower)
    union.mount("metacopy")
    _append(union / "f", b"T" * 5_000, at=20_000)  # a hole from 10,000 to 20,000
    want = lower + bytes(10_000) + b"T" * 5_000
    assert origin_mark(union["up"] / "f") == b"f"
    fd = os.open(union / "f", os.O_RDONLY)
    try:
        for off, size in ((0, 25_000), (9_990, 30), (9_999, 2), (10_000, 10), (19_990, 100),
                          (24_990, 100), (25_000, 10), (5_000, 100_000)):
            assert os.pread(fd, size, off) == want[off:off + size], (off, size)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert 10_000 <= hole <= 20_000 and want[hole:20_000] == bytes(20_000 - hole)
        data = os.lseek(fd, 10_001, os.SEEK_DATA)
        assert 10_001 <= data <= 20_000 and want[10_001:data] == bytes(data - 10_001)
        assert os.lseek(fd, 24_999, os.SEEK_DATA) == 24_999
        assert os.lseek(fd, 24_999, os.SEEK_HOLE) == 25_000
        with pytest.raises(OSError) as e:
            os.lseek(fd, 25_000, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    assert (union["low"] / "f").read_bytes() == lower


@pytest.mark.parametrize("how", ["overwrite", "truncate_in_tail", "truncate_below", "grow",
                                 "fallocate", "trunc_open"])
def test_a_change_to_a_copy_with_a_tail(union, how):
    """A change of data below the end of the lower data fills the copy, keeping its tail; a
    truncation to that end or past it (into the tail, or growing it) needs no data."""
    lower = os.urandom(BIG)
    _lower(union["low"], "f", lower)
    before = tree(union["low"])
    union.mount("metacopy")
    _append(union / "f", b"tail")
    ino = os.lstat(union["up"] / "f").st_ino
    whole = lower + b"tail"
    if how == "overwrite":
        with open(union / "f", "r+b") as f:
            f.seek(100)
            f.write(b"XYZ")
        want = whole[:100] + b"XYZ" + whole[103:]
    elif how == "truncate_in_tail":
        os.truncate(union / "f", BIG + 2)
        want = whole[:BIG + 2]
    elif how == "truncate_below":
        os.truncate(union / "f", 1000)
        want = lower[:1000]
    elif how == "grow":
        os.truncate(union / "f", BIG + 100)
        want = whole + bytes(96)
    elif how == "fallocate":
        fd = os.open(union / "f", os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, BIG + 8192)
        finally:
            os.close(fd)
        want = whole + bytes(8188)
    else:
        with open(union / "f", "wb") as f:
            f.write(b"new")
        want = b"new"
    assert (union / "f").read_bytes() == want
    path = union["up"] / "f"
    if how in ("truncate_in_tail", "grow"):
        assert origin_mark(path) == b"f" and os.lstat(path).st_size == len(want)
        assert os.lstat(path).st_blocks * 512 < BIG // 2
    else:
        assert origin_mark(path) is None and path.read_bytes() == want
    assert os.lstat(path).st_ino == ino  # (filled in place)
    union.remount()
    assert (union / "f").read_bytes() == want
    assert tree(union["low"]) == before


def test_a_copy_with_a_tail_as_a_lower_branch(make_union):
    """A writable branch left with such copies (a kill, or `-o metacopy`), used as a lower
    branch of another union: its files read whole; a copy-up of one, for data or for
    metadata, gets whole data (no metadata-only copy leads to a copy with a tail)."""
    low = {}
    first = make_union(("mid", "rw"), ("low", "ro+wh"), name="first")
    for rel in ("read", "chowned", "written", "appended"):
        low[rel] = _lower(first["low"], rel, os.urandom(50_000))
    first.mount("metacopy")
    for rel in low:
        _append(first / rel, b"+tail")
    first.umount()
    assert marked(first["mid"]) == sorted(low)
    before = tree(first["low"]), tree(first["mid"])

    u = make_union(("top", "rw"), ("mid", "ro+wh"), ("low", "ro+wh"), name="second")
    os.rmdir(u["mid"])
    os.rmdir(u["low"])
    os.symlink(first["mid"], u["mid"])
    os.symlink(first["low"], u["low"])
    u.mount("metacopy")
    want = {rel: data + b"+tail" for rel, data in low.items()}
    for rel, data in want.items():
        assert (u / rel).read_bytes() == data, rel
    os.chown(u / "chowned", 5, 5)
    with open(u / "written", "r+b") as f:
        f.write(b"W")
    want["written"] = b"W" + want["written"][1:]
    _append(u / "appended", b"!")
    want["appended"] += b"!"
    for rel in ("chowned", "written", "appended"):
        assert origin_mark(u["top"] / rel) is None, rel  # whole copies
        assert (u["top"] / rel).read_bytes() == want[rel], rel
    assert not (u["top"] / "read").exists()
    u.remount()
    for rel, data in want.items():
        assert (u / rel).read_bytes() == data, rel
    assert os.stat(u / "chowned").st_uid == 5
    u.umount()
    assert (tree(first["low"]), tree(first["mid"])) == before


@pytest.mark.parametrize("how", ["writeback", "same", "changed"])
def test_a_write_across_the_end_of_the_lower_data(union, how):
    """A write that starts before the end of the lower data and reaches past it needs none of
    the data if it only repeats the bytes there, as the writeback cache's write of a whole
    last page does after an append; one that changes them fills the copy first."""
    lower = _lower(union["low"], "f", os.urandom(BIG + 1000))  # (not a whole number of pages)
    before = tree(union["low"])
    union.mount("metacopy", *(["writeback"] if how == "writeback" else []))
    if how == "writeback":
        _append(union / "f", b"appended")
        want = lower + b"appended"
        fd = os.open(union / "f", os.O_RDONLY)
        try:
            os.fsync(fd)  # (the kernel writes the last page back)
        finally:
            os.close(fd)
    else:
        head = lower[-3:] if how == "same" else b"XYZ"
        _append(union / "f", head + b"past", at=len(lower) - 3)
        want = lower[:-3] + head + b"past"
    assert (union / "f").read_bytes() == want
    up = union["up"] / "f"
    if how == "changed":
        assert origin_mark(up) is None and up.read_bytes() == want
    else:
        assert origin_mark(up) == b"f" and os.lstat(up).st_size == len(want)
        assert os.lstat(up).st_blocks * 512 < BIG // 2  # no data copied
    union.remount()
    assert (union / "f").read_bytes() == want
    assert tree(union["low"]) == before


@pytest.mark.parametrize("mode", ["fill", "metacopy"])
def test_growing_a_lower_file_copies_no_data(union, mode):
    """A truncation to the lower file's size or past it needs none of its data either: the
    copy's size grows over a hole. By path, and through an open file (whose attribute
    replies count the lower file's blocks, as a stat does)."""
    lower = _lower_files(union)
    before = tree(union["low"])
    union.mount(*(["metacopy"] if mode == "metacopy" else []))
    os.truncate(union / "d/big", BIG + 100_000)
    fd = os.open(union / "small", os.O_RDWR)
    try:
        os.ftruncate(fd, 6)  # (its size: a copy, no change)
        os.ftruncate(fd, 5_000)
        os.fchmod(fd, 0o640)
        assert os.fstat(fd).st_blocks == os.lstat(union["low"] / "small").st_blocks
    finally:
        os.close(fd)
    want = {"d/big": lower["d/big"] + bytes(100_000), "small": lower["small"] + bytes(4_994)}
    big = os.stat(union / "d/big")
    assert big.st_size == BIG + 100_000 and big.st_blocks * 512 >= BIG
    for rel, data in want.items():
        assert (union / rel).read_bytes() == data, rel
    up = union["up"]
    if mode == "metacopy":
        assert marked(up) == ["d/big", "small"]
        assert os.lstat(up / "d/big").st_size == BIG + 100_000
        assert os.lstat(up / "d/big").st_blocks * 512 < BIG // 2  # no data copied
        assert stat.S_IMODE(os.lstat(up / "small").st_mode) == 0o640
        union.remount()
        for rel, data in want.items():
            assert (union / rel).read_bytes() == data, rel
    assert wait_filled(up) == [] if mode == "fill" else marked(up) == ["d/big", "small"]
    union.umount()
    if mode == "fill":
        for rel, data in want.items():
            assert (up / rel).read_bytes() == data, rel
    assert tree(union["low"]) == before


@pytest.mark.parametrize("change", ["append", "grow"])
def test_an_append_in_a_mount_that_makes_whole_copies(union, change):
    """With `-o metacopy=off` an append or a growing truncation copies the data up first."""
    lower = _lower(union["low"], "f", os.urandom(100_000))
    union.mount("metacopy=off")
    if change == "append":
        _append(union / "f", b"+")
        want = lower + b"+"
    else:
        os.truncate(union / "f", 100_005)
        want = lower + bytes(5)
    assert origin_mark(union["up"] / "f") is None
    assert (union["up"] / "f").read_bytes() == want
    assert (union["low"] / "f").read_bytes() == lower


def test_a_fill_that_does_not_fit_keeps_the_tail(make_union):
    """An append fits where a whole copy would not: the fill fails, is emptied again but
    for the tail, and the copy keeps reading its lower data."""
    u = make_union(("up", "rw"), ("low", "ro+wh"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", u["up"]], check=True)
    try:
        lower = _lower(u["low"], "big", os.urandom(BIG))
        before = tree(u["low"])
        u.expected_log.append("cannot fill a metadata-only copy (No space left on device)")
        u.mount()
        _append(u / "big", b"tail")
        deadline = time.monotonic() + 10
        while "No space left" not in u.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (u / "big").read_bytes() == lower + b"tail"
        u.umount()
        up = u["up"] / "big"
        assert origin_mark(up) == b"big" and os.lstat(up).st_blocks * 512 <= 4096
        with open(up, "rb") as f:
            f.seek(BIG)
            assert f.read() == b"tail"
        u.mount("metacopy")
        assert (u / "big").read_bytes() == lower + b"tail"
        u.umount()
        assert tree(u["low"]) == before
    finally:
        subprocess.run(["umount", "-l", u["up"]], capture_output=True)


def test_an_append_without_fsetid_drops_set_id_bits_and_copies_no_data(shared_union, test_user):
    union = shared_union
    uid, gid = test_user
    data = os.urandom(100_000)
    p = union["low"] / "tool"
    p.write_bytes(data)
    os.chown(p, uid, gid)
    os.chmod(p, 0o6755)
    union.mount("metacopy")

    def append():
        with open(union / "tool", "ab") as f:
            f.write(b"+")

    assert as_user(uid, gid, append) == 0
    assert stat.S_IMODE(os.stat(union / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(union["up"] / "tool").st_mode) == 0o755
    assert origin_mark(union["up"] / "tool") == b"tool"  # (dropping the bits needs no data)
    assert (union / "tool").read_bytes() == data + b"+"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o6755 and p.read_bytes() == data
