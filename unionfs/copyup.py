"""Copy-up: building a copy of a lower entry in a writable branch's work area and publishing it.

A job copies data (keeping holes), owner, mode, xattrs and times into a temporary name in
the work area, then publishes it with one no-replace rename, so no reader and no crash ever
sees a half-copied entry. The data copy may run in a worker thread; the rest is quick. A
metadata-only copy (see metacopy) is published the same way without data, and filled in
place later (FillJob).
"""

import errno
import itertools
import logging
import os
import stat

from unionfs import metacopy, syscalls
from unionfs.layers import remove_tree_at
from unionfs.whiteout import is_internal_xattr

log = logging.getLogger(__name__)
_serial = itertools.count()
_warned: set[str] = set()


def temp_name() -> bytes:
    return b"tmp.%d.%d" % (os.getpid(), next(_serial))


def _warn_once(what: str, err: OSError) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("copy-up cannot keep %s (%s); continuing without it", what, err.strerror)


def copy_xattrs(src: int | bytes, dst: int | bytes) -> None:
    """Copy user-visible xattrs from SRC to DST (fds, or /proc paths used without following)."""
    follow = isinstance(src, int)
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        bname = os.fsencode(name)
        if is_internal_xattr(bname):
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=follow)
            os.setxattr(dst, name, value, follow_symlinks=isinstance(dst, int))
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            # trusted.* / security.* need privileges the daemon may not have (rootless)
            if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EACCES) and not name.startswith("user."):
                _warn_once(f"xattr {name}", e)
                continue
            raise


def set_owner(dirfd: int, name: bytes, uid: int, gid: int) -> None:
    try:
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
    except OSError as e:
        # rootless: ids outside our user namespace cannot be given away
        if e.errno not in (errno.EPERM, errno.EINVAL):
            raise
        _warn_once("ownership", e)


class CopyJob:
    """One entry being copied from (SRC_DIRFD, NAME) into the work area of a writable branch.

    ORIGIN: make a metadata-only copy of a regular file, whose data stays in the lower file at
    that path (see metacopy); cleared by prepare if the branch cannot keep the mark.
    """

    def __init__(self, src_dirfd: int, name: bytes, st: os.stat_result, work_fd: int,
                 limit: int | None = None, sync: bool = True, origin: bytes | None = None):
        self.sync = sync  # flush the data before publishing (off: overlayfs' "volatile")
        self.src_dirfd = src_dirfd
        self.limit = limit  # copy only this many bytes (the change truncates the file anyway)
        self.name = name
        self.st = st
        self.work_fd = work_fd
        self.origin = origin
        self.tmp = temp_name()
        self._src: int | None = None
        self._data: int | None = None
        self._dst: int | None = None
        self._created = False

    @property
    def size(self) -> int:
        """How many bytes the copy moves."""
        if not stat.S_ISREG(self.st.st_mode) or self.origin is not None:
            return 0
        return self.st.st_size if self.limit is None else min(self.limit, self.st.st_size)

    def prepare(self) -> None:
        """Create the temporary entry (for a file: open both ends)."""
        mode = self.st.st_mode
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFREG:
            self._src = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.src_dirfd)
            self._dst = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                0o600, dir_fd=self.work_fd)
            self._created = True
            if self.origin is not None:
                os.ftruncate(self._dst, self.st.st_size)
                if not metacopy.mark(self._dst, self.origin):
                    self.origin = None
                    os.ftruncate(self._dst, 0)
        elif fmt == stat.S_IFDIR:
            os.mkdir(self.tmp, 0o700, dir_fd=self.work_fd)
        elif fmt == stat.S_IFLNK:
            target = os.readlink(self.name, dir_fd=self.src_dirfd)
            os.symlink(target, self.tmp, dir_fd=self.work_fd)
        else:  # fifo, socket, device node
            os.mknod(self.tmp, stat.S_IFMT(mode) | 0o600, self.st.st_rdev, dir_fd=self.work_fd)
        self._created = True

    @property
    def source_fd(self) -> int | None:
        """The open lower file (regular files)."""
        return self._src

    def read_data_from(self, dirfd: int, name: bytes) -> None:
        """Copy the data from (DIRFD, NAME): the entry is itself a metadata-only copy."""
        self._data = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)

    def copy_data(self) -> None:
        """The long part for big files; safe to run in a worker thread."""
        if self._dst is not None and self.origin is None:
            if self._data is None:
                syscalls.copy_data(self._src, self._dst, self.size, writeback=self.sync)
            else:  # from the data's file; the bytes past its end are the entry's own (its tail)
                held = min(os.fstat(self._data).st_size, self.size)
                syscalls.copy_data(self._data, self._dst, held, writeback=self.sync)
                if self.size > held:
                    syscalls.copy_data(self._src, self._dst, self.size, writeback=self.sync,
                                       start=held)
            if self.sync and self.size > 0:  # (no data: nothing can be half-written)
                os.fdatasync(self._dst)

    def with_data(self) -> None:
        """Make a metadata-only copy hold its data after all (it will have no name to find
        its lower file by); runs the data copy."""
        if self.origin is not None:
            metacopy.unmark(self._dst)
            self.origin = None
            self.copy_data()

    def finish(self) -> None:
        """Owner, mode, xattrs and times, in that order (chown clears set-id bits)."""
        st = self.st
        set_owner(self.work_fd, self.tmp, st.st_uid, st.st_gid)
        if self._dst is not None:
            copy_xattrs(self._src, self._dst)
        else:
            copy_xattrs(syscalls.proc_path(self.src_dirfd, self.name), syscalls.proc_path(self.work_fd, self.tmp))
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(self.tmp, stat.S_IMODE(st.st_mode), dir_fd=self.work_fd)
        os.utime(self.tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=self.work_fd, follow_symlinks=False)

    def publish(self, dst_dirfd: int, name: bytes) -> None:
        syscalls.renameat2(self.work_fd, self.tmp, dst_dirfd, name, syscalls.RENAME_NOREPLACE)
        self._created = False
        self.close()

    def detach(self) -> int:
        """Keep the finished copy of a regular file as an unlinked file; its read-write fd."""
        fd = os.open(self.tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.work_fd)
        os.unlink(self.tmp, dir_fd=self.work_fd)
        self._created = False
        self.close()
        return fd

    def close(self) -> None:
        for fd in (self._src, self._data, self._dst):
            if fd is not None:
                os.close(fd)
        self._src = self._data = self._dst = None

    def abort(self) -> None:
        self.close()
        if self._created:
            self._created = False
            try:
                if stat.S_ISDIR(self.st.st_mode):
                    remove_tree_at(self.work_fd, self.tmp)
                else:
                    os.unlink(self.tmp, dir_fd=self.work_fd)
            except OSError as e:
                log.warning("cannot remove copy-up leftover %r: %s", self.tmp, e)


class FillJob:
    """The data of a metadata-only copy (DIRFD, NAME; NAME None: DIRFD is the copy's own
    open file), filled in place from the lower file that holds it, (DATA_DIRFD, DATA_NAME).
    The mark goes only once the data is synced; the copy keeps its times and mode."""

    def __init__(self, data_dirfd: int, data_name: bytes, dirfd: int, name: bytes | None,
                 limit: int | None = None, sync: bool = True):
        self.sync = sync
        self.limit = limit
        self._where = (data_dirfd, data_name, dirfd, name)
        self._src: int | None = None
        self._dst: int | None = None
        self.st: os.stat_result | None = None  # the copy before the fill
        self.held = 0  # how much data the lower file holds (the copy holds the rest: its tail)
        # in a batch (see unionfs.filler): found filled or removed before its fill; its failure
        self.skipped = False
        self.error: OSError | None = None

    @property
    def tail(self) -> bool:
        """Whether the copy holds bytes past the end of the lower file's data (see metacopy)."""
        return self.st.st_size > self.held

    @property
    def cut(self) -> int | None:
        """The size the fill truncates the copy to, as a copy-up does: the change's, which
        truncates the file anyway; but not into a tail, which stays whole until the change
        comes after the fill (a failed fill must not lose it), unless nothing is kept."""
        if self.limit is None or self.limit >= self.st.st_size or self.tail and self.limit > 0:
            return None
        return self.limit

    @property
    def size(self) -> int:
        """How many bytes the fill copies."""
        size = min(self.st.st_size, self.held)
        return size if self.cut is None else min(self.cut, size)

    def prepare(self) -> None:
        data_dirfd, data_name, dirfd, name = self._where
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        held = None if name is None else os.open(name, os.O_PATH | flags, dir_fd=dirfd)
        try:
            path = syscalls.proc_path(dirfd if held is None else held)
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", name)
            try:
                self._dst = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                # a copy its owner may not write (mode 0444, say; a daemon without root's
                # powers): writable while it is filled, its mode put back by finish
                os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRUSR | stat.S_IWUSR)
                self._dst = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        finally:
            if held is not None:
                os.close(held)
        self.st = st
        self._src = os.open(data_name, os.O_RDONLY | flags, dir_fd=data_dirfd)
        self.held = os.fstat(self._src).st_size

    def copy_data(self) -> None:
        self.copy()
        self.flush()

    def copy(self) -> None:
        """Copy the data, not synced yet (the slow part: safe in a worker thread)."""
        syscalls.copy_data(self._src, self._dst, self.size, writeback=self.sync, resize=False)
        if self.cut is not None:
            os.ftruncate(self._dst, self.cut)

    def flush(self) -> None:
        if self.sync and self.size > 0:
            os.fdatasync(self._dst)

    def finish(self) -> None:
        """Drop the mark (the data is synced) and put back the times and mode the fill
        changed (a write may drop set-id bits). The caller keeps other changes of them out
        meanwhile (see UnionOperations.copy_up_at_once)."""
        st = self.st
        metacopy.unmark(self._dst)
        os.utime(self._dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        self._put_back_mode()
        self.close()

    def _put_back_mode(self) -> None:
        if os.fstat(self._dst).st_mode != self.st.st_mode:
            os.chmod(self._dst, stat.S_IMODE(self.st.st_mode))

    def is_marked(self) -> bool:
        """Whether the copy still says its data is elsewhere (nothing filled it meanwhile)."""
        return metacopy.is_marked(self._dst)

    @property
    def links(self) -> int:
        return os.fstat(self._dst).st_nlink

    def close(self) -> None:
        for fd in (self._src, self._dst):
            if fd is not None:
                os.close(fd)
        self._src = self._dst = None

    def abort(self) -> None:
        if self._dst is not None and self.st is not None:
            try:  # (drop what was filled: the mark still says the lower file has the data)
                if self.tail:  # (which stays)
                    syscalls.fallocate(self._dst, syscalls.FALLOC_FL_PUNCH_HOLE
                                       | syscalls.FALLOC_FL_KEEP_SIZE, 0, self.held)
                else:
                    os.ftruncate(self._dst, 0)
                os.ftruncate(self._dst, self.st.st_size)
                os.utime(self._dst, ns=(self.st.st_atime_ns, self.st.st_mtime_ns))
                self._put_back_mode()
            except OSError as e:
                log.warning("cannot empty a partly filled copy: %s", e)
        self.close()
