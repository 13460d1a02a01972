"""Copy-up: a change to a lower entry copies it to the writable branch with everything kept."""

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest


def _lower_file(union, rel="d/f", data=b"lower data"):
    p = union["low"] / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_write_copies_up_and_keeps_lower(union):
    low = _lower_file(union)
    union.mount()
    with open(union / "d/f", "r+b") as f:  # (an append needs no data: see test_appends)
        f.seek(6)
        f.write(b"DATA + more")
    assert (union / "d/f").read_bytes() == b"lower DATA + more"
    assert (union["up"] / "d/f").read_bytes() == b"lower DATA + more"
    assert low.read_bytes() == b"lower data"


def test_copy_up_keeps_metadata(union):
    low = _lower_file(union)
    os.chmod(low.parent, 0o751)
    os.chown(low.parent, 1234, 4321)
    os.utime(low.parent, ns=(1_000_000_000, 2_000_000_000))
    os.chmod(low, 0o640)
    os.chown(low, 4242, 2424)
    os.setxattr(low, "user.colour", b"blue")
    os.utime(low, ns=(3_000_000_000, 4_000_000_000))
    union.mount()
    os.setxattr(union / "d/f", "user.size", b"big")  # a change that is not a data write
    up = os.lstat(union["up"] / "d/f")
    assert (stat.S_IMODE(up.st_mode), up.st_uid, up.st_gid) == (0o640, 4242, 2424)
    assert up.st_mtime_ns == 4_000_000_000
    assert os.getxattr(union["up"] / "d/f", "user.colour") == b"blue"
    assert os.getxattr(union["up"] / "d/f", "user.size") == b"big"
    dup = os.lstat(union["up"] / "d")  # the parent, created with its own metadata
    assert (stat.S_IMODE(dup.st_mode), dup.st_uid, dup.st_gid) == (0o751, 1234, 4321)
    assert dup.st_mtime_ns == 2_000_000_000
    assert os.getxattr(union / "d/f", "user.colour") == b"blue"
    assert not os.path.exists(low.parent / "f.user.size")
    assert "user.size" not in os.listxattr(low)


def test_copy_up_keeps_holes(union):
    low = union["low"] / "sparse"
    with open(low, "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
        f.seek(0)
        f.write(b"start")
    union.mount()
    with open(union / "sparse", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"mid")
    up = union["up"] / "sparse"
    assert os.path.getsize(up) == (64 << 20) + 3
    assert os.stat(up).st_blocks * 512 < 4 << 20, "holes were filled in"
    with open(up, "rb") as f:
        assert f.read(5) == b"start"
        f.seek(1 << 20)
        assert f.read(3) == b"mid"
        f.seek(64 << 20)
        assert f.read() == b"end"


@pytest.fixture
def tmpfs_dir():
    """A directory on tmpfs: another filesystem than the tests' temporary directory."""
    path = tempfile.mkdtemp(dir="/dev/shm")
    yield Path(path)
    shutil.rmtree(path)


def test_copy_up_from_another_filesystem(make_union, tmpfs_dir):
    """A lower branch on tmpfs over an upper one on disk: copy_file_range refuses (EXDEV), so
    the data goes by sendfile; every byte and the holes arrive, the lower file is untouched."""
    base = tmpfs_dir / "low"
    base.mkdir()
    data = os.urandom(3 << 20)
    with open(base / "f", "wb") as f:
        f.write(data[:1 << 20])
        f.seek(9 << 20)  # a hole of 8 MiB
        f.write(data[1 << 20:])
    u = make_union(("up", "rw"), ("low", "ro+wh"))
    os.rmdir(u["low"])
    os.symlink(base, u["low"])
    u.mount()
    with open(u / "f", "r+b") as f:  # (an append needs no data: see test_appends)
        f.seek((11 << 20) - 1)
        f.write(b"+")
    expected = data[:1 << 20] + bytes(8 << 20) + data[1 << 20:-1] + b"+"
    assert (u / "f").read_bytes() == expected
    up = u["up"] / "f"
    assert up.read_bytes() == expected
    assert os.stat(up).st_blocks * 512 < 6 << 20, "the hole was filled in"
    assert (base / "f").stat().st_size == 11 << 20
    assert (base / "f").read_bytes() == data[:1 << 20] + bytes(8 << 20) + data[1 << 20:]


def test_copy_up_symlink_fifo_and_device(union):
    os.symlink("../target", union["low"] / "link")
    os.mknod(union["low"] / "fifo", stat.S_IFIFO | 0o620)
    os.chmod(union["low"] / "fifo", 0o620)
    os.mknod(union["low"] / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    union.mount()
    for name in ("link", "fifo", "null"):
        os.chown(union / name, 77, 88, follow_symlinks=False)
    assert os.readlink(union["up"] / "link") == "../target"
    assert os.readlink(union / "link") == "../target"
    st = os.lstat(union["up"] / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    st = os.lstat(union["up"] / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert all(os.lstat(union["up"] / n).st_uid == 77 for n in ("link", "fifo", "null"))
    assert os.lstat(union["low"] / "null").st_uid == 0


@pytest.mark.parametrize("change", [
    lambda p: os.truncate(p, 3),
    lambda p: os.chmod(p, 0o600),
    lambda p: os.chown(p, 5, 6),
    lambda p: os.utime(p, (1, 2)),
    lambda p: os.setxattr(p, "user.a", b"1"),
])
def test_every_kind_of_change_copies_up(union, change):
    _lower_file(union, "f")
    os.setxattr(union["low"] / "f", "user.b", b"2")
    union.mount()
    change(union / "f")
    assert (union["up"] / "f").exists()
    assert (union["low"] / "f").read_bytes() == b"lower data"
    assert os.getxattr(union["low"] / "f", "user.b") == b"2"


def test_remove_xattr_copies_up(union):
    _lower_file(union, "f")
    os.setxattr(union["low"] / "f", "user.b", b"2")
    union.mount()
    os.removexattr(union / "f", "user.b")
    assert "user.b" not in os.listxattr(union / "f")
    assert os.getxattr(union["low"] / "f", "user.b") == b"2"


def test_no_temporary_left_after_copy_up(union):
    _lower_file(union, "a/b/c/f")
    union.mount()
    (union / "a/b/c/f").write_text("new")
    work = union["up"] / ".wh..wh.pyunion"
    assert os.listdir(work) == []
    union.umount()
    assert not work.exists(), "the work area is removed at unmount"


def test_read_only_open_does_not_copy_up(union):
    _lower_file(union, "f")
    union.mount()
    assert (union / "f").read_bytes() == b"lower data"
    os.stat(union / "f")
    assert not (union["up"] / "f").exists()


def test_mmap_write_through_copy_up(union):
    import mmap
    _lower_file(union, "m", b"0123456789")
    union.mount()
    with open(union / "m", "r+b") as f:
        with mmap.mmap(f.fileno(), 10) as m:
            m[0:3] = b"abc"
            m.flush()
    assert (union / "m").read_bytes() == b"abc3456789"
    union.umount()
    assert (union["up"] / "m").read_bytes() == b"abc3456789"
    assert (union["low"] / "m").read_bytes() == b"0123456789"


def test_truncating_changes_copy_only_what_survives(union):
    data = os.urandom(4 << 20)
    for name in ("t1", "t2"):
        (union["low"] / name).write_bytes(data)
        os.chmod(union["low"] / name, 0o604)
    union.mount()
    with open(union / "t1", "wb") as f:  # O_TRUNC
        f.write(b"fresh")
    os.truncate(union / "t2", 1000)
    assert (union / "t1").read_bytes() == b"fresh"
    assert (union / "t2").read_bytes() == data[:1000]
    assert (union["up"] / "t2").read_bytes() == data[:1000]
    assert stat.S_IMODE(os.stat(union["up"] / "t1").st_mode) == 0o604
    assert (union["low"] / "t1").read_bytes() == data


def test_write_to_an_open_lower_file_after_its_name_went(union):
    """POSIX: an open file outlives its name. The first write to a lower file that was unlinked
    (or replaced) while open still copies it up, into an unlinked file that reads back."""
    low = _lower_file(union, "f", b"lower data")
    _lower_file(union, "g", b"other")
    union.mount()
    with open(union / "f", "r+b") as f, open(union / "g", "r+b") as g:
        os.unlink(union / "f")
        os.rename(union / "g", union / "h")
        (union / "g").write_bytes(b"a new g")
        f.seek(0, os.SEEK_END)
        f.write(b" + more")
        f.flush()
        g.write(b"O")
        g.flush()
        f.seek(0)
        assert f.read() == b"lower data + more"
        assert os.fstat(f.fileno()).st_size == len(b"lower data + more")
        g.seek(0)
        assert g.read() == b"Other"
        assert (union / "h").read_bytes() == b"Other"
        assert (union / "g").read_bytes() == b"a new g"
        assert not (union / "f").exists()
    assert low.read_bytes() == b"lower data"
    assert (union["low"] / "g").read_bytes() == b"other"
    assert not (union["up"] / "f").exists()
    assert (union["up"] / ".wh.f").exists()
    assert (union["up"] / "g").read_bytes() == b"a new g"
    union.umount()
    assert not any(p.is_file() for p in (union["up"] / ".wh..wh.pyunion").rglob("*")), \
        "a copy-up left its work file behind"


def test_xattrs_of_an_open_file_whose_name_went(union):
    """fgetxattr/flistxattr on an open file answer from the file itself after an unlink."""
    low = _lower_file(union, "f", b"data")
    os.setxattr(low, "user.kept", b"yes")
    union.mount()
    with open(union / "f", "r+b") as f:
        f.write(b"D")  # copied up: the data now lives in the writable branch
        f.flush()
        os.unlink(union / "f")
        assert os.getxattr(f.fileno(), "user.kept") == b"yes"
        assert os.listxattr(f.fileno()) == ["user.kept"]
        with pytest.raises(OSError) as e:
            os.getxattr(f.fileno(), "user.absent")
        assert e.value.errno == errno.ENODATA
    assert os.getxattr(low, "user.kept") == b"yes"


@pytest.mark.parametrize("where", ["up", "low"])
def test_attribute_changes_of_an_open_file_whose_name_went(union, where):
    """fchmod, fchown, futimens and ftruncate work on an open file after its unlink, as on a
    local filesystem; a lower file is changed only in its copy."""
    low = _lower_file(union, "f", b"lower data") if where == "low" else None
    if where == "up":
        (union["up"] / "f").write_bytes(b"upper data")
    union.mount()
    with open(union / "f", "r+b") as f:
        f.write(b"L")
        f.flush()
        os.unlink(union / "f")
        fd = f.fileno()
        os.fchmod(fd, 0o640)
        os.chown(fd, 123, 456)
        os.ftruncate(fd, 4)
        os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 123, 456)
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_size) == (1_000_000_000, 2_000_000_000, 4)
        f.seek(0)
        assert f.read() == (b"Lowe" if where == "low" else b"Lppe")
    assert not (union / "f").exists() and not (union["up"] / "f").exists()
    if low is not None:
        assert low.read_bytes() == b"lower data"
        assert stat.S_IMODE(low.stat().st_mode) != 0o640 and low.stat().st_uid == 0


@pytest.mark.parametrize("sendfile", [True, False])
def test_copy_data_across_filesystems(tmpfs_dir, tmp_path, monkeypatch, sendfile):
    """The copy engine between filesystems, by sendfile and by its read-write fallback (for
    filesystems sendfile refuses): data and holes as in the source."""
    from unionfs import syscalls

    monkeypatch.setattr(syscalls, "_have_sendfile", sendfile)
    src_path = tmpfs_dir / "src"
    data = os.urandom((2 << 20) + 5)
    with open(src_path, "wb") as f:
        f.write(data[:4096])
        f.seek(4 << 20)
        f.write(data[4096:])
    size = src_path.stat().st_size
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        syscalls.copy_data(src, dst, size, writeback=True)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == src_path.read_bytes()
    assert os.stat(tmp_path / "dst").st_blocks * 512 < 4 << 20, "the hole was filled in"
