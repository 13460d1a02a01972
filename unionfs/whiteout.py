"""The branch format's naming rules: `.wh.NAME` whiteouts, the opaque marker, internal names."""

WH_PREFIX = b".wh."
META_PREFIX = b".wh..wh."  # aufs-style metadata: never a whiteout of a user name
OPAQUE = b".wh..wh..opq"
WORKDIR = b".wh..wh.pyunion"  # the union's work area at the root of a writable branch

# xattrs that mark opaque directories in kernel overlayfs layers
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
INTERNAL_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"trusted.pyunion.", b"user.pyunion.")
CONTROL_XATTR = b"pyunion.refresh"


NAME_MAX = 255  # the longest file name of Linux filesystems


def whiteout_name(name: bytes) -> bytes:
    """The whiteout that hides NAME in the branches below."""
    return WH_PREFIX + name


def fits_whiteout(name: bytes) -> bool:
    """Whether NAME's `.wh.` whiteout is a legal file name (else overlayfs' form is used)."""
    return len(name) + len(WH_PREFIX) <= NAME_MAX


def is_reserved(name: bytes) -> bool:
    """Names the union keeps for itself: they never show and cannot be created."""
    return name.startswith(WH_PREFIX)


def whited_out(name: bytes) -> bytes | None:
    """If NAME is a whiteout, the name it hides; else None (markers and plain names)."""
    if name.startswith(WH_PREFIX) and not name.startswith(META_PREFIX):
        hidden = name[len(WH_PREFIX):]
        return hidden or None
    return None


def is_internal_xattr(name: bytes) -> bool:
    return name.startswith(INTERNAL_XATTR_PREFIXES)
