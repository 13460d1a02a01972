"""Deletion (whiteouts, rmdir, opaque re-creation) and rename, including merged directories."""

import ctypes
import errno
import os
import shutil
import stat
import subprocess

import pytest

from conftest import wait_filled
from unionfs.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE

libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old, new, flags):
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _bytes_written(pid: int) -> int:
    """What process PID has written so far, by any write call (sendfile included)."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


@pytest.mark.parametrize("opts", [(), ("writeback",)])
def test_removing_lower_files_copies_nothing_up(union, opts):
    """Removing lower files the kernel holds copies none of their data, with or without the
    writeback cache (which sends the times of every removed file as it drops it); a file
    that is still open sees the times set on it after its name went."""
    data = os.urandom(16 << 20)
    for name in ("a", "b", "kept"):
        (union["low"] / name).write_bytes(data)
    os.utime(union["low"] / "kept", ns=(5 * 10**9, 6 * 10**9))
    union.mount(*opts)
    assert sorted(os.listdir(union.mnt)) == ["a", "b", "kept"]
    assert all(os.stat(union / n).st_size == len(data) for n in ("a", "b", "kept"))
    before = _bytes_written(union.daemon_pid())
    with open(union / "kept", "rb") as kept:
        os.unlink(union / "a")
        os.unlink(union / "b")
        os.unlink(union / "kept")
        os.utime(kept.fileno(), ns=(10**9, 2 * 10**9))
        st = os.fstat(kept.fileno())
        assert (st.st_atime_ns, st.st_mtime_ns) == (10**9, 2 * 10**9)
        assert kept.read(4) == data[:4]
    subprocess.run(["sync"], check=True)
    assert _bytes_written(union.daemon_pid()) - before < len(data) // 4
    assert os.listdir(union.mnt) == []
    assert sorted(os.listdir(union["up"])) == [".wh..wh.pyunion", ".wh.a", ".wh.b", ".wh.kept"]
    for name in ("a", "b", "kept"):
        assert (union["low"] / name).read_bytes() == data
    assert os.stat(union["low"] / "kept").st_mtime_ns == 6 * 10**9


def test_unlink_lower_leaves_whiteout(union):
    (union["low"] / "f").write_text("x")
    union.mount()
    os.unlink(union / "f")
    assert not (union / "f").exists()
    assert (union["up"] / ".wh.f").exists()
    assert (union["low"] / "f").read_text() == "x"
    union.remount()
    assert not (union / "f").exists() and os.listdir(union.mnt) == []


def test_whiteouts_share_one_inode_and_the_work_area_goes_at_unmount(union):
    """Whiteout files are links of one empty file in the work area (no inode each), in every
    directory; unmounting removes the shared file with the work area; after a remount the
    old whiteouts still hide, and new ones link a new shared file."""
    for d in ("", "d/", "d/e/"):
        (union["low"] / d).mkdir(exist_ok=True)
        for name in ("a", "b", "c"):
            (union["low"] / f"{d}{name}").write_text(name)
    union.mount()
    for d in ("", "d/", "d/e/"):
        for name in ("a", "b"):
            os.unlink(union / f"{d}{name}")
    first = [os.lstat(union["up"] / f"{d}.wh.{n}") for d in ("", "d/", "d/e/") for n in "ab"]
    assert {(st.st_dev, st.st_ino) for st in first} == {(first[0].st_dev, first[0].st_ino)}
    assert all(stat.S_ISREG(st.st_mode) and st.st_size == 0 for st in first)
    assert os.lstat(union["up"] / ".wh..wh.pyunion" / "whiteout").st_ino == first[0].st_ino
    union.umount()
    assert sorted(os.listdir(union["up"])) == [".wh.a", ".wh.b", "d"]
    assert os.lstat(union["up"] / ".wh.a").st_nlink == 6
    union.mount()
    assert sorted(os.listdir(union.mnt)) == ["c", "d"] and os.listdir(union / "d/e") == ["c"]
    os.unlink(union / "c")
    assert os.lstat(union["up"] / ".wh.c").st_ino != first[0].st_ino
    assert os.lstat(union["up"] / ".wh.c").st_nlink == 2
    assert (union["low"] / "c").read_text() == "c" and (union["low"] / "d/e/a").read_text() == "a"


def test_unlink_upper_only_leaves_no_whiteout(union):
    union.mount()
    (union / "new").write_text("n")
    os.unlink(union / "new")
    assert os.listdir(union["up"]) == [".wh..wh.pyunion"] or os.listdir(union["up"]) == []


def test_unlink_copied_up_file_whiteouts_lower(union):
    (union["low"] / "f").write_text("x")
    union.mount()
    (union / "f").write_text("changed")
    os.unlink(union / "f")
    assert not (union / "f").exists()
    assert not (union["up"] / "f").exists() and (union["up"] / ".wh.f").exists()


def test_rmdir_requires_empty_merged_view(union):
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("x")
    union.mount()
    with pytest.raises(OSError) as e:
        os.rmdir(union / "d")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(union / "d" / "f")
    os.rmdir(union / "d")
    assert not (union / "d").exists()
    assert (union["up"] / ".wh.d").exists() and not (union["up"] / "d").exists()
    assert (union["low"] / "d" / "f").exists()


def test_recreated_directory_is_opaque(union):
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "old").write_text("x")
    union.mount()
    os.unlink(union / "d" / "old")
    os.rmdir(union / "d")
    os.mkdir(union / "d")
    assert os.listdir(union / "d") == []
    assert (union["up"] / "d" / ".wh..wh..opq").exists()
    assert not (union["up"] / ".wh.d").exists()
    union.remount()
    assert os.listdir(union / "d") == []


def test_recreated_file_replaces_whiteout(union):
    (union["low"] / "f").write_text("old")
    union.mount()
    os.unlink(union / "f")
    (union / "f").write_text("new")
    assert (union / "f").read_text() == "new"
    assert not (union["up"] / ".wh.f").exists()


def test_rename_lower_file(union):
    (union["low"] / "a").write_text("A")
    union.mount()
    os.rename(union / "a", union / "b")
    assert (union / "b").read_text() == "A" and not (union / "a").exists()
    assert wait_filled(union["up"]) == []
    assert (union["up"] / ".wh.a").exists() and (union["up"] / "b").read_text() == "A"
    assert (union["low"] / "a").read_text() == "A"


def test_rename_merged_directory(union):
    for b, names in (("up", ["u1"]), ("low", ["l1", "sub/l2"])):
        (union[b] / "d" / "sub").mkdir(parents=True)
        for n in names:
            (union[b] / "d" / n).write_text(n)
    (union["low"] / "elsewhere").mkdir()
    (union["low"] / "elsewhere" / "x").write_text("x")
    union.mount()
    os.rename(union / "d", union / "elsewhere2")
    assert sorted(os.listdir(union / "elsewhere2")) == ["l1", "sub", "u1"]
    assert (union / "elsewhere2" / "sub" / "l2").read_text() == "sub/l2"
    assert not (union / "d").exists()
    # renaming onto an empty lower directory: its hidden content must not show through
    os.unlink(union / "elsewhere" / "x")
    os.rename(union / "elsewhere2", union / "elsewhere")
    assert sorted(os.listdir(union / "elsewhere")) == ["l1", "sub", "u1"]
    union.remount()
    assert sorted(os.listdir(union / "elsewhere")) == ["l1", "sub", "u1"]
    assert not (union / "d").exists() and not (union / "elsewhere2").exists()
    assert (union["low"] / "d" / "sub" / "l2").exists()


def test_mv_lower_directory_with_shell_tools(union):
    (union["low"] / "pkg" / "lib").mkdir(parents=True)
    (union["low"] / "pkg" / "lib" / "mod.py").write_text("code")
    union.mount()
    import subprocess
    subprocess.run(["mv", union / "pkg", union / "pkg.old"], check=True)
    assert (union / "pkg.old" / "lib" / "mod.py").read_text() == "code"


def test_rename_noreplace(union):
    (union["low"] / "a").write_text("A")
    (union["low"] / "b").write_text("B")
    union.mount()
    with pytest.raises(OSError) as e:
        renameat2(union / "a", union / "b", RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    renameat2(union / "a", union / "c", RENAME_NOREPLACE)
    assert (union / "c").read_text() == "A"


def test_rename_exchange(union):
    (union["low"] / "a").write_text("A")
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "inner").write_text("i")
    union.mount()
    renameat2(union / "a", union / "d", RENAME_EXCHANGE)
    assert (union / "d").read_text() == "A"
    assert (union / "a" / "inner").read_text() == "i"
    union.remount()
    assert (union / "d").read_text() == "A" and os.listdir(union / "a") == ["inner"]


def test_rename_exchange_of_two_directories_the_kernel_knows(union):
    """Both subtrees change places, also for the inodes the kernel already holds: each child
    is found, read, changed and created under its new path (found by the differential test:
    both subtrees ended up under the first directory's old path)."""
    for d, sub in (("p", "x"), ("q", "y")):
        (union["low"] / d / sub).mkdir(parents=True)
        (union["low"] / d / sub / "f").write_text(d)
    union.mount()
    for d, sub in (("p", "x"), ("q", "y")):  # the kernel looks them all up first
        assert (union / d / sub / "f").read_text() == d
    renameat2(union / "p", union / "q", RENAME_EXCHANGE)
    assert (union / "q" / "x" / "f").read_text() == "p"
    assert (union / "p" / "y" / "f").read_text() == "q"
    (union / "q" / "x" / "f").write_text("changed p")
    (union / "p" / "y" / "new").write_text("new in q")
    os.setxattr(union / "p" / "y" / "f", "user.k", b"v")
    assert sorted(os.listdir(union / "q" / "x")) == ["f"]
    assert sorted(os.listdir(union / "p" / "y")) == ["f", "new"]
    union.remount()
    assert (union / "q" / "x" / "f").read_text() == "changed p"
    assert (union / "p" / "y" / "new").read_text() == "new in q"
    assert os.getxattr(union / "p" / "y" / "f", "user.k") == b"v"
    assert (union["low"] / "p" / "x" / "f").read_text() == "p"  # the lower branch as it was
    assert (union["low"] / "q" / "y" / "f").read_text() == "q"


def test_rename_over_non_empty_directory_fails(union):
    (union["low"] / "a").mkdir()
    (union["low"] / "b").mkdir()
    (union["low"] / "b" / "x").write_text("x")
    union.mount()
    with pytest.raises(OSError) as e:
        os.rename(union / "a", union / "b")
    assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST)


def test_rename_replaces_lower_file(union):
    (union["low"] / "a").write_text("A")
    (union["low"] / "b").write_text("B")
    union.mount()
    os.rename(union / "a", union / "b")
    assert (union / "b").read_text() == "A"
    assert sorted(os.listdir(union.mnt)) == ["b"]


def test_open_file_keeps_its_attributes_when_its_name_is_taken_by_a_directory(union):
    """fstat of an open, removed file must describe that file, whatever now has its name."""
    union.mount()
    with open(union / "x", "w+b") as f:
        f.write(b"12345")
        f.flush()
        os.unlink(union / "x")
        os.mkdir(union / "x")
        os.utime(union / "x")  # (changes the new directory's attributes in the kernel too)
        st = os.fstat(f.fileno())
        assert stat.S_ISREG(st.st_mode) and st.st_size == 5
        f.seek(0)
        assert f.read() == b"12345"
    assert os.path.isdir(union / "x") and os.path.isdir(union["up"] / "x")


def test_files_read_before_their_directory_moved_show_later_changes(union):
    """Renaming a lower directory copies its files up; a file that was open for reading
    before (its lower data fd kept by the daemon) then shows changes made to its copy."""
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("lower")
    os.chmod(union["low"] / "d" / "f", 0o644)
    union.mount()
    with open(union / "d" / "f") as f:
        assert f.read() == "lower"
        os.rename(union / "d", union / "e")
        os.chmod(union / "e" / "f", 0o600)
        os.utime(union / "e" / "f", ns=(10**9, 2 * 10**9))
        st = os.stat(union / "e" / "f")
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 2 * 10**9
        fresh = subprocess.run(["stat", "--cached=never", "-c", "%a %Y", union / "e" / "f"],
                               capture_output=True, text=True, check=True).stdout.split()
        assert fresh == ["600", "2"]  # asked of the daemon, not the kernel's cache
        os.truncate(union / "e" / "f", 0)  # changes to the copy's data, by its name
        os.truncate(union / "e" / "f", 5)
        with open("/proc/sys/vm/drop_caches", "w") as caches:  # read it from the daemon
            caches.write("1")
        f.seek(0)
        assert f.read() == "\0" * 5
        os.setxattr(union / "e" / "f", "user.after", b"moved")
        assert os.getxattr(union / "e" / "f", "user.after") == b"moved"
        assert os.listxattr(union / "e" / "f") == ["user.after"]
    assert stat.S_IMODE(os.stat(union["up"] / "e" / "f").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(union["low"] / "d" / "f").st_mode) == 0o644


def test_open_file_survives_a_rename_over_it(union):
    """POSIX: a file replaced by a rename stays readable through the fds open on it, also when
    the kernel has to ask the daemon for its data again."""
    (union["up"] / "dst").write_text("old upper file")
    (union["low"] / "src").write_text("new")
    union.mount()
    with open(union / "dst") as f:  # (not read yet: the daemon has no fd of it)
        os.rename(union / "src", union / "dst")
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("1")
        f.seek(0)
        assert f.read() == "old upper file"
        assert (union / "dst").read_text() == "new"
        assert os.fstat(f.fileno()).st_size == len("old upper file")
    assert wait_filled(union["up"]) == []  # (a rename copies up in the background: see filler)
    assert (union["up"] / "dst").read_text() == "new"
    assert (union["low"] / "src").read_text() == "new"


LONG = b"L" * 253  # its .wh. whiteout would be 257 bytes: longer than a file name may be


def _is_device_whiteout(path: bytes) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_names_too_long_for_wh_whiteouts_get_device_whiteouts(union):
    """A lower entry whose `.wh.` whiteout would be too long a name is hidden as kernel
    overlayfs does it: a 0/0 character device of its own name in the upper branch."""
    low, up, mnt = (os.fsencode(union[b]) for b in ("low", "up")), None, os.fsencode(union.mnt)
    low, up = os.fsencode(union["low"]), os.fsencode(union["up"])
    names = [LONG + b"f", LONG + b"c", LONG + b"d"]  # 254 bytes each
    for n in names[:2]:
        with open(low + b"/" + n, "wb") as f:
            f.write(b"lower " + n[-1:])
    os.mkdir(low + b"/" + names[2])
    with open(low + b"/" + names[2] + b"/inner", "wb") as f:
        f.write(b"in")
    union.mount()
    with open(mnt + b"/" + names[1], "ab") as f:  # copied up first: in both branches
        f.write(b"+")
    os.unlink(mnt + b"/" + names[0])
    os.unlink(mnt + b"/" + names[1])
    subprocess.run([b"rm", b"-r", mnt + b"/" + names[2]], check=True)
    assert os.listdir(mnt) == []
    for n in names:
        assert not os.path.lexists(mnt + b"/" + n)
        assert _is_device_whiteout(up + b"/" + n)
    assert sorted(os.listdir(low)) == sorted(names)  # the lower branch as it was
    assert open(low + b"/" + names[1], "rb").read() == b"lower c"
    assert open(low + b"/" + names[2] + b"/inner", "rb").read() == b"in"
    union.remount()
    assert os.listdir(mnt) == []
    with open(mnt + b"/" + names[0], "wb") as f:  # the name again: the device makes way
        f.write(b"new")
    os.mkdir(mnt + b"/" + names[2])  # a new directory: none of the lower one shows through
    assert sorted(os.listdir(mnt)) == sorted([names[0], names[2]])
    assert os.listdir(mnt + b"/" + names[2]) == []
    assert open(up + b"/" + names[0], "rb").read() == b"new"
    assert _is_device_whiteout(up + b"/" + names[1])


def test_renaming_a_name_too_long_for_wh_whiteouts(union):
    """Moving a long-named lower file leaves a device whiteout at its old name; a directory
    can then be moved onto that name."""
    low, up, mnt = os.fsencode(union["low"]), os.fsencode(union["up"]), os.fsencode(union.mnt)
    with open(low + b"/" + LONG, "wb") as f:
        f.write(b"lower")
    os.mkdir(low + b"/d")
    union.mount()
    os.rename(mnt + b"/" + LONG, mnt + b"/short")
    assert sorted(os.listdir(mnt)) == [b"d", b"short"]
    assert open(mnt + b"/short", "rb").read() == b"lower"
    assert _is_device_whiteout(up + b"/" + LONG)
    os.rename(mnt + b"/d", mnt + b"/" + LONG)
    assert sorted(os.listdir(mnt)) == sorted([LONG, b"short"])
    assert stat.S_ISDIR(os.lstat(up + b"/" + LONG).st_mode)
    assert sorted(os.listdir(low)) == sorted([LONG, b"d"])
    assert open(low + b"/" + LONG, "rb").read() == b"lower"



def test_new_entries_replace_device_whiteouts_in_the_writable_branch(union):
    """An overlayfs upper layer used as the rw branch hides names with 0/0 devices: a new
    file, directory or symlink of such a name takes its place (a new directory opaque)."""
    for n in ("f", "d", "s"):
        (union["low"] / n).mkdir()
        (union["low"] / n / "old").write_text("lower")
        os.mknod(union["up"] / n, stat.S_IFCHR, 0)
    union.mount()
    assert os.listdir(union.mnt) == []
    (union / "f").write_text("new")
    (union / "d").mkdir()
    (union / "s").symlink_to("f")
    assert sorted(os.listdir(union.mnt)) == ["d", "f", "s"]
    assert (union / "s").read_text() == "new"
    assert os.listdir(union / "d") == []
    assert (union["up"] / "f").read_text() == "new"
    assert (union["low"] / "d" / "old").read_text() == "lower"


@pytest.mark.parametrize("read_first", [False, True])
def test_writing_a_file_whose_name_a_rename_took(union, read_first):
    """Writes through an open file whose name a rename gave to another file go to the open
    file, never to the file that now has the name (they used to land in it: the daemon
    reopened the data by name for writing)."""
    (union["up"] / "f").write_text("ffff")
    (union["up"] / "g").write_text("gggg")
    union.mount()
    fd = os.open(union / "f", os.O_RDWR)
    try:
        if read_first:  # (the daemon then holds a read-only fd of it already)
            assert os.pread(fd, 2, 0) == b"ff"
        os.rename(union / "g", union / "f")
        os.pwrite(fd, b"XX", 0)
        assert os.pread(fd, 100, 0) == b"XXff"
        assert (union / "f").read_text() == "gggg"
        assert (union["up"] / "f").read_text() == "gggg"
        os.ftruncate(fd, 1)
        assert os.fstat(fd).st_size == 1 and (union / "f").read_text() == "gggg"
    finally:
        os.close(fd)
    assert os.listdir(union.mnt) == ["f"]


@pytest.mark.parametrize("upper_too", [False, True])
def test_writing_an_open_lower_file_whose_directory_was_removed(union, upper_too):
    """A lower file held open while its directory is removed (rm -rf), then written through
    the open file: the write lands in a copy with no name, as on overlayfs (it failed with
    ENOENT: the copy-up looked for the directory in the writable branch), and the removed
    directory stays removed."""
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("data")
    (union["low"] / "d" / "g").write_text("g")
    if upper_too:
        (union["up"] / "d").mkdir()
        (union["up"] / "d" / "h").write_text("h")
    union.mount()
    fd = os.open(union / "d" / "f", os.O_RDWR)
    try:
        shutil.rmtree(union / "d")
        os.pwrite(fd, b"XX", 0)
        assert os.pread(fd, 100, 0) == b"XXta"
        assert os.listdir(union.mnt) == []
    finally:
        os.close(fd)
    assert sorted(os.listdir(union["up"])) == [".wh..wh.pyunion", ".wh.d"]
    union.umount()
    assert os.listdir(union["up"]) == [".wh.d"]
    assert (union["low"] / "d" / "f").read_text() == "data"  # the lower branch as it was
