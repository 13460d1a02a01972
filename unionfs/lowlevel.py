"""What pyfuse3 leaves out of libfuse's low-level API: lseek, fallocate, caching flags, no-open.

pyfuse3 hands libfuse a fixed table of request handlers and never sets the kernel's readdir
and symlink caches. `install()` interposes on the one call that hands that table over
(`fuse_session_new`, through pyfuse3's own import slot for it) and completes the table:

- LSEEK (SEEK_DATA/SEEK_HOLE) and FALLOCATE answered on the branch file's fd;
- opendir replies marked cache_readdir + keep_cache, so the kernel caches listings (it drops
  them itself when an entry changes through the mount; `pyunion refresh` drops the rest);
- FUSE_CAP_CACHE_SYMLINKS asked for at init, so readlink results are cached too;
- OPEN answered ENOSYS, so the kernel stops sending OPEN (and needs no reply to RELEASE
  from Python): file handles are inode numbers (see datafds), which the wrappers of read,
  write and fsync put where the kernel sends handle 0. Atomic O_TRUNC is turned off, so a
  truncating open still reaches the daemon, as a SETATTR.

Everything is checked before it is touched (ELF layout, the slot's current value, page
permissions); when anything is unexpected nothing is changed and the mount simply works
without these extras.
"""

import ctypes
import errno
import logging
import os
import struct

log = logging.getLogger(__name__)

# indices in struct fuse_lowlevel_ops (libfuse 3.x: members are only ever appended)
OP_INIT = 0
OP_OPEN = 14
OP_READ = 15
OP_WRITE = 16
OP_RELEASE = 18
OP_FSYNC = 19
OP_OPENDIR = 20
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
FI_CACHE_READDIR = 1 << 6
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
_OPENDIR_CALL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)
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


def _reply_err(req: int, err: int) -> None:
    _fuse.fuse_reply_err(ctypes.c_void_p(req), err)


def _fh_to_ino(fi: int, ino: int) -> None:
    """Handle 0 (no OPEN was sent) means the file itself: our handles are inode numbers."""
    fh = ctypes.c_uint64.from_address(fi + FI_FH)
    if fh.value == 0:
        fh.value = ino


def _lseek(req, ino, off, whence, fi):
    try:
        fd = _fd_for(ino, False)
        _fuse.fuse_reply_lseek(ctypes.c_void_p(req), ctypes.c_int64(os.lseek(fd, off, whence)))
    except OSError as e:
        _reply_err(req, e.errno or errno.EIO)
    except Exception:
        log.exception("lseek failed")
        _reply_err(req, errno.EIO)


def _fallocate(req, ino, mode, offset, length, fi):
    try:
        fd = _fd_for(ino, True)
        if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
            _reply_err(req, ctypes.get_errno() or errno.EIO)
        else:
            _reply_err(req, 0)
    except OSError as e:
        _reply_err(req, e.errno or errno.EIO)
    except Exception:
        log.exception("fallocate failed")
        _reply_err(req, errno.EIO)


_fuse = None
_libc = None
_fd_for = None


def install(pyfuse3_module, fd_for) -> bool:
    """Interpose before pyfuse3.init(); returns whether the extras are in place.

    FD_FOR(ino, write) gives the data fd of a file, for lseek and fallocate.
    """
    global _fuse, _libc, _fd_for
    _fd_for = fd_for
    try:
        _fuse = ctypes.CDLL("libfuse3.so.3", use_errno=True)
        _libc = ctypes.CDLL(None, use_errno=True)
        _fuse.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _fuse.fuse_reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
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
    if not all(table[i] for i in (OP_INIT, OP_OPENDIR, OP_READ, OP_WRITE, OP_WRITE_BUF, OP_FSYNC)):
        log.debug("pyfuse3 extras: unexpected handler table, left alone")
        return
    pyfuse_init = _INIT_CALL(table[OP_INIT])
    pyfuse_opendir = _OPENDIR_CALL(table[OP_OPENDIR])

    def init(userdata, conn):
        pyfuse_init(userdata, conn)
        capable = ctypes.c_uint.from_address(conn + CONN_CAPABLE)
        want = ctypes.c_uint.from_address(conn + CONN_WANT)
        if capable.value & FUSE_CAP_CACHE_SYMLINKS:
            want.value |= FUSE_CAP_CACHE_SYMLINKS
        want.value &= ~FUSE_CAP_ATOMIC_O_TRUNC  # O_TRUNC must reach us: no OPEN is sent

    def opendir(req, ino, fi):
        bits = ctypes.c_uint.from_address(fi + FI_BITS)
        bits.value |= FI_KEEP_CACHE | FI_CACHE_READDIR
        pyfuse_opendir(req, ino, fi)

    def open_(req, ino, fi):
        _reply_err(req, errno.ENOSYS)  # "no OPEN needed": the kernel stops sending them

    def release(req, ino, fi):
        _reply_err(req, 0)  # nothing is kept per open

    pyfuse_read = _READ_CALL(table[OP_READ])
    pyfuse_write = _WRITE_CALL(table[OP_WRITE])
    pyfuse_write_buf = _WRITE_BUF_CALL(table[OP_WRITE_BUF])
    pyfuse_fsync = _FSYNC_CALL(table[OP_FSYNC])

    def read(req, ino, size, off, fi):
        _fh_to_ino(fi, ino)
        pyfuse_read(req, ino, size, off, fi)

    def write(req, ino, buf, size, off, fi):
        _fh_to_ino(fi, ino)
        pyfuse_write(req, ino, buf, size, off, fi)

    def write_buf(req, ino, bufv, off, fi):
        _fh_to_ino(fi, ino)
        pyfuse_write_buf(req, ino, bufv, off, fi)

    def fsync(req, ino, datasync, fi):
        _fh_to_ino(fi, ino)
        pyfuse_fsync(req, ino, datasync, fi)

    wrappers = {
        OP_INIT: _INIT(init), OP_FALLOCATE: _FALLOCATE(_fallocate), OP_LSEEK: _LSEEK(_lseek),
        OP_OPENDIR: _OPENDIR(opendir), OP_OPEN: _OPEN(open_), OP_RELEASE: _OPEN(release),
        OP_READ: _READ(read), OP_WRITE: _WRITE(write), OP_WRITE_BUF: _WRITE_BUF(write_buf),
        OP_FSYNC: _FSYNC(fsync),
    }
    for index, callback in wrappers.items():
        table[index] = ctypes.cast(callback, ctypes.c_void_p).value
    _keep.extend([*wrappers.values(), pyfuse_init, pyfuse_opendir, pyfuse_read, pyfuse_write,
                  pyfuse_write_buf, pyfuse_fsync])
