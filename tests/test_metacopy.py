"""Metadata-only copy-ups (-o metacopy): a chown, chmod, utimes or xattr change of a lower file
copies no data; the data is read from the lower file until a write fills the copy in place."""

import errno
import os
import stat
import subprocess
import time

import pytest

from conftest import kill_while_writing, origin_mark, tree
from unionfs.metacopy import MARKER

BIG = 3 << 20  # written in a worker thread when filled (see unionfs.fs.THREAD_COPY_BYTES)


def _lower(union, rel, data):
    p = union["low"] / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    return p


@pytest.mark.parametrize("extras", [True, False], ids=["session", "noextras"])
def test_metadata_changes_copy_no_data(union, extras):
    data = os.urandom(BIG)
    _lower(union, "d/big", data)
    _lower(union, "d/small", b"small file\n")
    _lower(union, "top", b"at the root\n")
    before = tree(union["low"])
    union.mount("metacopy", *(() if extras else ("noextras",)))
    os.chmod(union / "d/big", 0o600)
    os.chown(union / "d/small", 1234, 4321)
    os.utime(union / "top", ns=(5_000_000_000, 6_000_000_000))
    os.setxattr(union / "d/small", "user.colour", b"blue")

    up = union["up"]
    for rel, size in (("d/big", BIG), ("d/small", 11), ("top", 12)):
        st = os.lstat(up / rel)
        assert st.st_size == size and st.st_blocks == 0, rel  # no data in the branch
        assert origin_mark(up / rel) == rel.encode()
        # the mount shows the data, and the lower file's block count
        assert os.lstat(union / rel).st_blocks == os.lstat(union["low"] / rel).st_blocks > 0
    assert (union / "d/big").read_bytes() == data
    assert (union / "d/small").read_bytes() == b"small file\n"
    assert stat.S_IMODE(os.stat(union / "d/big").st_mode) == 0o600
    small = os.stat(union / "d/small")
    assert (small.st_uid, small.st_gid) == (1234, 4321)
    assert os.stat(union / "top").st_mtime_ns == 6_000_000_000
    assert os.getxattr(union / "d/small", "user.colour") == b"blue"
    assert MARKER.decode() not in os.listxattr(union / "d/small")  # never shows
    with pytest.raises(PermissionError):
        os.setxattr(union / "d/small", MARKER, b"etc/passwd")

    union.remount()  # found again from the branch alone
    assert (union / "d/big").read_bytes() == data
    assert os.lstat(union / "d/big").st_blocks == os.lstat(union["low"] / "d/big").st_blocks
    assert stat.S_IMODE(os.stat(union / "d/big").st_mode) == 0o600
    assert tree(union["low"]) == before


@pytest.mark.parametrize("how", ["overwrite", "trunc_open", "truncate"])
def test_a_write_fills_the_copy_in_place(union, how):
    data = os.urandom(BIG)
    _lower(union, "d/f", data)
    before = tree(union["low"])
    union.mount("metacopy")
    os.chmod(union / "d/f", 0o4755)
    os.utime(union / "d/f", ns=(7_000_000_000, 8_000_000_000))
    ino = os.lstat(union["up"] / "d/f").st_ino
    reader = open(union / "d/f", "rb", buffering=0)  # reads the lower file's data until the fill
    assert reader.read(10) == data[:10]
    if how == "overwrite":  # (an append needs no data: see test_appends)
        with open(union / "d/f", "r+b") as f:
            f.seek(100)
            f.write(b"XYZ")
        want = data[:100] + b"XYZ" + data[103:]
    elif how == "trunc_open":
        with open(union / "d/f", "wb") as f:
            f.write(b"new")
        want = b"new"
    else:
        os.truncate(union / "d/f", 1000)
        want = data[:1000]
    assert (union / "d/f").read_bytes() == want
    assert reader.read() == want[10:]
    reader.close()
    path = union["up"] / "d/f"
    st = os.lstat(path)
    assert st.st_ino == ino  # filled in place: its links and inode stay
    assert path.read_bytes() == want and origin_mark(path) is None
    assert st.st_blocks * 512 >= len(want)
    assert stat.S_IMODE(st.st_mode) == 0o4755  # (root wrote it: the set-id bit stays)
    union.remount()
    assert (union / "d/f").read_bytes() == want
    assert tree(union["low"]) == before


def test_renamed_copies_read_their_lower_file(union):
    a, b = os.urandom(100_000), os.urandom(70_000)
    _lower(union, "d/a", a)
    _lower(union, "d/sub/b", b)
    before = tree(union["low"])
    union.mount("metacopy")
    os.chmod(union / "d/a", 0o640)
    os.rename(union / "d/a", union / "moved")
    (union / "d/a").write_bytes(b"a new file where the old one was")
    os.chown(union / "d/sub/b", 55, 55)
    os.rename(union / "d", union / "e")  # the directory's tree is copied up and moves
    os.chmod(union / "e/sub", 0o700)
    for _ in range(2):
        assert (union / "moved").read_bytes() == a
        assert (union / "e/a").read_bytes() == b"a new file where the old one was"
        assert (union / "e/sub/b").read_bytes() == b
        assert os.stat(union / "e/sub/b").st_uid == 55
        assert not (union / "d").exists()
        union.remount()
    assert origin_mark(union["up"] / "moved") == b"d/a"
    assert origin_mark(union["up"] / "e/sub/b") == b"d/sub/b"
    assert os.lstat(union["up"] / "moved").st_blocks == 0
    with open(union / "moved", "r+b") as f:
        f.write(b"!")
    assert (union / "moved").read_bytes() == b"!" + a[1:]
    assert (union["up"] / "moved").read_bytes() == b"!" + a[1:]
    assert tree(union["low"]) == before


def test_which_changes_copy_data(union):
    _lower(union, "linked", b"two names")
    os.link(union["low"] / "linked", union["low"] / "other")
    _lower(union, "empty", b"")
    _lower(union, "plain", b"plain data")
    _lower(union, "written", b"written data")
    union.mount("metacopy")
    os.chmod(union / "linked", 0o600)  # hard-linked below: a whole copy, in the index
    os.chmod(union / "empty", 0o600)  # nothing to leave below
    with open(union / "written", "r+b") as f:  # a write: a whole copy
        f.write(b"W")
    os.chmod(union / "plain", 0o600)
    for rel, meta in (("linked", False), ("empty", False), ("written", False), ("plain", True)):
        assert (origin_mark(union["up"] / rel) is not None) == meta, rel
    assert (union["up"] / "linked").read_bytes() == b"two names"
    assert stat.S_IMODE(os.stat(union / "other").st_mode) == 0o600
    assert (union / "written").read_bytes() == b"Written data"


def test_metacopy_off_copies_carry_their_data(union):
    _lower(union, "f", b"data")
    union.mount("metacopy=off")
    os.chmod(union / "f", 0o600)
    assert origin_mark(union["up"] / "f") is None
    assert (union["up"] / "f").read_bytes() == b"data"


def test_a_lower_file_that_went_while_open_keeps_its_data(union):
    _lower(union, "f", b"held open")
    union.mount("metacopy")
    fd = os.open(union / "f", os.O_RDONLY)
    try:
        os.unlink(union / "f")
        os.fchmod(fd, 0o600)  # a copy with no name: it cannot find its lower file by one
        assert os.pread(fd, 100, 0) == b"held open"
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)
    assert not (union / "f").exists()
    assert (union["low"] / "f").read_bytes() == b"held open"


def test_stacked_copies_lead_down_to_the_data(make_union):
    """A writable branch holding metadata-only copies, used as a lower branch of another
    union (a committed container layer, say): reads and copy-ups follow it to the data."""
    u = make_union(("top", "rw"), ("mid", "ro+wh"), ("low", "ro+wh"))
    data = os.urandom(50_000)
    _lower(u, "f", data)
    first = make_union(("mid", "rw"), ("low", "ro+wh"))  # (the same directories)
    first.mount("metacopy")
    os.chmod(first / "f", 0o640)
    first.umount()
    assert origin_mark(u["mid"] / "f") == b"f"

    u.mount("metacopy")
    assert (u / "f").read_bytes() == data
    assert os.lstat(u / "f").st_blocks == os.lstat(u["low"] / "f").st_blocks
    os.chown(u / "f", 7, 7)  # a copy of a copy: still no data
    assert origin_mark(u["top"] / "f") == b"f"
    assert (u / "f").read_bytes() == data
    u.remount()
    assert (u / "f").read_bytes() == data
    with open(u / "f", "r+b") as f:
        f.write(b"+")
    assert (u["top"] / "f").read_bytes() == b"+" + data[1:]
    assert origin_mark(u["mid"] / "f") == b"f" and (u["low"] / "f").read_bytes() == data


def test_a_copy_whose_data_is_gone_answers_eio(union):
    _lower(union, "f", b"data")
    union.mount("metacopy")
    os.chmod(union / "f", 0o600)
    union.umount()
    (union["low"] / "f").unlink()  # someone edits a lower branch behind the union's back
    union.expected_log.append("a metadata-only copy of")
    union.mount("metacopy")
    assert os.stat(union / "f").st_size == 4
    with pytest.raises(OSError) as e:
        (union / "f").read_bytes()
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        with open(union / "f", "ab") as f:
            f.write(b"x")
    assert e.value.errno == errno.EIO
    assert origin_mark(union["up"] / "f") == b"f"  # left as it was
    os.unlink(union / "f")
    assert not (union / "f").exists()


def test_a_killed_fill_leaves_the_lower_data_showing(union):
    """SIGKILL while a big file is being filled: the copy still reads its lower data."""
    chunk = os.urandom(1 << 20)
    with open(union["low"] / "big", "wb") as f:
        for _ in range(512):
            f.write(chunk)
    union.mount("metacopy")
    os.chmod(union / "big", 0o600)
    up = union["up"] / "big"

    def meanwhile():  # (until the fill has begun)
        deadline = time.monotonic() + 60
        while os.lstat(up).st_blocks == 0 and time.monotonic() < deadline:
            time.sleep(0.002)

    kill_while_writing(union, "big", meanwhile)
    filled = origin_mark(up) is None
    assert not filled, "the fill was over before the kill: nothing was tested"
    union.mount("metacopy")
    with open(union / "big", "rb") as f:
        for _ in range(512):
            assert f.read(len(chunk)) == chunk
        assert f.read() == b""
    assert stat.S_IMODE(os.stat(union / "big").st_mode) == 0o600
    assert os.path.getsize(union["low"] / "big") == 512 << 20


def test_full_disk_during_a_fill_keeps_the_lower_data(make_union):
    u = make_union(("up", "rw"), ("low", "ro+wh"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", u["up"]], check=True)
    try:
        data = os.urandom(3 << 20)
        (u["low"] / "big").write_bytes(data)
        u.mount("metacopy")
        os.chmod(u / "big", 0o600)  # fits: no data
        with pytest.raises(OSError) as e:
            with open(u / "big", "r+b") as f:  # (an append needs no data: see test_appends)
                f.write(b"more")
        assert e.value.errno == errno.ENOSPC
        assert (u / "big").read_bytes() == data
        assert origin_mark(u["up"] / "big") == b"big" and os.lstat(u["up"] / "big").st_blocks == 0
        u.umount()
    finally:
        subprocess.run(["umount", "-l", u["up"]], capture_output=True)


def _daemon_file(union, name: str) -> os.stat_result:
    """The attributes of the file the daemon holds open whose path ends with NAME."""
    pid = union.daemon_pid()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.endswith(name):
            return os.stat(f"/proc/{pid}/fd/{fd}")
    raise AssertionError(f"the daemon holds no {name}")


@pytest.mark.parametrize("how", ["unlink", "renamed_over"])
def test_removing_a_copy_held_open_copies_no_data(union, how):
    """A metadata-only copy that goes while the kernel holds it is kept open as it is, not
    filled first (rm -rf after chown -R would copy every file); it fills only if written."""
    data = os.urandom(BIG)
    _lower(union, "f", data)
    before = tree(union["low"])
    union.mount("metacopy")
    os.chmod(union / "f", 0o600)
    fd = os.open(union / "f", os.O_RDWR)
    try:
        if how == "unlink":
            os.unlink(union / "f")
            assert not (union / "f").exists()
        else:
            (union / "g").write_bytes(b"the new file")
            os.rename(union / "g", union / "f")
            assert (union / "f").read_bytes() == b"the new file"
        held = _daemon_file(union, "/up/f (deleted)")
        assert held.st_size == BIG and held.st_blocks == 0  # not filled
        assert os.pread(fd, BIG, 0) == data
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o600
        # (the lower file's blocks, as before it went: the data the copy reads)
        assert st.st_blocks == os.lstat(union["low"] / "f").st_blocks > 0
        os.fchmod(fd, 0o640)
        os.pwrite(fd, b"XY", 10)  # fills the file the name had, through its fd
        assert os.pread(fd, BIG, 0) == data[:10] + b"XY" + data[12:]
        held = _daemon_file(union, "/up/f (deleted)")
        assert held.st_blocks * 512 >= BIG and stat.S_IMODE(held.st_mode) == 0o640
    finally:
        os.close(fd)
    if how == "renamed_over":
        assert (union / "f").read_bytes() == b"the new file"
        assert (union["up"] / "f").read_bytes() == b"the new file"
    assert tree(union["low"]) == before


def test_kernel_overlayfs_metadata_only_copies_in_lower_branches(make_union, tmp_path):
    """An upper directory that kernel overlayfs filled with metadata-only copies (metacopy=on,
    as containers-storage may use it), stacked as a lower branch: its copies read the data
    of the lower file, found again where they were moved (overlay.redirect)."""
    u = make_union(("up", "rw"), ("ovl", "ro+wh"), ("low", "ro+wh"))
    data = os.urandom(50_000)
    _lower(u, "f", data)
    _lower(u, "d/g", b"small\n")
    ovl = tmp_path / "ovl-mnt"
    work = tmp_path / "ovl-work"
    ovl.mkdir()
    work.mkdir()
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={u['low']},upperdir={u['ovl']},workdir={work},"
                        "metacopy=on,redirect_dir=on", ovl], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"kernel overlayfs with metacopy unavailable: {r.stderr.strip()}")
    try:
        os.chown(ovl / "f", 7, 7)
        os.chmod(ovl / "d/g", 0o600)
        os.rename(ovl / "d/g", ovl / "g2")
    finally:
        subprocess.run(["umount", ovl], check=True)
    assert "trusted.overlay.metacopy" in os.listxattr(u["ovl"] / "g2")
    assert os.lstat(u["ovl"] / "f").st_size == 50_000
    before = tree(u["low"])

    u.mount("metacopy")
    assert (u / "f").read_bytes() == data and os.stat(u / "f").st_uid == 7
    assert (u / "g2").read_bytes() == b"small\n"
    assert stat.S_IMODE(os.stat(u / "g2").st_mode) == 0o600
    os.chmod(u / "f", 0o640)  # a copy of overlayfs' copy: no data either
    assert origin_mark(u["up"] / "f") == b"f" and os.lstat(u["up"] / "f").st_blocks == 0
    u.remount()
    assert (u / "f").read_bytes() == data
    with open(u / "g2", "r+b") as f:  # a whole copy, its data from the lowest branch
        f.write(b"S")
    assert (u["up"] / "g2").read_bytes() == b"Small\n"
    assert "trusted.overlay.metacopy" not in os.listxattr(u["up"] / "g2")
    assert tree(u["low"]) == before


@pytest.mark.parametrize("origin", [b"/etc/passwd", b"../low/f", b"f\0x", b"nowhere"])
def test_a_mark_naming_no_file_below_answers_eio(make_union, origin):
    """A branch used as it is may carry any mark: one that names no file below the branch
    root reads as an I/O error (logged), never as another file or as zeros."""
    u = make_union(("up", "rw"), ("mid", "ro+wh"), ("low", "ro+wh"))
    _lower(u, "f", b"lower data")
    with open(u["mid"] / "f", "wb") as f:
        f.truncate(10)
    os.setxattr(u["mid"] / "f", MARKER, origin)
    u.expected_log.append("a metadata-only copy of")
    u.mount()
    with pytest.raises(OSError) as e:
        (u / "f").read_bytes()
    assert e.value.errno == errno.EIO
    assert os.stat(u / "f").st_size == 10
