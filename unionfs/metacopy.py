"""Metadata-only copies: the branch format of a file copied up for a change of its metadata.

A chown, chmod, utimes or xattr change of a lower file does not need its data: the copy in
the writable branch is a file of the same size with no data blocks, carrying the new
metadata and the xattr `user.pyunion.metacopy`, whose value is the path (from the branch
root) of the lower file that holds the data. It is looked up in the branches below the copy,
top-down; a metadata-only copy found there leads further down. The first write that needs
the data fills the copy in place from that file, syncs it, and only then removes the xattr:
a crash leaves either the copy still reading the lower data, or the whole data.

A write at or past the end of the lower file's data (an append, or one that only repeats the
bytes before that end), or a truncation to that end or past it, needs none of it: it goes
into the copy as it is, and the copy holds the bytes past that end itself, its tail. So a copy reads its first min(lower size, own size) bytes
from the lower file, the rest from its own file. A copy with a tail is never the lower file
of another copy (a metadata-only copy of it gets whole data instead). (Kernel overlayfs'
`metacopy=on` works alike; its copies, marked `overlay.metacopy` and, if moved,
`overlay.redirect`, are read the same way where they are found in lower branches.)
"""

import errno
import os

from unionfs import syscalls

MARKER = b"user.pyunion.metacopy"
_MARKER = MARKER.decode()
_OVERLAY_PREFIXES = ("trusted.overlay.", "user.overlay.")
_UNSUPPORTED = (errno.ENOTSUP, errno.EPERM, errno.EACCES)


def origin_at(dfd: int, name: bytes, path: bytes) -> bytes | None:
    """Where the data of NAME in directory DFD is, if it is a metadata-only copy: a path
    from the branch root; else None (also if it is gone). PATH: its own path there."""
    return origin_of(syscalls.proc_path(dfd, name), path)


def origin_of(file: int | bytes, path: bytes) -> bytes | None:
    """Like origin_at, for an open fd of the file or its path (not followed if a symlink)."""
    follow = isinstance(file, int)
    try:
        names = os.listxattr(file, follow_symlinks=follow)
        if not names:
            return None
        if _MARKER in names:
            return os.getxattr(file, MARKER, follow_symlinks=follow) or None
        for prefix in _OVERLAY_PREFIXES:
            if prefix + "metacopy" in names:
                if prefix + "redirect" not in names:
                    return path  # (not moved: the same path below)
                redirect = os.getxattr(file, prefix + "redirect", follow_symlinks=follow)
                if redirect.startswith(b"/"):
                    return redirect.lstrip(b"/")
                return path.rpartition(b"/")[0] + b"/" + redirect if b"/" in path else redirect
    except OSError:
        return None
    return None


def is_relative(path: bytes) -> bool:
    """Whether PATH can name a file below a branch root: relative, no `..`, no NUL (the
    marks come from branches, which may be anyone's)."""
    return bool(path) and not path.startswith(b"/") and b"\0" not in path \
        and b".." not in path.split(b"/")


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


def is_marked(fd: int) -> bool:
    """Whether the file open as FD carries pyunion's mark (overlayfs' marks are not ours to
    remove: a copy that has them is left as it is)."""
    try:
        return _MARKER in os.listxattr(fd)
    except OSError:
        return False


def unmark(fd: int) -> None:
    """The copy open as FD holds its data now."""
    try:
        os.removexattr(fd, MARKER)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
