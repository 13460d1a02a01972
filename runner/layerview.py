"""A read-only merged view of stacked layer directories, for the runner's lookups without a mount.

It is the union's own `MergedView` over the layers (top first, each `ro+wh`), so import and diff
see exactly what a mount shows: `.wh.NAME` and overlayfs' 0/0 devices hide names, opaque markers
and xattrs hide the layers below, and no symlink inside a layer is ever followed.
"""

import errno
import os

from unionfs.branches import RO_WH, BranchSpec
from unionfs.inodes import Node
from unionfs.merge import MergedView
from unionfs.syscalls import is_overlay_whiteout as is_whiteout_device
from unionfs.whiteout import OPAQUE, OPAQUE_XATTRS
from unionfs.whiteout import WH_PREFIX as WH

__all__ = ["OPAQUE", "WH", "LayerView", "has_opaque_xattr", "is_whiteout_device"]

ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)


def has_opaque_xattr(path: bytes) -> bool:
    """Whether the directory at `path` carries overlayfs' opaque mark."""
    for attr in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


class LayerView:
    """The merged tree of `layer_dirs` (top first); entries are named by tuples of components."""

    def __init__(self, layer_dirs: list[str]):
        specs = [BranchSpec(os.fsdecode(d), RO_WH) for d in layer_dirs]
        self._dirs = [os.fsdecode(d) for d in layer_dirs]
        self._view = MergedView(specs, readonly=True) if specs else None
        self._found: dict[tuple[bytes, ...], tuple[Node, os.stat_result] | None] = {}

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None

    def __enter__(self) -> "LayerView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _find(self, parts: tuple[bytes, ...]) -> tuple[Node, os.stat_result] | None:
        """The node and attributes of the visible entry at `parts`, or None; walked once."""
        if parts in self._found:
            return self._found[parts]
        view = self._view
        if view is None:
            return None
        if not parts:
            root = view.table.root
            found = self._found[()] = (root, view.stat(root))
            return found
        start = len(parts)
        while start and parts[:start] not in self._found:
            start -= 1
        found = self._find(parts[:start])
        for i in range(start, len(parts)):
            if found is not None:
                node = found[0]
                try:
                    found = view.lookup(node, parts[i]) if node.is_dir else None
                except OSError as e:
                    if e.errno not in ABSENT:
                        raise
                    found = None
            self._found[parts[: i + 1]] = found
        return found

    def lookup(self, parts) -> os.stat_result | None:
        """The lstat of the visible entry at `parts` (a tuple of byte components), or None."""
        found = self._find(tuple(parts))
        return found[1] if found else None

    def is_dir(self, parts) -> bool:
        """Whether `parts` is a directory of the merged tree."""
        found = self._find(tuple(parts))
        return found is not None and found[0].is_dir

    def data_of(self, path: bytes) -> tuple[str, bytes] | None:
        """(layer directory, path in it) of the file holding the data of a metadata-only copy
        that names `path` (see unionfs.metacopy), or None if no layer holds it."""
        if self._view is None:
            return None
        b, found = self._view.find_data(-1, path)
        return None if b < 0 else (self._dirs[b], found)

    def children(self, parts) -> list[bytes]:
        """The visible names in the directory at `parts`, sorted."""
        found = self._find(tuple(parts))
        if found is None or not found[0].is_dir:
            return []
        return sorted(name for name, *_ in self._view.listdir(found[0]))
