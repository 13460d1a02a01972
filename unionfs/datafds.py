"""Open fds of files' data, one per file and shared by all its opens (a file handle is the inode).

Opening per file rather than per open lets the kernel skip OPEN requests altogether (see
session), and makes every reader see a file's current data, even after a copy-up. Fds are
kept least recently used first, up to a bound; a file removed while the kernel may still
read it keeps its fd pinned until the kernel forgets it. A metadata-only copy (see
metacopy) is read through an fd of its lower file, and its own file where it has a tail;
pinned, it keeps both files open.
"""

import errno
import os
from collections import OrderedDict

from unionfs import syscalls
from unionfs.inodes import Node


class DataFds:
    def __init__(self, union, limit: int = 1024):
        self.union = union
        self.limit = limit
        self._fds: OrderedDict[int, tuple[int, bool]] = OrderedDict()  # ino -> (fd, writable)
        self._pinned: dict[int, tuple[int, bool]] = {}
        self._pinned_data: dict[int, int] = {}  # pinned metadata-only copies: their lower file
        self._own: dict[int, int] = {}  # metadata-only copies' own files (see own)

    def get(self, node: Node, write: bool) -> int:
        """An fd of NODE's data, writable if WRITE (the caller has copied it up first)."""
        entry = self._pinned.get(node.ino)
        if entry is not None:
            if not write and node.ino in self._pinned_data:
                return self._pinned_data[node.ino]
            if entry[1] or not write:
                return entry[0]
            # its name went: the pinned fd is the only way to it (the name may hold another
            # file by now), so it is reopened for writing through itself
            fd = self._reopen_writable(node, entry[0])
            self._pinned[node.ino] = (fd, True)
            os.close(entry[0])
            return fd
        entry = self._fds.get(node.ino)
        if entry is not None:
            if entry[1] or not write:
                self._fds.move_to_end(node.ino)
                return entry[0]
            os.close(self._fds.pop(node.ino)[0])
        fd = self.union.open(node, os.O_RDWR if write else os.O_RDONLY)
        self.put(node, fd, write)
        return fd

    def put(self, node: Node, fd: int, writable: bool) -> None:
        old = self._fds.pop(node.ino, None)
        if old is not None:
            os.close(old[0])
        self._fds[node.ino] = (fd, writable)
        while len(self._fds) > self.limit:
            os.close(self._fds.popitem(last=False)[1][0])

    def current(self, node: Node) -> int | None:
        """NODE's own open file, if there is one (none is opened): to read or change its
        attributes and xattrs, or fill it (not the lower file a metadata-only copy reads),
        also when its name went (see pin). It holds the current data: every copy-up closes
        the fds of the lower file (see copied)."""
        entry = self._pinned.get(node.ino)
        if entry is not None:
            return entry[0]
        if node.data_at is not None:  # (its data fd may be a lower file's: see own)
            return self._own.get(node.ino)
        entry = self._fds.get(node.ino)
        return None if entry is None else entry[0]

    def own(self, node: Node) -> int:
        """The own file of NODE, a metadata-only copy, opened if need be: where the bytes past
        its lower data are (its tail, see metacopy); writable where its branch is."""
        fd = self.current(node)
        if fd is None:
            writable = self.union.branches[node.branch].writable
            fd = self.union.open_own(node, os.O_RDWR if writable else os.O_RDONLY)
            self._own[node.ino] = fd
        return fd

    def writable(self, node: Node) -> int | None:
        for table in (self._pinned, self._fds):
            entry = table.get(node.ino)
            if entry is not None and entry[1]:
                return entry[0]
        fd = self._own.get(node.ino)  # (a tail written: see own)
        return fd if fd is not None and self.union.branches[node.branch].writable else None

    def pin(self, node: Node) -> None:
        """Keep NODE's data reachable: its name is about to go, but the kernel may still read
        and write it (writable where its branch is: the name cannot reopen it afterwards)."""
        if node.ino in self._pinned:
            return
        writable = self.union.branches[node.branch].writable
        if writable and not node.is_dir and self._pin_metadata_only(node):
            return
        entry = self._fds.pop(node.ino, None)
        if entry is not None and writable and not entry[1]:
            os.close(entry[0])
            entry = None
        if entry is None:
            for flags in ((os.O_RDWR, os.O_RDONLY) if writable else (os.O_RDONLY,)):
                try:
                    entry = (self.union.open(node, flags), flags == os.O_RDWR)
                    break
                except PermissionError:  # (a file the daemon may not write: read-only will do)
                    continue
                except OSError:
                    return
            else:
                return
        self._pinned[node.ino] = entry

    def _pin_metadata_only(self, node: Node) -> bool:
        """Pin a metadata-only copy: its own file (its attributes, and where a write fills
        the data in), and its lower file to read. Removing it copies no data."""
        at = self.union.data_of(node)
        if at is None or at[0] < 0:
            return False
        data = self._fds.pop(node.ino, (None,))[0]
        try:
            if data is None:
                data = self.union.open(node, os.O_RDONLY)
            own = self.union.open_own(node, os.O_RDWR)
        except OSError:
            if data is not None:
                os.close(data)
            return False
        self._pinned[node.ino] = (own, True)
        self._pinned_data[node.ino] = data
        return True

    def _reopen_writable(self, node: Node, fd: int) -> int:
        if not self.union.branches[node.branch].writable:  # (never a lower branch's file)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return os.open(syscalls.proc_path(fd), os.O_RDWR | os.O_CLOEXEC)

    def pin_fd(self, node: Node, fd: int, writable: bool) -> None:
        """Pin FD as NODE's data: the file has no name left to open it by."""
        self.drop(node)
        self._pinned[node.ino] = (fd, writable)

    def copied(self, node: Node) -> None:
        """NODE's data moved (a copy-up, or the fill of a metadata-only copy): close the fds
        of its lower file (a pinned fd of its own file stays: a fill is done in place)."""
        entry = self._fds.pop(node.ino, None)
        if entry is not None:
            os.close(entry[0])
        data = self._pinned_data.pop(node.ino, None)
        if data is not None:
            os.close(data)
        own = self._own.pop(node.ino, None)
        if own is not None:
            os.close(own)

    def drop(self, node: Node) -> None:
        """Close NODE's fds: the kernel forgot it."""
        self.copied(node)
        entry = self._pinned.pop(node.ino, None)
        if entry is not None:
            os.close(entry[0])

    def clear(self) -> None:
        for table in (self._fds, self._pinned):
            while table:
                os.close(table.popitem()[1][0])
        for fds in (self._pinned_data, self._own):
            while fds:
                os.close(fds.popitem()[1])
