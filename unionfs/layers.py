"""Branches at run time: their root fds, work areas, and a bounded cache of directory fds."""

import errno
import fcntl
import os
import stat
from bisect import bisect_left, insort
from collections import OrderedDict

from unionfs import syscalls
from unionfs.branches import BranchSpec
from unionfs.whiteout import WORKDIR

INDEX = b"index"  # in the work area: hard links to copies of hard-linked lower files
SHARED_EMPTY = b"whiteout"  # in the work area: the empty file whiteout files are links of
EMPTY_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Branch:
    """One branch directory of a mounted union, held open by fd."""

    def __init__(self, index: int, spec: BranchSpec):
        self.index = index
        self.path = os.fsencode(spec.path)
        self.mode = spec.mode
        self.writable = spec.writable
        self.honours_whiteouts = spec.honours_whiteouts
        self.fd = os.open(self.path, syscalls.O_PATH_DIR)
        self.dev = os.fstat(self.fd).st_dev
        self._work_fd: int | None = None
        self._index_fd: int | None = None
        self._work_parent: tuple[int, bytes] | None = None  # (dirfd, name) of the work area
        self._links_empty = True  # whether add_empty_file links (see there)

    def use_workdir(self, path: str) -> None:
        """Use an external work directory (overlay's workdir=); it must share our filesystem."""
        parent_fd = os.open(path, syscalls.O_PATH_DIR)
        if os.fstat(parent_fd).st_dev != self.dev:
            os.close(parent_fd)
            raise OSError(errno.EXDEV, "workdir is not on the same filesystem as upperdir", path)
        self._work_parent = (parent_fd, b"pyunion")

    def _work_location(self) -> tuple[int, bytes]:
        return self._work_parent or (self.fd, WORKDIR)

    def lock(self) -> None:
        """Open the work area and hold it locked while mounted: a second union is refused.

        Leftovers of an interrupted copy-up are removed (the hard-link index stays).
        """
        parent, name = self._work_location()
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            fd = syscalls.open_beneath(parent, name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:  # (name the branch, not the work area's relative name)
            raise OSError(e.errno, f"cannot make its work area {os.fsdecode(name)}: {e.strerror}",
                          self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(errno.EBUSY, "in use by another pyunion mount", self.path) from None
        self._work_fd = fd
        for child in map(os.fsencode, os.listdir(fd)):
            if child != INDEX:
                remove_tree_at(fd, child)

    def index_entries(self) -> list[tuple[bytes, os.stat_result]]:
        """The hard-link index: (name, lstat) of each entry (see Union._index)."""
        parent, name = self._work_location()
        try:
            fd = syscalls.open_beneath(parent, name + b"/" + INDEX, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            return [(n, os.stat(n, dir_fd=fd, follow_symlinks=False))
                    for n in map(os.fsencode, os.listdir(fd))]
        finally:
            os.close(fd)

    @property
    def index_fd(self) -> int:
        """The hard-link index directory inside the work area, created on first use."""
        if self._index_fd is None:
            try:
                os.mkdir(INDEX, 0o700, dir_fd=self.work_fd)
            except FileExistsError:
                pass
            self._index_fd = syscalls.open_beneath(self.work_fd, INDEX)
        return self._index_fd

    def add_empty_file(self, dfd: int, name: bytes) -> None:
        """Make NAME in directory DFD an empty file (a whiteout); FileExistsError if NAME exists.

        It is a new link of one empty file in the work area, as kernel overlayfs links its
        whiteouts to one inode: no inode is allocated now or freed when it goes (on ext4,
        linking and unlinking cost about half as much), and removing a tree of lower files
        cannot run the branch out of inodes. Where links fail (too many of them, a directory
        on another filesystem, a filesystem without hard links) a file of its own is made.
        """
        for _ in range(2):
            if not self._links_empty:
                break
            try:
                os.link(SHARED_EMPTY, name, src_dir_fd=self.work_fd, dst_dir_fd=dfd,
                        follow_symlinks=False)
                return
            except FileNotFoundError:  # first use in this mount (or removed meanwhile)
                pass
            except OSError as e:
                if e.errno == errno.EEXIST:
                    raise
                if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                    self._links_empty = False  # a filesystem without hard links
                if e.errno != errno.EMLINK:
                    break  # (a real failure, full disk or such, fails the file's creation too)
            try:  # a fresh shared file; the old inode lives on in its links
                os.unlink(SHARED_EMPTY, dir_fd=self.work_fd)
            except FileNotFoundError:
                pass
            os.close(os.open(SHARED_EMPTY, EMPTY_FILE_FLAGS, 0o600, dir_fd=self.work_fd))
        os.close(os.open(name, EMPTY_FILE_FLAGS, 0o600, dir_fd=dfd))

    @property
    def work_fd(self) -> int:
        """The work area's directory fd (see lock)."""
        if self._work_fd is None:
            self.lock()
        return self._work_fd

    def close(self) -> None:
        """Close the branch; an empty work area (and index) is removed, unlocking it."""
        if self._index_fd is not None:
            os.close(self._index_fd)
            self._index_fd = None
        if self._work_fd is not None:
            for name, remove in ((SHARED_EMPTY, os.unlink), (INDEX, os.rmdir)):
                try:
                    remove(name, dir_fd=self._work_fd)
                except OSError:
                    pass
            parent, name = self._work_location()
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError:
                pass
            os.close(self._work_fd)
            self._work_fd = None
        if self._work_parent is not None:
            os.close(self._work_parent[0])
            self._work_parent = None
        os.close(self.fd)


def branch_in_use(path: str | bytes) -> bool:
    """Whether a pyunion mount is using PATH as its writable branch (see Branch.lock)."""
    try:
        fd = os.open(os.path.join(os.fsencode(path), WORKDIR),
                     os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _open_for_removal(dirfd: int, name: bytes) -> tuple[int, list[bytes]]:
    """Open directory NAME, remove its non-directories; (its fd, its subdirectory names)."""
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) & stat.S_IRWXU != stat.S_IRWXU:  # read-only trees (rootless)
        os.chmod(name, stat.S_IMODE(st.st_mode) | stat.S_IRWXU, dir_fd=dirfd)
    fd = syscalls.open_beneath(dirfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(os.fsencode(entry.name))
            else:
                os.unlink(entry.name, dir_fd=fd)
    return fd, subdirs


def remove_tree_at(dirfd: int, name: bytes) -> None:
    """Remove NAME in DIRFD and everything below it, never following a symlink.

    Iterative, one fd per level, so any depth a container can create is fine; directories
    made read-only are opened up first. A missing NAME is no error.
    """
    st = syscalls.lstat_at(dirfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    stack = [(dirfd, name, *_open_for_removal(dirfd, name))]
    try:
        while stack:
            _, _, fd, subdirs = stack[-1]
            if subdirs:
                child = subdirs.pop()
                stack.append((fd, child, *_open_for_removal(fd, child)))
                continue
            parent, dname, fd, _ = stack.pop()
            os.close(fd)
            os.rmdir(dname, dir_fd=parent)
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)

class DirFdCache:
    """O_PATH fds of branch directories, keyed by (branch index, path), least recently used out.

    The cached paths are also kept sorted, so that dropping a directory and everything below
    it (`forget`, on every rmdir and directory rename) finds them by bisection instead of
    scanning the whole cache.
    """

    def __init__(self, branches: list[Branch], size: int = 1024):
        self._branches = branches
        self._size = size
        self._fds: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        self._paths: list[bytes] = []  # sorted: each path with an fd in some branch, once
        self._held: dict[bytes, int] = {}  # path -> in how many branches it has an fd

    def get(self, branch: int, path: bytes) -> int:
        """The fd of directory PATH in BRANCH; raises OSError if it is not a directory there."""
        if not path:
            return self._branches[branch].fd
        key = (branch, path)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = syscalls.open_beneath(self._branches[branch].fd, path)
        self._fds[key] = fd
        held = self._held.get(path, 0)
        if not held:
            insort(self._paths, path)
        self._held[path] = held + 1
        if len(self._fds) > self._size:
            (_, old_path), old = self._fds.popitem(last=False)
            os.close(old)
            self._release(old_path)
        return fd

    def _release(self, path: bytes) -> None:
        held = self._held.pop(path) - 1
        if held:
            self._held[path] = held
        else:
            del self._paths[bisect_left(self._paths, path)]

    def cached(self, branch: int, path: bytes) -> int | None:
        """The fd of directory PATH in BRANCH if one is open (none is opened)."""
        return self._fds.get((branch, path)) if path else self._branches[branch].fd

    def lookup(self, branch: int, path: bytes) -> int | None:
        """Like get, but None when PATH is missing or not a directory in BRANCH."""
        try:
            return self.get(branch, path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                return None
            raise

    def forget(self, path: bytes) -> None:
        """Drop PATH and everything below it (after a rename or removal)."""
        paths = self._paths
        prefix = path + b"/"  # (everything below PATH sorts together, right after this)
        start = end = bisect_left(paths, prefix)
        while end < len(paths) and paths[end].startswith(prefix):
            end += 1
        doomed = paths[start:end]
        del paths[start:end]
        i = bisect_left(paths, path)
        if i < len(paths) and paths[i] == path:
            del paths[i]
            doomed.append(path)
        for p in doomed:
            del self._held[p]
            for b in range(len(self._branches)):
                fd = self._fds.pop((b, p), None)
                if fd is not None:
                    os.close(fd)

    def clear(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        self._paths.clear()
        self._held.clear()
