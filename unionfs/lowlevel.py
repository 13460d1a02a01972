"""What pyfuse3 leaves out of libfuse's low-level API: lseek, fallocate, caching flags, no-open.

pyfuse3 hands libfuse a fixed table of request handlers and never sets the kernel's readdir
and symlink caches. `install()` interposes on the one call that hands that table over
(`fuse_session_new`, through pyfuse3's own import slot for it) and completes the table:

- LSEEK (SEEK_DATA/SEEK_HOLE) and FALLOCATE answered on the branch file's fd;
- OPENDIR answered ENOSYS: the kernel then sends no OPENDIR/RELEASEDIR and caches listings
  (it drops them itself when an entry changes through the mount; `pyunion refresh` drops the
  rest); readdir and fsyncdir get the directory's inode as their handle;
- FUSE_CAP_CACHE_SYMLINKS asked for at init, so readlink results are cached too;
- OPEN answered ENOSYS, so the kernel stops sending OPEN (and needs no reply to RELEASE
  from Python): file handles are inode numbers (see datafds), which the wrappers of write
  and fsync put where the kernel sends handle 0. Atomic O_TRUNC is turned off, so a
  truncating open still reaches the daemon, as a SETATTR;
- LOOKUP, GETATTR, READ, GETXATTR, CREATE, MKDIR, UNLINK and RMDIR, which never wait, and
  SETATTR and WRITE when no copy-up is due, answered straight from the adapter's `do_*` functions, without pyfuse3's
  coroutine round (about 40% of a request); anything that may wait goes to pyfuse3.

Everything is checked before it is touched (ELF layout, the slot's current value, page
permissions); when anything is unexpected nothing is changed and the mount simply works
without these extras.
"""

import ctypes
import errno
import logging
import os
import platform
import struct
import time

log = logging.getLogger(__name__)

# indices in struct fuse_lowlevel_ops (libfuse 3.x: members are only ever appended)
OP_INIT = 0
OP_LOOKUP = 2
OP_GETATTR = 4
OP_SETATTR = 5
OP_MKDIR = 8
OP_UNLINK = 9
OP_RMDIR = 10
OP_OPEN = 14
OP_READ = 15
OP_WRITE = 16
OP_RELEASE = 18
OP_FSYNC = 19
OP_OPENDIR = 20
OP_FSYNCDIR = 23
OP_GETXATTR = 26
OP_CREATE = 30
OP_READDIRPLUS = 41
OP_WRITE_BUF = 36
OP_FALLOCATE = 40
OP_LSEEK = 43
# struct fuse_conn_info: capable and want
CONN_CAPABLE = 20
CONN_WANT = 24
FUSE_CAP_CACHE_SYMLINKS = 1 << 23
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
# struct fuse_file_info: the bitfield word and fh
FI_BITS = 4
FI_KEEP_CACHE = 1 << 2
FI_FH = 16

_R_JUMP_SLOT = {62: 7, 183: 1026}  # x86_64, aarch64
_R_GLOB_DAT = {62: 6, 183: 1025}

_INIT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_OPENDIR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)
_FALLOCATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_void_p)
_LSEEK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int,
                          ctypes.c_void_p)
# pyfuse3's own handlers run Python code: call them without releasing the GIL
_INIT_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_READ_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64,
                              ctypes.c_void_p)
_WRITE_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                               ctypes.c_int64, ctypes.c_void_p)
_WRITE_BUF_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_void_p)
_FSYNC_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p)
_READ = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64,
                         ctypes.c_void_p)
_WRITE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                          ctypes.c_int64, ctypes.c_void_p)
_WRITE_BUF = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int64,
                              ctypes.c_void_p)
_FSYNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p)
_OPEN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)
_SESSION_NEW = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                ctypes.c_void_p)

_keep = []  # callbacks and tables libfuse points into: alive for the process


def _slot_offset(path: str, symbol: bytes) -> int | None:
    """The offset (from the load base) of the import slot for SYMBOL in the ELF shared object."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None  # only 64-bit little-endian
    machine = struct.unpack_from("<H", data, 18)[0]
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sec in sections:
        if sec[1] != 4:  # SHT_RELA
            continue
        symtab = sections[sec[6]]
        strtab = sections[symtab[6]]
        for off in range(sec[4], sec[4] + sec[5], 24):
            r_offset, r_info, _ = struct.unpack_from("<QQq", data, off)
            if (r_info & 0xFFFFFFFF) not in (_R_JUMP_SLOT.get(machine), _R_GLOB_DAT.get(machine)):
                continue
            name_off, = struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * 24)
            start = strtab[4] + name_off
            if data[start:data.index(b"\0", start)] == symbol:
                return r_offset
    return None


def _mapping(path: str, address: int | None = None) -> tuple[int, str] | None:
    """(load base, permissions of the page holding ADDRESS) for the object at PATH."""
    real = os.path.realpath(path)
    base = perms = None
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6 or fields[5] != real:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if base is None and int(fields[2], 16) == 0:
                base = lo
            if address is not None and lo <= address < hi:
                perms = fields[1]
    return None if base is None else (base, perms)


class _Stat(ctypes.Structure):
    """struct stat, x86_64 layout (the fast paths are used only where it matches)."""

    _fields_ = [("st_dev", ctypes.c_uint64), ("st_ino", ctypes.c_uint64), ("st_nlink", ctypes.c_uint64),
                ("st_mode", ctypes.c_uint32), ("st_uid", ctypes.c_uint32), ("st_gid", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("st_rdev", ctypes.c_uint64), ("st_size", ctypes.c_int64),
                ("st_blksize", ctypes.c_int64), ("st_blocks", ctypes.c_int64),
                ("st_atime", ctypes.c_int64), ("st_atime_nsec", ctypes.c_int64),
                ("st_mtime", ctypes.c_int64), ("st_mtime_nsec", ctypes.c_int64),
                ("st_ctime", ctypes.c_int64), ("st_ctime_nsec", ctypes.c_int64),
                ("_reserved", ctypes.c_int64 * 3)]


class _EntryParam(ctypes.Structure):
    _fields_ = [("ino", ctypes.c_uint64), ("generation", ctypes.c_uint64), ("attr", _Stat),
                ("attr_timeout", ctypes.c_double), ("entry_timeout", ctypes.c_double)]



_SETATTR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int,
                            ctypes.c_void_p)
_SETATTR_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.c_void_p)
# setattr's to_set bits, and fuse_buf's "data is in an fd" flag
SET_MODE, SET_UID, SET_GID, SET_SIZE, SET_ATIME, SET_MTIME = 1, 2, 4, 8, 16, 32
SET_ATIME_NOW, SET_MTIME_NOW = 128, 256
FUSE_BUF_IS_FD = 2


class _Buf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _BufVec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _Buf * 1)]


_FAST_PATHS = platform.machine() == "x86_64" and ctypes.sizeof(_Stat) == 144 \
    and ctypes.sizeof(_EntryParam) == 176 and ctypes.sizeof(_BufVec) == 64

_LOOKUP = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p)
_MKDIR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_uint32)
_CREATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_uint32,
                           ctypes.c_void_p)


class _Ctx(ctypes.Structure):
    """struct fuse_ctx: who asked."""

    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]
_GETATTR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)
_GETXATTR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t)


def _fill(out: _Stat, node, st: os.stat_result) -> None:
    out.st_ino = node.ino
    out.st_nlink = _ops.union.attr_nlink(node, st)
    out.st_mode, out.st_uid, out.st_gid = st.st_mode, st.st_uid, st.st_gid
    out.st_rdev, out.st_size = st.st_rdev, st.st_size
    out.st_blksize, out.st_blocks = st.st_blksize, st.st_blocks
    out.st_atime, out.st_atime_nsec = divmod(st.st_atime_ns, 1_000_000_000)
    out.st_mtime, out.st_mtime_nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    out.st_ctime, out.st_ctime_nsec = divmod(st.st_ctime_ns, 1_000_000_000)


def _answer(req: int, name: str, args: tuple, work) -> None:
    """Run a fast handler as the adapter's `_handler` would: errors become errnos, never raise."""
    if _ops.debug:
        log.debug("%s%r", name, args)
    try:
        work()
    except _FUSEError as e:
        _reply_err(req, e.errno)
    except OSError as e:
        if _ops.debug:
            log.debug("%s -> %s", name, e)
        _reply_err(req, e.errno or errno.EIO)
    except Exception:
        log.exception("unexpected error in %s%r", name, args)
        _reply_err(req, errno.EIO)


def _lookup(req, parent, name):
    def work():
        found = _ops.do_lookup(parent, name)
        if found is not None:
            _reply_new_entry(req, *found)
            return
        e = _EntryParam()  # a negative entry the kernel may cache
        e.entry_timeout = _ops.negative_timeout
        _fuse.fuse_reply_entry(ctypes.c_void_p(req), ctypes.byref(e))

    _answer(req, "lookup", (parent, name), work)


def _caller(req: int) -> _Ctx:
    return _Ctx.from_address(_fuse.fuse_req_ctx(ctypes.c_void_p(req)))


def _entry_param(node, st: os.stat_result) -> _EntryParam:
    e = _EntryParam()
    e.ino = node.ino
    _fill(e.attr, node, st)
    e.attr_timeout, e.entry_timeout = _ops.attr_timeout, _ops.entry_timeout
    return e


def _reply_new_entry(req: int, node, st: os.stat_result) -> None:
    """Reply with an entry the kernel now holds a reference to (the lookup count goes up)."""
    if _fuse.fuse_reply_entry(ctypes.c_void_p(req), ctypes.byref(_entry_param(node, st))) == 0:
        node.lookups += 1


def _mkdir(req, parent, name, mode):
    def work():
        ctx = _caller(req)
        _reply_new_entry(req, *_ops.do_mkdir(parent, name, mode, ctx.uid, ctx.gid))

    _answer(req, "mkdir", (parent, name, mode), work)


def _create(req, parent, name, mode, fi):
    def work():
        ctx = _caller(req)
        flags = ctypes.c_int.from_address(fi).value
        node, st = _ops.do_create(parent, name, mode, flags, ctx.uid, ctx.gid)
        e = _entry_param(node, st)
        ctypes.c_uint64.from_address(fi + FI_FH).value = node.ino  # handles are inode numbers
        ctypes.c_uint.from_address(fi + FI_BITS).value |= FI_KEEP_CACHE
        if _fuse.fuse_reply_create(ctypes.c_void_p(req), ctypes.byref(e), ctypes.c_void_p(fi)) == 0:
            node.lookups += 1

    _answer(req, "create", (parent, name, mode), work)


def _unlink(req, parent, name):
    def work():
        _ops.do_unlink(parent, name)
        _reply_err(req, 0)

    _answer(req, "unlink", (parent, name), work)


def _rmdir(req, parent, name):
    def work():
        _ops.do_rmdir(parent, name)
        _reply_err(req, 0)

    _answer(req, "rmdir", (parent, name), work)


def _getattr(req, ino, fi):
    def work():
        out = _Stat()
        _fill(out, *_ops.do_getattr(ino))
        _fuse.fuse_reply_attr(ctypes.c_void_p(req), ctypes.byref(out), _ops.attr_timeout)

    _answer(req, "getattr", (ino,), work)


def _read(req, ino, size, off, fi):
    def work():
        data = _ops.do_read(ino, off, size)
        _fuse.fuse_reply_buf(ctypes.c_void_p(req), data, len(data))

    _answer(req, "read", (ino, off, size), work)


def _getxattr(req, ino, name, size):
    def work():
        value = _ops.do_getxattr(ino, name)
        if size == 0:
            _fuse.fuse_reply_xattr(ctypes.c_void_p(req), len(value))
        elif len(value) > size:
            _reply_err(req, errno.ERANGE)
        else:
            _fuse.fuse_reply_buf(ctypes.c_void_p(req), value, len(value))

    _answer(req, "getxattr", (ino, name), work)


def _nanoseconds(sec: int, nsec: int) -> int:
    return sec * 1_000_000_000 + nsec


def _setattr_changes(a: _Stat, to_set: int) -> dict:
    now = time.time_ns() if to_set & (SET_ATIME_NOW | SET_MTIME_NOW) else None
    return {
        "mode": a.st_mode if to_set & SET_MODE else None,
        "uid": a.st_uid if to_set & SET_UID else None,
        "gid": a.st_gid if to_set & SET_GID else None,
        "size": a.st_size if to_set & SET_SIZE else None,
        "atime_ns": _nanoseconds(a.st_atime, a.st_atime_nsec) if to_set & SET_ATIME
        else now if to_set & SET_ATIME_NOW else None,
        "mtime_ns": _nanoseconds(a.st_mtime, a.st_mtime_nsec) if to_set & SET_MTIME
        else now if to_set & SET_MTIME_NOW else None,
    }


def _ready_node(ino: int):
    """The node of INO if a change to it needs no copy-up (so nothing has to wait)."""
    node = _ops.union.table.by_ino.get(ino)
    if node is None or _ops.union.needs_copy_up(node):
        return None
    return node


def _reply_err(req: int, err: int) -> None:
    _fuse.fuse_reply_err(ctypes.c_void_p(req), err)


def _fh_to_ino(fi: int, ino: int) -> None:
    """Handle 0 (no OPEN was sent) means the file itself: our handles are inode numbers."""
    fh = ctypes.c_uint64.from_address(fi + FI_FH)
    if fh.value == 0:
        fh.value = ino


def _lseek(req, ino, off, whence, fi):
    def work():
        pos = os.lseek(_ops.fd_for(ino, False), off, whence)
        _fuse.fuse_reply_lseek(ctypes.c_void_p(req), ctypes.c_int64(pos))

    _answer(req, "lseek", (ino, off, whence), work)


def _fallocate(req, ino, mode, offset, length, fi):
    def work():
        fd = _ops.fd_for(ino, True)  # (a copy-up here is done in place: rare, may take a while)
        if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
            err = ctypes.get_errno() or errno.EIO
            raise OSError(err, os.strerror(err))
        _reply_err(req, 0)

    _answer(req, "fallocate", (ino, mode, offset, length), work)


_fuse = None
_libc = None
_ops = None
_FUSEError = None


def install(pyfuse3_module, ops) -> bool:
    """Interpose before pyfuse3.init(); returns whether the extras are in place.

    OPS is the adapter (fs.UnionOperations): its `do_*` functions, `fd_for` and timeouts.
    """
    global _fuse, _libc, _ops, _FUSEError
    _ops = ops
    _FUSEError = pyfuse3_module.FUSEError
    try:
        _fuse = ctypes.CDLL("libfuse3.so.3", use_errno=True)
        _libc = ctypes.CDLL(None, use_errno=True)
        _fuse.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _fuse.fuse_reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        _fuse.fuse_reply_attr.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double]
        _fuse.fuse_reply_entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        _fuse.fuse_reply_buf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        _fuse.fuse_reply_xattr.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _fuse.fuse_reply_write.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _fuse.fuse_reply_create.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        _fuse.fuse_req_ctx.argtypes = [ctypes.c_void_p]
        _fuse.fuse_req_ctx.restype = ctypes.c_void_p
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        real_new = ctypes.cast(_fuse.fuse_session_new, ctypes.c_void_p).value
        so = pyfuse3_module.__file__
        offset = _slot_offset(so, b"fuse_session_new")
        mapped = _mapping(so)
        if offset is None or mapped is None:
            log.debug("pyfuse3 extras: no import slot found in %s", so)
            return False
        slot = mapped[0] + offset
        base, perms = _mapping(so, slot)
        if perms is None or ctypes.c_void_p.from_address(slot).value != real_new:
            log.debug("pyfuse3 extras: unexpected import slot for fuse_session_new")
            return False
        if "w" not in perms:
            page = slot & ~(os.sysconf("SC_PAGE_SIZE") - 1)
            if _libc.mprotect(ctypes.c_void_p(page), os.sysconf("SC_PAGE_SIZE"), 3) != 0:
                return False
    except (OSError, AttributeError, ValueError, struct.error) as e:
        log.debug("pyfuse3 extras unavailable: %s", e)
        return False

    session_new = _SESSION_NEW(real_new)

    def new(args, ops, size, userdata):
        count = size // ctypes.sizeof(ctypes.c_void_p)
        table = (ctypes.c_void_p * max(count, OP_LSEEK + 1))()
        ctypes.memmove(table, ops, size)
        if count > OP_LSEEK:
            _complete(table)
        _keep.append(table)
        return session_new(args, table, size, userdata)

    hook = _SESSION_NEW(new)
    _keep.extend([hook, session_new])
    ctypes.c_void_p.from_address(slot).value = ctypes.cast(hook, ctypes.c_void_p).value
    return True


def _complete(table) -> None:
    """Fill in lseek and fallocate, answer OPEN/RELEASE, and wrap init, opendir and the I/O."""
    if not all(table[i] for i in (OP_INIT, OP_OPENDIR, OP_READ, OP_WRITE, OP_WRITE_BUF, OP_FSYNC,
                                  OP_SETATTR, OP_READDIRPLUS, OP_FSYNCDIR)):
        log.debug("pyfuse3 extras: unexpected handler table, left alone")
        return
    pyfuse_init = _INIT_CALL(table[OP_INIT])

    def init(userdata, conn):
        pyfuse_init(userdata, conn)
        capable = ctypes.c_uint.from_address(conn + CONN_CAPABLE)
        want = ctypes.c_uint.from_address(conn + CONN_WANT)
        if capable.value & FUSE_CAP_CACHE_SYMLINKS:
            want.value |= FUSE_CAP_CACHE_SYMLINKS
        want.value &= ~FUSE_CAP_ATOMIC_O_TRUNC  # O_TRUNC must reach us: no OPEN is sent

    def opendir(req, ino, fi):
        _reply_err(req, errno.ENOSYS)  # "no OPENDIR needed": listings are cached by the kernel

    pyfuse_readdirplus = _READ_CALL(table[OP_READDIRPLUS])
    pyfuse_fsyncdir = _FSYNC_CALL(table[OP_FSYNCDIR])

    def readdirplus(req, ino, size, off, fi):
        _fh_to_ino(fi, ino)
        pyfuse_readdirplus(req, ino, size, off, fi)

    def fsyncdir(req, ino, datasync, fi):
        _fh_to_ino(fi, ino)
        pyfuse_fsyncdir(req, ino, datasync, fi)

    def open_(req, ino, fi):
        _reply_err(req, errno.ENOSYS)  # "no OPEN needed": the kernel stops sending them

    def release(req, ino, fi):
        _reply_err(req, 0)  # nothing is kept per open

    pyfuse_write = _WRITE_CALL(table[OP_WRITE])
    pyfuse_write_buf = _WRITE_BUF_CALL(table[OP_WRITE_BUF])
    pyfuse_fsync = _FSYNC_CALL(table[OP_FSYNC])

    def write(req, ino, buf, size, off, fi):
        _fh_to_ino(fi, ino)
        pyfuse_write(req, ino, buf, size, off, fi)

    def write_buf(req, ino, bufv, off, fi):
        node = _ready_node(ino) if _FAST_PATHS else None
        vec = _BufVec.from_address(bufv) if node is not None else None
        if vec is None or vec.count != 1 or vec.buf[0].flags & FUSE_BUF_IS_FD:
            _fh_to_ino(fi, ino)
            pyfuse_write_buf(req, ino, bufv, off, fi)  # may copy up: pyfuse3's async path
            return
        data = ctypes.string_at(vec.buf[0].mem + vec.off, vec.buf[0].size - vec.off)

        def work():
            _fuse.fuse_reply_write(ctypes.c_void_p(req), _ops.do_write(node, off, data))

        _answer(req, "write", (ino, off, data if len(data) <= 64 else f"<{len(data)} bytes>"), work)

    pyfuse_setattr = _SETATTR_CALL(table[OP_SETATTR])

    def setattr_(req, ino, attr, to_set, fi):
        node = _ready_node(ino) if _FAST_PATHS else None
        if node is None:
            if fi:
                _fh_to_ino(fi, ino)
            pyfuse_setattr(req, ino, attr, to_set, fi)  # may copy up: pyfuse3's async path
            return

        def work():
            out = _Stat()
            _fill(out, node, _ops.do_setattr(node, **_setattr_changes(_Stat.from_address(attr), to_set)))
            _fuse.fuse_reply_attr(ctypes.c_void_p(req), ctypes.byref(out), _ops.attr_timeout)

        _answer(req, "setattr", (ino, to_set), work)

    def fsync(req, ino, datasync, fi):
        _fh_to_ino(fi, ino)
        pyfuse_fsync(req, ino, datasync, fi)

    wrappers = {
        OP_INIT: _INIT(init), OP_FALLOCATE: _FALLOCATE(_fallocate), OP_LSEEK: _LSEEK(_lseek),
        OP_OPENDIR: _OPENDIR(opendir), OP_OPEN: _OPEN(open_), OP_RELEASE: _OPEN(release),
        OP_WRITE: _WRITE(write), OP_WRITE_BUF: _WRITE_BUF(write_buf), OP_FSYNC: _FSYNC(fsync),
        OP_SETATTR: _SETATTR(setattr_), OP_READDIRPLUS: _READ(readdirplus),
        OP_FSYNCDIR: _FSYNC(fsyncdir),
    }
    if _FAST_PATHS:
        wrappers.update({OP_LOOKUP: _LOOKUP(_lookup), OP_GETATTR: _GETATTR(_getattr),
                         OP_READ: _READ(_read), OP_GETXATTR: _GETXATTR(_getxattr),
                         OP_MKDIR: _MKDIR(_mkdir), OP_CREATE: _CREATE(_create),
                         OP_UNLINK: _LOOKUP(_unlink), OP_RMDIR: _LOOKUP(_rmdir)})
    else:  # handle 0 is the inode for pyfuse3's own read too
        pyfuse_read = _READ_CALL(table[OP_READ])

        def read(req, ino, size, off, fi):
            _fh_to_ino(fi, ino)
            pyfuse_read(req, ino, size, off, fi)

        wrappers[OP_READ] = _READ(read)
        _keep.append(pyfuse_read)
    for index, callback in wrappers.items():
        table[index] = ctypes.cast(callback, ctypes.c_void_p).value
    _keep.extend([*wrappers.values(), pyfuse_init, pyfuse_write, pyfuse_write_buf,
                  pyfuse_fsync, pyfuse_setattr, pyfuse_readdirplus, pyfuse_fsyncdir])
    _ops.no_opendir = True
