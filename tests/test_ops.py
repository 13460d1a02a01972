"""What every local filesystem does: nodes, symlinks, ownership, statfs, xattrs, sync, read-only."""

import errno
import os
import stat

import pytest

from conftest import as_user


def test_mknod_symlink_readlink(union):
    union.mount()
    os.mknod(union / "fifo", stat.S_IFIFO | 0o644)
    os.mknod(union / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    os.symlink("/etc/passwd", union / "abs")
    assert stat.S_ISFIFO(os.lstat(union["up"] / "fifo").st_mode)
    assert os.lstat(union / "dev").st_rdev == os.makedev(1, 5)
    assert os.readlink(union / "abs") == "/etc/passwd"
    assert os.readlink(union["up"] / "abs") == "/etc/passwd"
    with pytest.raises(OSError) as e:
        os.mknod(union / "wh", stat.S_IFCHR | 0o600, 0)  # overlayfs' whiteout spelling
    assert e.value.errno == errno.EPERM


@pytest.mark.parametrize("extras", ["", "noextras"])
def test_write_by_an_unprivileged_owner_clears_set_id_bits(shared_union, test_user, extras):
    """As on any filesystem: writing to a set-user-ID file without CAP_FSETID clears the bit
    (the copy-up in the writable branch changes; the lower file keeps its mode). pyfuse3's
    path (noextras) clears them on every write, as libfuse's HANDLE_KILLPRIV asks."""
    union = shared_union
    uid, gid = test_user
    modes = {"tool": 0o6755, "cut": 0o4755, "locked": 0o2745, "root": 0o6755}
    for name, mode in modes.items():
        (union["low"] / name).write_text("#!/bin/sh\n")
        os.chown(union["low"] / name, uid, gid)
        os.chmod(union["low"] / name, mode)
    union.mount(*filter(None, [extras]))

    def change():
        with open(union / "tool", "a") as f:
            f.write("true\n")
        os.truncate(union / "cut", 2)
        with open(union / "locked", "a") as f:  # set-group-ID without group-execute: a lock mark
            f.write("true\n")

    assert as_user(uid, gid, change) == 0
    with open(union / "root", "a") as f:  # root has CAP_FSETID: the bits stay
        f.write("true\n")
    after = {"tool": 0o755, "cut": 0o755, "locked": 0o2745,
             "root": 0o755 if extras else 0o6755}
    for name, mode in after.items():
        assert stat.S_IMODE(os.stat(union / name).st_mode) == mode, name
        assert stat.S_IMODE(os.stat(union["up"] / name).st_mode) == mode, name
        assert stat.S_IMODE(os.stat(union["low"] / name).st_mode) == modes[name], name
    assert (union / "tool").read_text() == "#!/bin/sh\ntrue\n"
    assert (union / "cut").read_text() == "#!"


def test_new_entries_owned_by_caller_and_setgid_honoured(shared_union, test_user):
    union = shared_union
    uid, gid = test_user
    union.mount()
    os.chmod(union.mnt, 0o777)
    os.mkdir(union / "shared")
    os.chown(union / "shared", 0, 4000)
    os.chmod(union / "shared", 0o2777)

    def work():
        open(union / "mine", "w").close()
        os.mkdir(union / "shared" / "sub")
        open(union / "shared" / "f", "w").close()

    assert as_user(uid, gid, work) == 0
    st = os.lstat(union["up"] / "mine")
    assert (st.st_uid, st.st_gid) == (uid, gid)
    assert os.lstat(union / "shared" / "f").st_gid == 4000
    sub = os.lstat(union["up"] / "shared" / "sub")
    assert sub.st_gid == 4000 and sub.st_mode & stat.S_ISGID and sub.st_uid == uid


def test_permissions_enforced_by_kernel(shared_union, test_user):
    union = shared_union
    uid, gid = test_user
    (union["low"] / "secret").write_text("s")
    os.chmod(union["low"] / "secret", 0o600)
    union.mount()

    def peek():
        open(union / "secret").read()

    def list_root():
        os.listdir(union.mnt)

    assert as_user(uid, gid, list_root) == 0  # the user can reach the mount...
    assert as_user(uid, gid, peek) != 0  # ...but not a file its mode forbids


def test_names_as_long_as_the_branch_allows(union):
    """Names up to the branch's own limit work, lower ones included: those too long for a
    `.wh.` whiteout get a device whiteout when removed (see test_remove_rename)."""
    longest = "n" * os.statvfs(union["up"]).f_namemax
    (union["low"] / longest).write_text("lower")
    union.mount()
    assert os.statvfs(union.mnt).f_namemax == os.statvfs(union["up"]).f_namemax
    assert (union / longest).read_text() == "lower"
    (union / longest).write_text("upper")
    assert (union["up"] / longest).read_text() == "upper"
    with pytest.raises(OSError) as e:
        (union / (longest + "x")).write_text("no")
    assert e.value.errno == errno.ENAMETOOLONG
    (union / longest).unlink()
    assert os.listdir(union.mnt) == []
    assert (union["low"] / longest).read_text() == "lower"


def test_internal_xattrs_hidden(union):
    (union["low"] / "d").mkdir()
    os.setxattr(union["low"] / "d", "trusted.overlay.opaque", b"n")
    os.setxattr(union["low"] / "d", "user.visible", b"v")
    union.mount()
    names = os.listxattr(union / "d")
    assert "user.visible" in names and not any("overlay" in n for n in names)
    with pytest.raises(OSError):
        os.setxattr(union / "d", "trusted.overlay.opaque", b"y")


def test_fsync_and_fsyncdir(union):
    union.mount()
    fd = os.open(union / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"data")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(union.mnt, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    assert (union["up"] / "f").read_bytes() == b"data"


@pytest.mark.parametrize("extras", ["", "noextras"])
def test_fsync_small_and_big_writes_and_untouched_lower_files(union, extras):
    """A file with little written since its last fsync is synced in the loop, one with much
    in a worker thread (which answers the kernel itself); both reach the writable branch. A
    lower file opened only for reading has nothing to sync and is not copied up."""
    (union["low"] / "small").write_bytes(b"lower")
    (union["low"] / "kept").write_bytes(b"lower")
    union.mount(*filter(None, [extras]))
    big = os.urandom(3 << 20)
    for name, data in (("small", b"upper"), ("big", big), ("small", b"again")):
        fd = os.open(union / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.write(fd, data[:100])  # then a little more: the next fsync is a quick one
        os.fdatasync(fd)
        os.close(fd)
        assert (union["up"] / name).read_bytes() == data + data[:100]
        assert (union / name).read_bytes() == data + data[:100]
    fd = os.open(union / "kept", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    assert not (union["up"] / "kept").exists()
    assert (union["low"] / "small").read_bytes() == b"lower"


def test_access(union):
    (union["low"] / "x").write_text("#!/bin/sh\n")
    os.chmod(union["low"] / "x", 0o755)
    union.mount()
    assert os.access(union / "x", os.X_OK | os.R_OK)
    assert os.access(union / "x", os.W_OK)


def test_read_only_union(make_union):
    u = make_union(("a", "ro+wh"), ("b", "ro+wh"))
    (u["a"] / "f").write_text("x")
    u.mount()
    assert (u / "f").read_text() == "x"
    for act in (lambda: (u / "f").write_text("y"), lambda: os.mkdir(u / "d"),
                lambda: os.unlink(u / "f"), lambda: os.chmod(u / "f", 0o600)):
        with pytest.raises(OSError) as e:
            act()
        assert e.value.errno == errno.EROFS
    assert os.listdir(u["a"]) == ["f"]


def test_ro_mount_option(union):
    (union["low"] / "f").write_text("x")
    union.mount("ro")
    with pytest.raises(OSError) as e:
        (union / "g").write_text("y")
    assert e.value.errno == errno.EROFS
    assert os.listdir(union["up"]) == []


def test_several_writable_branches(make_union):
    u = make_union(("top", "rw"), ("mid", "rw"), ("low", "ro+wh"))
    (u["mid"] / "m").write_text("mid")
    (u["low"] / "l").write_text("low")
    (u["low"] / "m2").write_text("low")
    (u["mid"] / "dir").mkdir()
    u.mount()
    with open(u / "m", "a") as f:  # in place on its writable branch
        f.write("+")
    assert (u["mid"] / "m").read_text() == "mid+" and not (u["top"] / "m").exists()
    (u / "new").write_text("n")  # new entries go to the top writable branch
    assert (u["top"] / "new").exists()
    (u / "dir" / "inner").write_text("i")
    assert (u["top"] / "dir" / "inner").exists()
    os.unlink(u / "m")
    assert not (u["mid"] / "m").exists() and not (u / "m").exists()
    (u / "l").write_text("changed")
    assert (u["top"] / "l").read_text() == "changed" and (u["low"] / "l").read_text() == "low"


def test_truncate_and_large_io(union):
    data = os.urandom(3 << 20)
    (union["low"] / "big").write_bytes(data)
    union.mount()
    assert (union / "big").read_bytes() == data
    with open(union / "big", "r+b") as f:
        f.truncate(1 << 20)
        f.seek(0, 2)
        f.write(b"tail")
    assert (union / "big").read_bytes() == data[: 1 << 20] + b"tail"


def test_xattrs_on_the_root(union):
    union.mount()
    os.setxattr(union.mnt, "user.top", b"1")
    assert os.getxattr(union.mnt, "user.top") == b"1"
    assert "user.top" in os.listxattr(union.mnt)
    assert os.getxattr(union["up"], "user.top") == b"1"
    os.removexattr(union.mnt, "user.top")
    assert "user.top" not in os.listxattr(union["up"])


def test_absent_xattrs_are_remembered_until_something_adds_them(union):
    """The daemon answers 'no such attribute' from memory once it has read a file's names:
    every way a name can appear must make it look again."""
    import subprocess

    for name in ("f", "g", "h"):
        (union["low"] / name).write_text(name)
    union.mount()
    for name in ("f", "g", "h"):
        with pytest.raises(OSError) as e:
            os.getxattr(union / name, "user.later")
        assert e.value.errno == errno.ENODATA
    os.setxattr(union / "f", "user.later", b"set through the mount")
    assert os.getxattr(union / "f", "user.later") == b"set through the mount"
    os.removexattr(union / "f", "user.later")
    with pytest.raises(OSError):
        os.getxattr(union / "f", "user.later")
    with open(union / "g", "a") as f:  # a copy-up (from a lower file that gets the name meanwhile)
        os.setxattr(union["low"] / "g", "user.later", b"lower")
        f.write("more")
    assert os.getxattr(union / "g", "user.later") == b"lower"
    os.setxattr(union["low"] / "h", "user.later", b"edited directly")
    assert subprocess.run(["pyunion", "refresh", union.mnt]).returncode == 0
    assert os.getxattr(union / "h", "user.later") == b"edited directly"
    assert os.listxattr(union / "h") == ["user.later"]
    assert "user.later" not in os.listxattr(union["low"] / "f")


@pytest.mark.parametrize("extras", ["", "noextras"])
def test_absent_selinux_labels_are_not_supported(union, extras):
    """Without SELinux on the host, a file without a label answers EOPNOTSUPP, so `ls -l`
    stops asking each file for one; a label a branch file carries is still returned."""
    import subprocess

    assert not os.path.exists("/sys/fs/selinux"), "this test needs a host without SELinux"
    for i in range(50):
        (union["low"] / f"f{i}").write_text("x")
    os.setxattr(union["low"] / "f7", "security.selinux", b"system_u:object_r:etc_t:s0\0")
    union.mount(*([extras] if extras else []), debug=not extras)
    with pytest.raises(OSError) as e:
        os.getxattr(union / "f3", "security.selinux")
    assert e.value.errno == errno.EOPNOTSUPP
    assert os.getxattr(union / "f7", "security.selinux") == b"system_u:object_r:etc_t:s0\0"
    with pytest.raises(OSError) as e:
        os.getxattr(union / "f3", "user.absent")
    assert e.value.errno == errno.ENODATA  # other absent attributes: as ever
    if not extras:
        def asked():
            return union.log.read_text().count("b'security.selinux')")

        before = asked()
        listing = subprocess.run(["ls", "-l", union.mnt], capture_output=True, text=True, check=True)
        assert listing.stdout.count(" f") == 50
        assert asked() - before <= 2, f"ls -l asked {asked() - before} times for 50 files"
    assert os.getxattr(union["low"] / "f7", "security.selinux") == b"system_u:object_r:etc_t:s0\0"
    with pytest.raises(OSError) as e:
        os.getxattr(union["low"] / "f3", "security.selinux")
    assert e.value.errno == errno.ENODATA  # the branch itself is not changed


def test_posix_acls_copied_up_and_enforced(shared_union, test_user):
    import subprocess
    union = shared_union
    uid, gid = test_user
    (union["low"] / "f").write_text("secret")
    os.chmod(union["low"] / "f", 0o600)
    union.mount()
    subprocess.run(["setfacl", "-m", f"u:{uid}:r", union / "f"], check=True)
    acl = subprocess.run(["getfacl", "-c", union["up"] / "f"], capture_output=True, text=True).stdout
    assert f"user:{uid}:r--" in acl or "user:pyuniontest:r--" in acl
    assert "system.posix_acl_access" not in os.listxattr(union["low"] / "f")

    def read():
        assert open(union / "f").read() == "secret"

    assert as_user(uid, gid, read) == 0
    subprocess.run(["setfacl", "-b", union / "f"], check=True)
    assert as_user(uid, gid, read) != 0


def test_seek_data_hole_and_fallocate(union):
    with open(union["low"] / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data")
    union.mount()
    fd = os.open(union / "sparse", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 1 << 20
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)
    fd = os.open(union / "alloc", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        assert os.stat(union["up"] / "alloc").st_blocks * 512 >= 1 << 20
        import subprocess
        subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", "65536",
                        str(union / "alloc")], check=True)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)


def test_cached_listings_follow_changes(union):
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "a").write_text("a")
    union.mount()
    assert os.listdir(union / "d") == ["a"]
    (union / "d" / "b").write_text("b")
    assert sorted(os.listdir(union / "d")) == ["a", "b"]
    os.unlink(union / "d" / "a")
    assert os.listdir(union / "d") == ["b"]
    os.rename(union / "d" / "b", union / "c")
    assert os.listdir(union / "d") == [] and sorted(os.listdir(union.mnt)) == ["c", "d"]


def test_open_file_survives_its_removal(union):
    (union["low"] / "lower").write_text("lower data")
    union.mount()
    fd = os.open(union / "new", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"abc")
    os.unlink(union / "new")
    assert os.pread(fd, 10, 0) == b"abc" and os.fstat(fd).st_size == 3
    os.write(fd, b"def")
    assert os.pread(fd, 10, 0) == b"abcdef"
    os.close(fd)
    fd = os.open(union / "lower", os.O_RDONLY)
    os.rename(union / "lower", union / "moved")
    os.unlink(union / "moved")
    assert os.read(fd, 100) == b"lower data"
    os.close(fd)
    assert os.listdir(union.mnt) == []


@pytest.mark.parametrize("extras", ["", "noextras"])
def test_xattrs_set_through_a_removed_file_stay_with_it(union, extras):
    """fsetxattr on an open file whose name went, and now names another file, changes the
    open file, not the one that has its name now."""
    union.mount(*([extras] if extras else []))
    fd = os.open(union / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"old")
        (union / "g").write_text("new")
        os.rename(union / "g", union / "f")
        os.setxattr(fd, "user.colour", b"blue")
        assert os.getxattr(fd, "user.colour") == b"blue"
        assert "user.colour" not in os.listxattr(union / "f")
        assert "user.colour" not in os.listxattr(union["up"] / "f")
        os.removexattr(fd, "user.colour")
        assert os.listxattr(fd) == []
    finally:
        os.close(fd)


def test_reader_sees_writes_made_through_another_open(union):
    (union["low"] / "f").write_bytes(b"0" * 10)
    union.mount()
    reader = os.open(union / "f", os.O_RDONLY)
    writer = os.open(union / "f", os.O_WRONLY)  # copies the file up
    os.pwrite(writer, b"1111", 0)
    assert os.pread(reader, 10, 0) == b"1111000000"
    os.close(reader)
    os.close(writer)


def test_no_fd_leak_over_many_files(union):
    (union["low"] / "d").mkdir()
    for i in range(300):
        (union["low"] / "d" / f"l{i}").write_text("lower")
    union.mount()
    pid = union.daemon_pid()
    baseline = len(os.listdir(f"/proc/{pid}/fd"))
    for _ in range(3):
        for i in range(300):
            p = union / "d" / f"n{i}"
            p.write_text("new")
            assert p.read_text() == "new"
            assert (union / "d" / f"l{i}").read_text() == "lower"
            os.unlink(p)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # the kernel forgets unused inodes: their fds must go too
    assert len(os.listdir(union / "d")) == 300
    for i in range(300):
        (union / "d" / f"l{i}").read_text()
    assert len(os.listdir(f"/proc/{pid}/fd")) > baseline + 100  # files read keep their fds...
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    import time
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{pid}/fd")) > baseline + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(os.listdir(f"/proc/{pid}/fd")) <= baseline + 8  # ...until the kernel forgets them


def _link_at(fd, directory, name):
    """linkat(2) of an open file by its /proc fd link (the way to name an O_TMPFILE file)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
    finally:
        os.close(dfd)


def test_tmpfile_is_made_in_the_writable_branch_and_named_by_linkat(union, make_union):
    """open(DIR, O_TMPFILE) makes a file with no name in DIR's copy in the writable branch
    (copied up first, as on overlayfs); linkat gives it a name that shows what was written
    before and after; a tmpfile nobody links leaves nothing behind. (It answered
    EOPNOTSUPP: the kernel's TMPFILE request was not served.)"""
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("lower")
    union.mount()
    fd = os.open(union / "d", os.O_TMPFILE | os.O_RDWR, 0o640)
    try:
        os.write(fd, b"early")
        assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_size == 5
        assert os.listdir(union / "d") == ["f"] and os.listdir(union["up"] / "d") == []
        _link_at(fd, union / "d", "named")
        os.write(fd, b"+late")
        assert (union / "d" / "named").read_text() == "early+late"
        st = os.stat(union / "d" / "named")
        assert st.st_ino == os.fstat(fd).st_ino and st.st_nlink == 1
        assert stat.S_IMODE(st.st_mode) == 0o640
    finally:
        os.close(fd)
    fd = os.open(union.mnt, os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(fd, b"never named")
    os.close(fd)
    assert sorted(os.listdir(union.mnt)) == ["d"]
    union.umount()
    assert sorted(os.listdir(union["up"])) == ["d"]
    assert (union["up"] / "d" / "named").read_text() == "early+late"
    assert sorted(os.listdir(union["low"] / "d")) == ["f"]  # the lower branch as it was
    ro = make_union(("up", "rw"), ("low", "ro"), name="ro", options=("ro",))
    ro.mount()
    with pytest.raises(OSError) as e:
        os.open(ro.mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
    assert e.value.errno == errno.EROFS
