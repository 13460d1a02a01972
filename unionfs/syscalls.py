"""Thin wrappers for the syscalls Python 3.11 lacks (openat2, renameat2) and safe *at helpers.

Every path the daemon touches inside a branch goes through here: directories are opened
relative to a branch's root fd with symlinks refused, and single names are then used
relative to such directory fds, so a symlink inside a branch is never followed. Also here:
the data copy of copy-ups, the CPU latency request of -o lowlatency, and the current CPU
(unionfs.colocate).
"""

import ctypes
import errno
import os
import stat
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_OPENAT2 = 437  # the same number on every architecture
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_have_openat2 = True


def _openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def open_beneath(rootfd: int, path: bytes, flags: int = O_PATH_DIR) -> int:
    """Open PATH (relative, no `..`) below ROOTFD without following any symlink on the way."""
    global _have_openat2
    if _have_openat2:
        try:
            return _openat2(
                rootfd,
                path,
                flags,
                RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
            )
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp filter
                raise
            _have_openat2 = False
    # Old kernels: walk component by component with O_NOFOLLOW.
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise OSError(errno.EXDEV, "path leaves the tree", path)
    fd = os.dup(rootfd)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        last = parts[-1] if parts else b"."
        result = os.open(last, flags | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)
    return result


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), newname)


def lstat_at(dirfd: int, name: bytes) -> os.stat_result | None:
    """lstat NAME in DIRFD; None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


_STAT_EXTRA = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
               "st_blksize", "st_rdev")


def with_blocks(st: os.stat_result, blocks: int) -> os.stat_result:
    """ST with another block count."""
    extra = {k: getattr(st, k) for k in _STAT_EXTRA}
    extra["st_blocks"] = blocks
    return os.stat_result(tuple(st[:10]), extra)


def exists_at(dirfd: int, name: bytes) -> bool:
    return lstat_at(dirfd, name) is not None


def proc_path(dirfd: int, name: bytes | None = None) -> bytes:
    """A path naming NAME in DIRFD through /proc, for calls that take no dirfd (xattrs).

    The magic link for DIRFD is followed (it is our own safe fd); NAME is used with
    follow_symlinks=False by the callers, so no symlink in a branch is followed.
    """
    base = b"/proc/self/fd/%d" % dirfd
    return base if name is None else base + b"/" + name


def is_overlay_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


SYNC_FILE_RANGE_WRITE = 2
# with write-back started every so often during a copy, the final fdatasync has little left
WRITEBACK_CHUNK = 8 << 20
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def start_writeback(fd: int, off: int, count: int) -> None:
    """Start writing FD's dirty pages in [OFF, OFF+COUNT) to disk, without waiting."""
    _libc.sync_file_range(fd, off, count, SYNC_FILE_RANGE_WRITE)  # advice: errors do not matter


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def fallocate(fd: int, mode: int, off: int, count: int) -> None:
    if _libc.fallocate(fd, mode, off, count) != 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, os.strerror(err))


def copy_data(src: int, dst: int, size: int, writeback: bool = False, start: int = 0,
              resize: bool = True) -> None:
    """Copy the bytes from START to SIZE of fd SRC to fd DST at the same offsets, keeping
    holes; RESIZE: then make DST SIZE bytes long (else DST is that long already, or longer).

    WRITEBACK: the copy will be fsynced; start writing it out chunk by chunk meanwhile, so
    the disk works while the copy goes on (a third less time for a big file).
    """
    off = start
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno != errno.EINVAL:
                raise
            data = off  # filesystem without SEEK_DATA: copy everything
        try:
            hole = os.lseek(src, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        end = min(hole, size)
        while data < end:
            step = min(end - data, WRITEBACK_CHUNK) if writeback else end - data
            if _copy_range(src, dst, data, step):  # the source shrank under us
                if resize:
                    os.ftruncate(dst, size)
                return
            if writeback:
                start_writeback(dst, data, step)
            data += step
        off = hole
    if resize:
        os.ftruncate(dst, size)


_have_copy_file_range = hasattr(os, "copy_file_range")
_have_sendfile = True


def _copy_range(src: int, dst: int, off: int, count: int) -> bool:
    """Copy COUNT bytes at OFF; True if the source ended before.

    copy_file_range where the two files' filesystems allow it (it may share blocks), else
    sendfile: page cache to page cache, never through this process's memory (a new 1 MiB
    buffer per chunk was often several times slower in our VMs: a 512 MiB copy took 2.0 or
    1.1 s where sendfile takes 0.2 s).
    """
    global _have_copy_file_range
    if _have_copy_file_range:
        try:
            while count > 0:
                n = os.copy_file_range(src, dst, min(count, 1 << 30), off, off)
                if n == 0:  # source shrank under us
                    return True
                off += n
                count -= n
            return False
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            _have_copy_file_range = e.errno == errno.EXDEV  # EXDEV: only these two filesystems
    return _send_range(src, dst, off, count)


def _send_range(src: int, dst: int, off: int, count: int) -> bool:
    """_copy_range without copy_file_range: sendfile, else read and write through one buffer."""
    global _have_sendfile
    os.lseek(dst, off, os.SEEK_SET)  # sendfile writes at DST's position
    buf = None
    while count > 0:
        if _have_sendfile:
            try:
                n = os.sendfile(dst, src, off, min(count, 1 << 30))
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                _have_sendfile = False
                continue
        else:
            if buf is None:
                buf = bytearray(min(count, 1 << 20))
            n = os.preadv(src, [buf], off)
            done = 0
            while done < n:  # (a short write: the disk is filling up; the next one says so)
                done += os.pwritev(dst, [memoryview(buf)[done:n]], off + done)
        if n == 0:  # source shrank under us
            return True
        off += n
        count -= n
    return False


CPU_LATENCY_QOS = "/dev/cpu_dma_latency"


def current_cpu() -> int:
    """The CPU the calling thread runs on now (sched_getcpu: a vDSO call, no syscall)."""
    return _libc.sched_getcpu()


class CpuLatencyRequest:
    """A request to the kernel's CPU latency QoS that idle CPUs wake at once: while it is held,
    they poll rather than halt (in a VM a halted CPU takes tens of microseconds to wake).
    Applies to every CPU; root only."""

    def __init__(self) -> None:
        self._fd: int | None = None

    @staticmethod
    def check() -> None:
        """Raise OSError if this process may not make such requests."""
        os.close(os.open(CPU_LATENCY_QOS, os.O_WRONLY | os.O_CLOEXEC))

    @property
    def held(self) -> bool:
        return self._fd is not None

    def hold(self) -> None:
        if self._fd is None:
            fd = os.open(CPU_LATENCY_QOS, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, struct.pack("=i", 0))  # microseconds of wake-up latency allowed
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd

    def release(self) -> None:
        """Drop the request (the kernel drops it when its fd is closed, even on a crash)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
