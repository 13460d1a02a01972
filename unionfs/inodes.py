"""The inode table: nodes the kernel knows, their lookup counts, and stable inode numbers.

Inode numbers are derived with xxhash from an entry's origin (device, inode) — the lower
entry it was copied up from, if any — so they are unique within the mount, stable for its
life, and unchanged by copy-up.
"""

import struct

import xxhash

ROOT_INO = 1
_MASK = (1 << 63) - 1
_PACK = struct.Struct("<QQ").pack
_hash = xxhash.xxh64_intdigest

Key = tuple[int, int]  # (st_dev, st_ino) of an entry's origin
UNCHECKED = (-2, b"")  # Node.data_at before its file was looked at


class Node:
    """An inode of the merged view."""

    __slots__ = ("ino", "key", "path", "branch", "is_dir", "lookups", "opens", "layers",
                 "stop", "parent", "aliases", "handles", "xattrs", "unsynced", "data_at")

    def __init__(self, ino: int, key: Key, path: bytes, branch: int, is_dir: bool):
        self.ino = ino
        self.key = key
        self.path = path  # a path of the merged view naming it (b"" for the root)
        self.branch = branch  # branch holding its data (for directories: the top-most one)
        self.is_dir = is_dir
        self.lookups = 0
        self.opens = 0
        # directories: branches merged, top first (None: not known yet), and the lowest
        # branch that the top-down walk reached (entries below it are hidden)
        self.layers: tuple[int, ...] | None = None
        self.stop = 0
        self.parent: Node | None = None  # directories only
        self.aliases: set[bytes] | None = None  # other known names of a hard-linked file
        self.handles: list | None = None  # open directory handles (directories only)
        # names of the extended attributes it has (None: not read yet); see MergedView.getxattr
        self.xattrs: tuple[bytes, ...] | None = None
        self.unsynced = 0  # bytes written through the mount since its last fsync began
        # for a metadata-only copy (see metacopy): (branch, path) of the file holding its
        # data, branch -1 if none does; None: its own file holds it; UNCHECKED: not known yet
        self.data_at: tuple[int, bytes] | None = None if is_dir else UNCHECKED

    @property
    def name(self) -> bytes:
        return self.path.rpartition(b"/")[2]

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.path!r} b{self.branch}>"


def split(path: bytes) -> tuple[bytes, bytes]:
    """(directory, name) of a merged-view path."""
    d, _, n = path.rpartition(b"/")
    return d, n


def join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory else name


class InodeTable:
    """Live nodes by inode number and by origin key."""

    def __init__(self, root: Node):
        self.by_ino: dict[int, Node] = {ROOT_INO: root}
        self.by_key: dict[Key, Node] = {root.key: root}
        self._assigned: dict[Key, int] = {}  # keys whose hash collided, with their number
        self.root = root
        root.lookups = 1

    def ino_for(self, key: Key) -> int:
        """The inode number for a new node of KEY: its hash, unless a node the kernel still
        holds has that number (a hash collision, or an old file whose number the filesystem
        gave to a new one: the kernel may still send requests and FORGETs for the old one)."""
        ino = self._assigned.get(key)
        if ino is None:  # the common case: its hash, if free
            ino = _hash(_PACK(*key), 0) & _MASK
            if ino > ROOT_INO and self.by_ino.get(ino) is None:
                return ino
        if self._free(ino, key):
            return ino
        seed = 0
        while True:
            ino = _hash(_PACK(*key), seed) & _MASK
            if ino > ROOT_INO and self._free(ino, key):
                if seed:
                    self._assigned[key] = ino
                return ino
            seed += 1

    def ino_of(self, key: Key) -> int:
        """The inode number a node of KEY has, or would get (for listings, which create no
        nodes): what a later lookup gives, unless a hash collision happens in between."""
        node = self.by_key.get(key)
        if node is not None:
            return node.ino
        ino = self._assigned.get(key)
        if ino is None:
            ino = _hash(_PACK(*key), 0) & _MASK
        return ino if ino > ROOT_INO else self.ino_for(key)

    def _free(self, ino: int, key: Key) -> bool:
        """Whether INO may be given to a new node of KEY: no other file's node has it, and no
        earlier node of KEY that the kernel still holds."""
        other = self.by_ino.get(ino)
        return other is None or (other.key == key and other.lookups <= 0 and other.opens <= 0)

    def get(self, ino: int) -> Node:
        return self.by_ino[ino]

    def add(self, node: Node) -> None:
        self.by_ino[node.ino] = node
        self.by_key[node.key] = node

    def rekey(self, node: Node, key: Key) -> None:
        """Give NODE a new origin key, keeping its inode number."""
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        node.key = key
        self._assigned[key] = node.ino
        self.by_key[key] = node

    def unref(self, node: Node, count: int) -> None:
        node.lookups -= count
        self.drop_if_unused(node)

    def drop_if_unused(self, node: Node) -> None:
        if node.lookups <= 0 and node.opens <= 0 and node.ino != ROOT_INO:
            if self.by_ino.get(node.ino) is node:
                del self.by_ino[node.ino]
            if self.by_key.get(node.key) is node:
                del self.by_key[node.key]

    def forget_all(self) -> None:
        for node in list(self.by_ino.values()):
            node.lookups = 0
            node.opens = 0
            self.drop_if_unused(node)

    def under(self, path: bytes):
        """Live nodes strictly below PATH."""
        prefix = path + b"/"
        return [n for n in self.by_ino.values() if n.path.startswith(prefix)]
