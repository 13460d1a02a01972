"""Metadata-only copies: the branch format of a file copied up for a change of its metadata.

A chown, chmod, utimes or xattr change of a lower file does not need its data: the copy in
the writable branch is a file of the same size with no data blocks, carrying the new
metadata and the xattr `user.pyunion.metacopy`, whose value is the path (from the branch
root) of the lower file that holds the data. It is looked up in the branches below the copy,
top-down; a metadata-only copy found there leads further down. The first write fills the
copy in place from that file, syncs it, and only then removes the xattr: a crash leaves
either the copy still reading the lower data, or the whole data. (Kernel overlayfs'
`metacopy=on` works alike.)
"""

import errno
import os

from unionfs import syscalls

MARKER = b"user.pyunion.metacopy"
_UNSUPPORTED = (errno.ENOTSUP, errno.EPERM, errno.EACCES)


def origin_at(dfd: int, name: bytes) -> bytes | None:
    """The data path recorded by the metadata-only copy NAME in directory DFD, or None if
    it is not one (or is gone)."""
    try:
        return os.getxattr(syscalls.proc_path(dfd, name), MARKER, follow_symlinks=False) or None
    except OSError:
        return None


def origin_of(file: int | bytes) -> bytes | None:
    """Like origin_at, for an open fd of the file or its path (not followed if a symlink)."""
    try:
        return os.getxattr(file, MARKER, follow_symlinks=isinstance(file, int)) or None
    except OSError:
        return None


def mark(fd: int, origin: bytes) -> bool:
    """Record ORIGIN as where the data of the copy open as FD is; False where the branch's
    filesystem keeps no user xattrs (then the copy must hold its data)."""
    try:
        os.setxattr(fd, MARKER, origin)
        return True
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise


def unmark(fd: int) -> None:
    """The copy open as FD holds its data now."""
    try:
        os.removexattr(fd, MARKER)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
