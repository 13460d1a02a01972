"""A read-only merged view of stacked layer directories, for lookups without a FUSE mount.

Layers are given top first and follow the union's `ro+wh` rules: `.wh.NAME` hides NAME below,
`DIR/.wh..wh..opq` (or an overlay opaque xattr) hides everything below DIR, an overlayfs
char-device 0/0 hides the name, and a non-directory hides everything below it.
"""

import os
import stat

from unionfs.syscalls import is_overlay_whiteout as is_whiteout_device
from unionfs.whiteout import OPAQUE, OPAQUE_XATTRS, fits_whiteout
from unionfs.whiteout import WH_PREFIX as WH

__all__ = ["OPAQUE", "WH", "LayerView", "has_opaque_xattr", "is_opaque", "is_whiteout_device"]


def has_opaque_xattr(path: bytes) -> bool:
    """Whether the directory at `path` carries overlayfs' opaque mark."""
    for attr in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def is_opaque(path: bytes) -> bool:
    """Whether the directory at `path` hides the directories below it."""
    return os.path.lexists(os.path.join(path, OPAQUE)) or has_opaque_xattr(path)


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


class LayerView:
    """The merged tree of `layer_dirs` (top first), answered by lstat and listdir on the layers."""

    def __init__(self, layer_dirs: list[str]):
        self.layers = [os.fsencode(d) for d in layer_dirs]
        self._dirs: dict[tuple[bytes, ...], list[bytes] | None] = {(): self.layers}

    def _stack(self, parts: tuple[bytes, ...]) -> list[tuple[bytes, os.stat_result]]:
        """The layer entries that make up `parts` (top first), stopping at whatever hides the rest."""
        parents = self.dirs(parts[:-1])
        found = []
        name = parts[-1]
        for d in parents or []:
            if fits_whiteout(name) and _lstat(os.path.join(d, WH + name)) is not None:
                break
            path = os.path.join(d, name)
            st = _lstat(path)
            if st is None:
                continue
            if is_whiteout_device(st):
                break
            found.append((path, st))
            if not stat.S_ISDIR(st.st_mode) or is_opaque(path):
                break
        return found

    def dirs(self, parts: tuple[bytes, ...]) -> list[bytes] | None:
        """The layer directories merged at `parts` (top first), or None if it is not a directory."""
        parts = tuple(parts)
        if parts not in self._dirs:
            stack = self._stack(parts)
            if stack and stat.S_ISDIR(stack[0][1].st_mode):
                self._dirs[parts] = [p for p, st in stack if stat.S_ISDIR(st.st_mode)]
            else:
                self._dirs[parts] = None
        return self._dirs[parts]

    def lookup(self, parts) -> os.stat_result | None:
        """The lstat of the visible entry at `parts` (a tuple of byte components), or None."""
        parts = tuple(parts)
        if not parts:
            return os.lstat(self.layers[0]) if self.layers else None
        stack = self._stack(parts)
        return stack[0][1] if stack else None

    def children(self, parts) -> list[bytes]:
        """The visible names in the directory at `parts`, sorted."""
        hidden: set[bytes] = set()
        names: set[bytes] = set()
        for d in self.dirs(tuple(parts)) or []:
            own_hidden = set()
            for e in os.listdir(d):
                if e.startswith(WH):
                    if not e.startswith(WH + WH):
                        own_hidden.add(e[len(WH) :])
                    continue
                st = _lstat(os.path.join(d, e))
                if st is None:
                    continue
                if is_whiteout_device(st):
                    own_hidden.add(e)
                elif e not in hidden:
                    names.add(e)
            hidden |= own_hidden
        return sorted(names)
