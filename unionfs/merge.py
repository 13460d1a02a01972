"""The merged view, read side: branch resolution, lookup, listing and attributes.

A name is looked up top-down through the branches of its directory: the first branch holding
it wins, a non-directory hides everything below, directories merge down to an opaque one, and
whiteouts hide names in the branches below theirs. Every access goes through directory fds
(see syscalls and layers), so symlinks inside branches are never followed.
"""

import errno
import logging
import os
import stat
import sys
from dataclasses import dataclass, field

from unionfs import metacopy, syscalls
from unionfs.branches import BranchSpec
from unionfs.inodes import ROOT_INO, UNCHECKED, InodeTable, Key, Node, join, split
from unionfs.layers import Branch, DirFdCache
from unionfs.whiteout import (
    CONTROL_XATTR,
    OPAQUE,
    OPAQUE_XATTRS,
    WH_PREFIX,
    fits_whiteout,
    is_internal_xattr,
    is_reserved,
    whited_out,
    whiteout_name,
)

log = logging.getLogger(__name__)

DT_DIR, DT_REG, DT_LNK = stat.S_IFDIR >> 12, stat.S_IFREG >> 12, stat.S_IFLNK >> 12
Listed = tuple[bytes, int, Key, int]  # a listed entry: name, branch, key, d_type (see listdir)
NO_XATTRS: tuple[bytes, ...] = ()
_OPAQUE_XATTR_STRS = tuple(os.fsdecode(x) for x in OPAQUE_XATTRS)


def _maybe_metacopy(node: Node, st: os.stat_result) -> bool:
    """Whether file NODE of attributes ST may be a metadata-only copy (see metacopy): known to
    be one, or not looked at yet and a regular file with fewer blocks than its size shows."""
    return node.data_at is not UNCHECKED or (st.st_blocks * 512 < st.st_size
                                             and stat.S_ISREG(st.st_mode))


def oserror(code: int, what: bytes | str | None = None) -> OSError:
    return OSError(code, os.strerror(code), what)


@dataclass
class Probe:
    """What the branches hold under one name of a directory, top-down until hidden."""

    entries: list[tuple[int, os.stat_result]] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)  # for a directory winner: branches merged
    stop: int = 0  # lowest branch whose entries of this name (or directory content) are visible

    @property
    def winner(self) -> tuple[int, os.stat_result] | None:
        return self.entries[0] if self.entries else None

    def below(self, branch: int) -> bool:
        """Whether a branch lower than BRANCH holds a visible entry of this name."""
        return any(b > branch for b, _ in self.entries)


class DirHandle:
    """An open directory: a snapshot of the merged listing, taken at the first read."""

    __slots__ = ("node", "entries", "removed", "done")

    def __init__(self, node: Node):
        self.node = node
        self.entries: list[Listed] | None = None
        self.removed: set[bytes] = set()
        self.done = False


class MergedView:
    """Branch directories seen as one tree, top first (no writes: see union.Union)."""

    def __init__(self, specs: list[BranchSpec], workdir: str | None = None, readonly: bool = False):
        self.branches: list[Branch] = []
        try:
            for i, spec in enumerate(specs):
                self.branches.append(Branch(i, spec))
            writable = [b.index for b in self.branches if b.writable]
            self.top_rw: int | None = None if readonly or not writable else writable[0]
            self.readonly = self.top_rw is None
            if workdir is not None and self.top_rw is not None:
                self.branches[self.top_rw].use_workdir(workdir)
            if not self.readonly:
                for b in self.branches:
                    if b.writable:
                        b.lock()
        except BaseException:
            self.close()
            raise
        self.dirs = DirFdCache(self.branches)
        # called with each node found to be a metadata-only copy in the writable branch, or
        # made one (see unionfs.filler), or None
        self.after_metadata_only = None
        self.origin: dict[Key, Key] = {}  # copied-up entry (dev, ino) -> key of its origin
        top = os.fstat(self.branches[0].fd)
        root = Node(ROOT_INO, (top.st_dev, top.st_ino), b"", 0, True)
        self.table = InodeTable(root)
        self._root_layers(root)
        base = os.statvfs(self.branches[self.top_rw if self.top_rw is not None else 0].fd)
        self.namemax = base.f_namemax  # (names too long for .wh. whiteouts get device ones)

    def close(self) -> None:
        if hasattr(self, "dirs"):
            self.dirs.clear()
        for b in self.branches:
            b.close()
        self.branches = []

    def _opaque(self, branch: int, path: bytes) -> bool:
        """Whether directory PATH in BRANCH hides the content of the branches below."""
        fd = self.dirs.lookup(branch, path)
        if fd is None:
            return False
        if syscalls.exists_at(fd, OPAQUE):
            return True
        try:
            names = os.listxattr(syscalls.proc_path(fd))
        except OSError:
            return False
        for x in _OPAQUE_XATTR_STRS:
            if x in names:
                try:
                    if os.getxattr(syscalls.proc_path(fd), x) == b"y":
                        return True
                except OSError:
                    pass
        return False

    def _root_layers(self, root: Node) -> None:
        layers = []
        for b in self.branches:
            layers.append(b.index)
            if b.honours_whiteouts and self._opaque(b.index, b""):
                break
        root.layers = tuple(layers)
        root.stop = layers[-1]

    def layers(self, node: Node) -> tuple[int, ...]:
        """The branches a directory node merges, top first."""
        if node.layers is None:
            if node.ino == ROOT_INO:
                self._root_layers(node)
            else:
                p = self.probe(node.parent, node.name)
                if not p.entries or not stat.S_ISDIR(p.entries[0][1].st_mode):
                    raise oserror(errno.ENOENT, node.path)
                node.layers, node.stop, node.branch = tuple(p.layers), p.stop, p.layers[0]
        return node.layers

    def probe(self, parent: Node, name: bytes, full: bool = False) -> Probe:
        """Look NAME up in the branches of directory PARENT, top-down.

        Stops at a whiteout, or (unless FULL) once the winner's merging is over; FULL goes on
        until `below` can answer for the branches that ask it (see `_probed_enough`): whether
        a removal needs a whiteout.
        """
        result = Probe(stop=parent.stop)
        merging = True
        path = join(parent.path, name)
        # whiteouts to look for: a `.wh.` file if NAME's fits, and none in the bottom branch,
        # where it would hide nothing (devices show in the lstat of NAME itself)
        wh_file = whiteout_name(name) if fits_whiteout(name) else None
        bottom = len(self.branches) - 1
        for b in self.layers(parent):
            br = self.branches[b]
            dfd = self.dirs.lookup(b, parent.path)
            if dfd is None:
                continue
            st = syscalls.lstat_at(dfd, name)
            if st is not None:
                if br.honours_whiteouts and syscalls.is_overlay_whiteout(st):
                    if merging:
                        result.stop = b
                    break
                result.entries.append((b, st))
                if merging:
                    if stat.S_ISDIR(st.st_mode):
                        result.layers.append(b)
                        if br.honours_whiteouts and self._opaque(b, path):
                            merging = False
                            result.stop = b
                    else:
                        merging = False
                        result.stop = b if len(result.entries) == 1 else b - 1
                if not merging and (not full or self._probed_enough(result)):
                    break
            if wh_file and br.honours_whiteouts and b != bottom \
                    and syscalls.exists_at(dfd, wh_file):
                if merging:
                    result.stop = b
                break
        return result

    def _probed_enough(self, p: Probe) -> bool:
        """Whether a FULL probe has what `below` is asked: only of a writable winner's branch
        and of the top writable branch, so one entry below the lower of those is enough."""
        b = p.entries[0][0]
        mark = b if self.branches[b].writable else self.top_rw
        return mark is None or p.entries[-1][0] > mark

    def check_name(self, name: bytes) -> None:
        if is_reserved(name):
            raise oserror(errno.EPERM if name != b".wh." else errno.EINVAL, name)
        if len(name) > self.namemax:
            raise oserror(errno.ENAMETOOLONG, name)

    def _key(self, st: os.stat_result) -> Key:
        k = (st.st_dev, st.st_ino)
        return self.origin.get(k, k)

    def _node_from(self, parent: Node, name: bytes, p: Probe) -> tuple[Node, os.stat_result]:
        """The node for a probed name (created if new), with its attributes."""
        b, st = p.entries[0]
        key = self._key(st)
        path = join(parent.path, name)
        is_dir = stat.S_ISDIR(st.st_mode)
        node = self.table.by_key.get(key)
        if node is not None and node.is_dir != is_dir:
            self.table.rekey(node, (-1, node.ino))
            node = None
        if node is None:
            node = Node(self.table.ino_for(key), key, path, b, is_dir)
            node.parent = parent
            self.table.add(node)
        elif is_dir:
            node.path, node.parent, node.branch = path, parent, b
        if is_dir:
            node.layers, node.stop = tuple(p.layers), p.stop
            return node, st
        if path != node.path:
            if node.branch == b and not self._alive(node):
                node.path, node.parent = path, parent  # the old name is gone
            else:
                if node.aliases is None:
                    node.aliases = {}
                node.aliases[path] = parent
        if node.branch != b:  # data already copied up through another name
            return node, self.stat(node)
        return node, self.with_data_blocks(node, st)

    def _alive(self, node: Node) -> bool:
        try:
            self.stat(node)
            return True
        except OSError:
            return False

    def lookup(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        if name in (b".", b".."):
            if name == b"." or parent.parent is None:
                node = parent if name == b"." else self.table.root
                return node, self.stat(node)
            return parent.parent, self.stat(parent.parent)
        if is_reserved(name):
            raise oserror(errno.ENOENT, name)
        if len(name) > self.namemax:
            raise oserror(errno.ENAMETOOLONG, name)
        p = self.probe(parent, name)
        if not p.entries:
            raise oserror(errno.ENOENT, name)
        return self._node_from(parent, name, self._resolve_copy(parent, name, p))

    def _resolve_copy(self, parent: Node, name: bytes, p: Probe) -> Probe:
        """Hook: the writable union redirects a name to an existing copy of its file."""
        return p

    def _location(self, node: Node) -> tuple[int, bytes]:
        """(directory fd in the node's branch, name) of the node's data."""
        parent = node.parent
        return self.dirs.get(node.branch, parent.path), node.name

    def stat(self, node: Node) -> os.stat_result:
        if node.ino == ROOT_INO:
            return os.fstat(self.branches[self.layers(node)[0]].fd)
        if node.is_dir:  # an open directory fd answers without a path walk
            fd = self.dirs.cached(node.branch, node.path)
            if fd is not None:
                return os.fstat(fd)
        try:
            dfd, name = self._location(node)
            st = syscalls.lstat_at(dfd, name)
        except OSError:
            st = None
        if st is not None and (node.is_dir != stat.S_ISDIR(st.st_mode)
                               or not node.is_dir and self._key(st) != node.key):
            st = None  # its name now holds another file: this one was removed
        if st is None:
            st = self._stat_alias(node)
        return self.with_data_blocks(node, st)

    # ----------------------------------------------------------------- metadata-only copies

    def data_of(self, node: Node, fd: int | None = None) -> tuple[int, bytes] | None:
        """(branch, path) of the file holding regular file NODE's data if its own file is a
        metadata-only copy (branch -1: no branch has it), else None; FD: its open file."""
        at = node.data_at
        if at is UNCHECKED:
            at = None
            if node.branch < len(self.branches) - 1:  # (nothing below the bottom to hold data)
                if fd is not None:
                    origin = metacopy.origin_of(fd, node.path)
                else:
                    dfd, name = self._location(node)
                    origin = metacopy.origin_at(dfd, name, node.path)
                if origin is not None:
                    at = self.find_data(node.branch, origin)
                    if at[0] < 0:
                        log.warning("no branch below %d holds the data of %r, a metadata-only "
                                    "copy of %r", node.branch, node.path, origin)
            node.data_at = at
            if at is not None and self.after_metadata_only is not None \
                    and node.branch == self.top_rw:
                self.after_metadata_only(node)
        return at

    def find_data(self, above: int, path: bytes) -> tuple[int, bytes]:
        """Where the data of a metadata-only copy in branch ABOVE that names PATH is: the first
        branch below holding PATH, or where that one's data is if it is such a copy too
        (ABOVE -1: from the top branch down)."""
        directory, name = split(path)
        for b in range(above + 1, len(self.branches) if metacopy.is_relative(path) else 0):
            dfd = self.dirs.lookup(b, directory)
            st = syscalls.lstat_at(dfd, name) if dfd is not None else None
            if st is None:
                continue
            if stat.S_ISREG(st.st_mode):
                origin = metacopy.origin_at(dfd, name, path)
                return (b, path) if origin is None else self.find_data(b, origin)
            break
        return (-1, path)

    def data_location(self, at: tuple[int, bytes]) -> tuple[int, bytes]:
        """(directory fd, name) of a file holding a metadata-only copy's data (see data_of)."""
        if at[0] < 0:
            raise oserror(errno.EIO, at[1])
        directory, name = split(at[1])
        return self.dirs.get(at[0], directory), name

    def with_data_blocks(self, node: Node, st: os.stat_result) -> os.stat_result:
        """ST, the attributes of NODE's own file, with the block count of the file holding its
        data where another one does (a metadata-only copy)."""
        if node.data_at is not None and _maybe_metacopy(node, st):
            return self._data_blocks(node, st)
        return st

    def _data_blocks(self, node: Node, st: os.stat_result) -> os.stat_result:
        at = self.data_of(node)
        if at is None or at[0] < 0:
            return st
        try:
            dfd, name = self.data_location(at)
            data = syscalls.lstat_at(dfd, name)
        except OSError:
            data = None
        if data is None:
            return st
        # (a copy with a tail holds blocks of its own too: see metacopy)
        return syscalls.with_blocks(st, data.st_blocks + (st.st_blocks if st.st_size > data.st_size
                                                          else 0))

    def _stat_alias(self, node: Node) -> os.stat_result:
        """The primary name of a hard-linked file is gone: continue under another one."""
        for path, parent in list((node.aliases or {}).items()):
            node.aliases.pop(path)
            d = self.dirs.lookup(node.branch, parent.path)
            name = path.rpartition(b"/")[2]
            st = syscalls.lstat_at(d, name) if d is not None else None
            if st is not None:
                node.path, node.parent = path, parent
                return st
        raise oserror(errno.ENOENT, node.path)

    def listdir(self, node: Node) -> list[Listed]:
        """The merged listing of a directory: (name, branch, key, d_type) of each visible entry.

        Only names and types are read (no stat but of devices, to find overlayfs whiteouts), so
        a plain listing costs no syscall per entry; `entry_attrs` stats an entry when asked.
        The key is (device of the directory, d_ino): the entry's own key unless it is a mount
        point or the branch is on a filesystem whose d_ino differs from st_ino.
        """
        listing: list[Listed] = []
        seen: set[bytes] = set()  # names listed, or hidden by a whiteout above
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        for b in self.layers(node):
            wh = self.branches[b].honours_whiteouts
            pfd = self.dirs.lookup(b, node.path)
            if pfd is None:
                continue
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            hides = []  # whiteouts here hide names in the branches below, not in this one
            try:
                dev = os.fstat(fd).st_dev
                with os.scandir(fd) as it:
                    for e in it:
                        name = e.name.encode(encoding, errors)
                        if name in seen:
                            continue
                        if name.startswith(WH_PREFIX):
                            if wh:
                                h = whited_out(name)
                                if h is not None:
                                    hides.append(h)
                            continue
                        if e.is_dir(follow_symlinks=False):
                            kind = DT_DIR
                        elif e.is_file(follow_symlinks=False):
                            kind = DT_REG
                        elif e.is_symlink():
                            kind = DT_LNK
                        else:
                            try:
                                st = e.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue
                            if wh and st.st_rdev == 0 and stat.S_ISCHR(st.st_mode):
                                hides.append(name)  # an overlayfs whiteout
                                continue
                            kind = stat.S_IFMT(st.st_mode) >> 12
                        seen.add(name)
                        listing.append((name, b, (dev, e.inode()), kind))
            finally:
                os.close(fd)
            seen.update(hides)
        return listing

    def listed_ino(self, key: Key) -> int:
        """The inode number of a listed entry of KEY (see listdir), as a lookup would give."""
        return self.table.ino_of(self.origin.get(key, key))

    def entry_attrs(self, parent: Node, name: bytes, b: int, d: int | None) -> tuple[Node, os.stat_result] | None:
        """Node and attributes for an entry listed in branch B, whose directory there is open
        as D (as a lookup would give, without probing); None if it is gone."""
        try:
            st = os.lstat(name, dir_fd=d) if d is not None else None
        except (FileNotFoundError, NotADirectoryError):
            st = None
        # (changed meanwhile, or a hard-linked file)
        if st is None or (st.st_nlink > 1 and self._has_copy_elsewhere(b, st)):
            try:
                return self.lookup(parent, name)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return None
                raise
        k = (st.st_dev, st.st_ino)
        key = self.origin.get(k, k) if self.origin else k
        table = self.table
        node = table.by_key.get(key)
        is_dir = stat.S_ISDIR(st.st_mode)
        if node is None:  # the common case: a fresh node (directories work out layers later)
            node = Node(table.ino_for(key), key, join(parent.path, name), b, is_dir)
            node.parent = parent
            table.add(node)
            return node, self.with_data_blocks(node, st)
        if is_dir and node.is_dir:
            return node, st
        return self._node_from(parent, name, Probe(entries=[(b, st)]))

    def attr_nlink(self, node: Node, st: os.stat_result) -> int:
        if node.is_dir and node.layers is not None and len(node.layers) > 1:
            return 1  # a merged directory's link count is unknown, as on overlayfs
        return st.st_nlink

    def _has_copy_elsewhere(self, b: int, st: os.stat_result) -> bool:
        """Hook: whether a listed lower file with more than one link was copied up under
        another of its names."""
        return False

    def readlink(self, node: Node) -> bytes:
        dfd, name = self._location(node)
        return os.readlink(name, dir_fd=dfd)

    def _xattr_path(self, node: Node) -> tuple[bytes, bool]:
        """A /proc path for NODE's xattrs, and whether to follow it (only our own root fd link)."""
        if node.ino == ROOT_INO:
            return syscalls.proc_path(self.branches[self.layers(node)[0]].fd), True
        dfd, name = self._location(node)
        return syscalls.proc_path(dfd, name), False

    def xattr_names(self, node: Node, fd: int | None = None) -> tuple[bytes, ...]:
        """The names of NODE's extended attributes, read once and then kept.

        The kernel asks for attributes most files do not have on every `ls -l` (SELinux
        labels) and before every write (file capabilities). Names only appear through us
        (setxattr, copy-up, new files; the writers reset `node.xattrs`) or by editing a branch
        directly, which `refresh` covers: so an absent name is answered without a syscall.
        FD: an open fd of the file's data, if there is one (cheaper than a /proc path, and
        still there when its name is gone).
        """
        names = node.xattrs
        if names is None:
            if fd is not None:
                found = os.listxattr(fd)
            else:
                path, follow = self._xattr_path(node)
                found = os.listxattr(path, follow_symlinks=follow)
            names = node.xattrs = tuple(map(os.fsencode, found)) if found else NO_XATTRS
        return names

    def getxattr(self, node: Node, name: bytes, fd: int | None = None) -> bytes | None:
        """The value of NODE's attribute NAME, or None if it has none (FD: see xattr_names)."""
        if is_internal_xattr(name) or name == CONTROL_XATTR or name not in self.xattr_names(node, fd):
            return None
        try:
            if fd is not None:
                return os.getxattr(fd, name)
            path, follow = self._xattr_path(node)
            return os.getxattr(path, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
            node.xattrs = None
            return None

    def listxattr(self, node: Node, fd: int | None = None) -> list[bytes]:
        node.xattrs = None
        return [n for n in self.xattr_names(node, fd) if not is_internal_xattr(n)]

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.branches[self.top_rw if self.top_rw is not None else 0].fd)

    def branch_names(self, node: Node) -> set[bytes]:
        """Every name any branch holds in directory NODE (whiteouts as the names they hide)."""
        names: set[bytes] = set()
        for b in self.layers(node):
            pfd = self.dirs.lookup(b, node.path)
            if pfd is None:
                continue
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            try:
                for name in map(os.fsencode, os.listdir(fd)):
                    names.add(whited_out(name) or name)
            finally:
                os.close(fd)
        names.discard(OPAQUE)
        return names

    def refresh(self) -> list[Node]:
        """Forget what is cached about the branches (after they were edited directly)."""
        self.dirs.clear()
        nodes = list(self.table.by_ino.values())
        for n in nodes:
            n.xattrs = None
            if n.is_dir:
                n.layers = None
            else:
                n.data_at = UNCHECKED
        self._root_layers(self.table.root)
        return nodes
