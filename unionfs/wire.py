"""The kernel's FUSE protocol (linux/fuse.h, version 7.x): opcodes, flags and binary layouts.

Only what the session speaks is here. Every layout is the kernel's ABI in native byte order;
sizes are fixed for protocol minor versions >= 23 except where noted.
"""

import struct

MAJOR = 7
MINOR = 33  # what we speak; the kernel uses the smaller of its own and ours
OLDEST_MINOR = 21  # readdirplus

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, BMAP, DESTROY = 31, 32, 33, 34, 35, 36, 37, 38
IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 39, 40, 41, 42, 43, 44
RENAME2, LSEEK, COPY_FILE_RANGE, SYNCFS, TMPFILE, STATX = 45, 46, 47, 50, 51, 52
NAMES = {value: name.lower() for name, value in globals().items()
         if name.isupper() and isinstance(value, int) and name not in ("MAJOR", "MINOR", "OLDEST_MINOR")}
# requests the kernel expects no reply to
NO_REPLY = frozenset((FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY))

# notifications (sent with unique 0, the code in the error field)
NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY = 2, 3

# INIT flags
ASYNC_READ = 1 << 0
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30  # the INIT request and reply carry flags2, the flags from bit 32 on
OVER_IO_URING = 1 << 41  # requests may come through io_uring (see unionfs.uring)

# SETATTR's valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 128, 256
FATTR_KILL_SUIDGID = 1 << 11
# write_flags of WRITE: the writer lacks CAP_FSETID
WRITE_KILL_SUIDGID = 1 << 2
# open_flags of a reply to OPEN/CREATE
FOPEN_KEEP_CACHE = 1 << 1
FSYNC_FDATASYNC = 1

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid
# rdev blksize flags
_ATTR = "QQQqqqIIIIIIIIII"
ENTRY_OUT = struct.Struct("=QQQQII" + _ATTR)  # nodeid generation entry_valid attr_valid (+nsec)
ATTR_OUT = struct.Struct("=QII" + _ATTR)  # attr_valid attr_valid_nsec dummy
DIRENT = struct.Struct("=QQII")  # ino off namelen type; then the name padded to 8 bytes
DIRENTPLUS = struct.Struct(ENTRY_OUT.format + DIRENT.format[1:])  # an entry_out, then a dirent
OPEN_OUT = struct.Struct("=QII")  # fh open_flags padding
WRITE_OUT = struct.Struct("=II")  # size padding
XATTR_OUT = struct.Struct("=II")  # size padding
LSEEK_OUT = struct.Struct("=Q")
STATFS_OUT = struct.Struct("=QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
INIT_IN_FLAGS2 = struct.Struct("=I")  # after INIT_IN, where the kernel sets INIT_EXT
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 (minor >= 23; older kernels take the first 24 bytes)
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")
INIT_OUT_COMPAT_SIZE = 24
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")  # parent namelen flags

# request bodies, after the 40-byte header
BODY = IN_HEADER.size
GETATTR_IN = struct.Struct("=IIQ")  # getattr_flags dummy fh
# valid pad fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode unused uid
# gid unused
SETATTR_IN = struct.Struct("=IIQQQqqqIIIIIIII")
MKNOD_IN = struct.Struct("=IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")  # mode umask
RENAME_IN = struct.Struct("=Q")  # newdir
RENAME2_IN = struct.Struct("=QII")  # newdir flags padding
LINK_IN = struct.Struct("=Q")  # oldnodeid
OPEN_IN = struct.Struct("=II")  # flags open_flags
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags padding; the data follows
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("=II")  # size flags
GETXATTR_IN = struct.Struct("=II")  # size padding
ACCESS_IN = struct.Struct("=II")  # mask padding
FORGET_IN = struct.Struct("=Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("=II")  # count dummy
FORGET_ONE = struct.Struct("=QQ")  # nodeid nlookup
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence padding

assert ENTRY_OUT.size == 128 and ATTR_OUT.size == 104 and SETATTR_IN.size == 88
assert INIT_OUT.size == 64 and STATFS_OUT.size == 80 and READ_IN.size == 40
