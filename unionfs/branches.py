"""Branch specifications: parsing `PATH[=MODE]:…` strings and checking them before a mount."""

import os
import stat
from dataclasses import dataclass

from unionfs.errors import UsageError

RW = "rw"
RO_WH = "ro+wh"
RO = "ro"
MODES = (RW, RO_WH, RO)


@dataclass(frozen=True)
class BranchSpec:
    """One branch as the user named it: a directory and its mode."""

    path: str
    mode: str

    @property
    def writable(self) -> bool:
        return self.mode == RW

    @property
    def honours_whiteouts(self) -> bool:
        return self.mode != RO


def split_spec(spec: str) -> list[str]:
    """Split a `:`-separated branch list; `\\:` is a literal colon and `\\\\` a backslash."""
    parts, cur, i = [], [], 0
    while i < len(spec):
        c = spec[i]
        if c == "\\" and i + 1 < len(spec) and spec[i + 1] in ":\\":
            cur.append(spec[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_branches(spec: str) -> list[BranchSpec]:
    """Parse `A[=MODE]:B[=MODE]…` (top first). Default modes: first `rw`, the rest `ro+wh`."""
    if not spec:
        raise UsageError("no branches given")
    result = []
    for index, item in enumerate(split_spec(spec)):
        if not item:
            raise UsageError(f"empty branch in {spec!r}")
        path, sep, mode = item.rpartition("=")
        if not sep or mode not in MODES and "/" in mode:
            path, mode = item, ""
        if mode and mode not in MODES:
            raise UsageError(f"unknown branch mode {mode!r} for {path!r} (use rw, ro+wh or ro)")
        if not path:
            raise UsageError(f"empty branch path in {item!r}")
        result.append(BranchSpec(path, mode or (RW if index == 0 else RO_WH)))
    return result


def format_branches(branches: list[BranchSpec]) -> str:
    """The inverse of parse_branches, with explicit modes."""
    return ":".join(
        b.path.replace("\\", "\\\\").replace(":", "\\:") + "=" + b.mode for b in branches
    )


def _is_within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_branches(branches: list[BranchSpec], mountpoint: str | None = None) -> list[BranchSpec]:
    """Check that every branch is a distinct directory and none overlaps the mountpoint.

    Returns the branches with absolute, symlink-free paths. Raises UsageError naming the problem.
    """
    checked, seen = [], {}
    real_mnt = None
    if mountpoint is not None:
        try:
            st = os.stat(mountpoint)
        except OSError as e:
            raise UsageError(f"mountpoint {mountpoint}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"mountpoint {mountpoint}: not a directory")
        real_mnt = os.path.realpath(mountpoint)
    for b in branches:
        try:
            st = os.stat(b.path)
        except OSError as e:
            raise UsageError(f"branch {b.path}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"branch {b.path}: not a directory")
        real = os.path.realpath(b.path)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise UsageError(f"branch {b.path}: given twice (same directory as {seen[key]})")
        seen[key] = b.path
        if real_mnt is not None:
            if _is_within(real, real_mnt):
                raise UsageError(f"branch {b.path} is inside the mountpoint {mountpoint}")
            if _is_within(real_mnt, real):
                raise UsageError(f"mountpoint {mountpoint} is inside the branch {b.path}")
        checked.append(BranchSpec(real, b.mode))
    return checked
