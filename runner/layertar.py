"""Layer tars: safe extraction of untrusted layer tars, and deterministic writing of layer tars.

Extraction resolves every entry relative to the layer root's directory fd (openat2 with
RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS, falling back to a per-component O_NOFOLLOW walk), so no
entry can be written outside the layer or through a symlink. Writing sorts entries and uses a
fixed header form (PAX only when needed, numeric ids, empty user/group names, whole-second
mtimes), so the same tree always gives the same DiffID.
"""

import errno
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from runner.layerview import LayerView
from unionfs.layers import remove_tree_at
from unionfs.syscalls import O_PATH_DIR, open_beneath
from unionfs.whiteout import WH_PREFIX, fits_whiteout, whited_out

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20
SKIPPED_XATTR_PREFIXES = (b"trusted.", b"security.selinux", b"user.overlay.", b"user.pyunion.")
PRIVATE_XATTR_PREFIX = "user.pyunion."  # never taken from a layer either


class LayerError(Exception):
    """A layer tar that cannot be accepted; the message names the offending entry."""


def entry_parts(name: str, what: str = "entry") -> list[bytes]:
    """The checked path components of a tar member name (empty list: the layer root)."""
    raw = os.fsencode(name)
    if raw.startswith(b"/"):
        raise LayerError(f"{what} {name!r}: absolute path refused")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise LayerError(f"{what} {name!r}: '..' in path refused")
    if b"\0" in raw:
        raise LayerError(f"{what} {name!r}: NUL in path refused")
    return parts


def _show(parts: list[bytes]) -> str:
    return "/" + os.fsdecode(b"/".join(parts))


class Extractor:
    """Unpacks one layer tar into an empty directory, safely; collects what could not be applied."""

    def __init__(
        self, root: str, allow_devices: bool | None = None, lower: LayerView | None = None
    ):
        self.lower = lower
        self.lower_checked: set[tuple[bytes, ...]] = set()  # prefixes known not to be symlinks
        self.root_fd = os.open(root, DIR_FLAGS)
        self.as_root = os.geteuid() == 0
        self.allow_devices = self.as_root if allow_devices is None else allow_devices
        self.unapplied: list[dict] = []
        self.dirs: dict[tuple[bytes, ...], tarfile.TarInfo] = {}

    def close(self) -> None:
        os.close(self.root_fd)
        if self.lower is not None:
            self.lower.close()

    # ---- resolution ---------------------------------------------------------------------
    def _parent(self, parts: list[bytes], member: str, create: bool = True) -> int:
        """An fd of the directory that holds `parts[-1]`, creating missing directories."""
        dirparts = parts[:-1]
        if not dirparts:
            return os.dup(self.root_fd)
        try:
            return open_beneath(self.root_fd, b"/".join(dirparts), DIR_FLAGS)
        except OSError as e:
            if e.errno != errno.ENOENT or not create:
                self._refuse_path(e, parts, member)
        cur = os.dup(self.root_fd)
        try:
            for i, part in enumerate(dirparts):
                try:
                    nxt = os.open(part, DIR_FLAGS, dir_fd=cur)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=cur)
                    nxt = os.open(part, DIR_FLAGS, dir_fd=cur)
                except OSError as e:
                    self._refuse_path(e, parts[: i + 1], member)
                os.close(cur)
                cur = nxt
            return os.dup(cur)
        finally:
            os.close(cur)

    def _check_lower(self, parts: list[bytes], member: str) -> None:
        """Refuse an entry whose parent is a symlink in a lower layer (and not redeclared here)."""
        if self.lower is None:
            return
        for i in range(1, len(parts)):
            prefix = tuple(parts[:i])
            if prefix in self.dirs or prefix in self.lower_checked:
                continue
            st = self.lower.lookup(prefix)
            if st is None:
                return  # nothing below from here on
            self.lower_checked.add(prefix)
            if stat.S_ISLNK(st.st_mode):
                raise LayerError(
                    f"entry {member!r}: would be written through the symlink {_show(list(prefix))} "
                    "of a lower layer; refused"
                )

    def _refuse_path(self, e: OSError, parts: list[bytes], member: str):
        for i in range(1, len(parts) + 1):
            try:
                st = os.stat(b"/".join(parts[:i]), dir_fd=self.root_fd, follow_symlinks=False)
            except OSError:
                break
            if stat.S_ISLNK(st.st_mode):
                raise LayerError(
                    f"entry {member!r}: would be written through the symlink {_show(parts[:i])}; refused"
                )
        if e.errno in (errno.ELOOP, errno.EXDEV):
            raise LayerError(f"entry {member!r}: would be written through a symlink; refused")
        if e.errno == errno.ENOTDIR:
            raise LayerError(f"entry {member!r}: a parent of it is not a directory; refused")
        if e.errno == errno.ENOENT:
            raise LayerError(f"entry {member!r}: {_show(parts)} is not in the layer; refused")
        raise LayerError(f"entry {member!r}: {e.strerror}")

    # ---- extraction ---------------------------------------------------------------------
    def extract(self, tar: tarfile.TarFile, progress: Callable[[int], None] | None = None) -> None:
        """Unpack every member of `tar`; raises LayerError on the first refused entry."""
        for member in tar:
            self._extract_one(tar, member)
            if progress:
                progress(tar.offset)
        self._finish_dirs()

    def _extract_one(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = entry_parts(m.name)
        if not parts:
            if not m.isdir():
                raise LayerError(f"entry {m.name!r}: the layer root must be a directory")
            self.dirs[()] = m
            return
        device_whiteout = False
        if m.ischr() and m.devmajor == 0 and m.devminor == 0:
            if fits_whiteout(parts[-1]):  # overlayfs whiteout -> OCI whiteout
                parts = parts[:-1] + [WH_PREFIX + parts[-1]]
                m = tarfile.TarInfo(os.fsdecode(b"/".join(parts)))
                m.mode, m.mtime = 0o600, 0
            else:
                device_whiteout = True
        elif m.isreg() and (hidden := whited_out(parts[-1])) and not fits_whiteout(hidden):
            # an OCI whiteout too long for a file name: kept as overlayfs' form (as the union
            # makes them), a 0/0 device of the hidden name
            parts = parts[:-1] + [hidden]
            device_whiteout = True
        self._check_lower(parts, m.name)
        pfd = self._parent(parts, m.name)
        name = parts[-1]
        try:
            try:
                old = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and not (m.isdir() and stat.S_ISDIR(old.st_mode)):
                self._remove(pfd, name, old)
                key = tuple(parts)
                for k in [k for k in self.dirs if k[: len(key)] == key]:
                    del self.dirs[k]
            if device_whiteout:
                os.mknod(name, stat.S_IFCHR, 0, dir_fd=pfd)  # (no CAP_MKNOD needed, Linux 5.8+)
            elif m.isdir():
                if old is None or not stat.S_ISDIR(old.st_mode):
                    os.mkdir(name, 0o700, dir_fd=pfd)
                self.dirs[tuple(parts)] = m
            elif m.isreg():
                self._write_file(tar, m, pfd, name, parts)
            elif m.issym():
                os.symlink(m.linkname, name, dir_fd=pfd)
                self._own(m, parts, name=name, dir_fd=pfd)
                os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
            elif m.islnk():
                self._hardlink(m, pfd, name)
            elif m.ischr() or m.isblk() or m.isfifo():
                self._special(m, pfd, name, parts)
            else:
                raise LayerError(f"entry {m.name!r}: unsupported tar entry type {m.type!r}")
        except OSError as e:
            raise LayerError(f"entry {m.name!r}: {e.strerror}") from None
        finally:
            os.close(pfd)

    def _remove(self, pfd: int, name: bytes, old: os.stat_result) -> None:
        if stat.S_ISDIR(old.st_mode):
            remove_tree_at(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)

    def _write_file(self, tar, m, pfd, name, parts) -> None:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )
        try:
            src = tar.extractfile(m)
            while chunk := src.read(CHUNK):
                _write_all(fd, chunk)
            self._own(m, parts, fd=fd)
            os.fchmod(fd, m.mode & 0o7777)
            self._xattrs(m, parts, fd)
            os.utime(fd, (m.mtime, m.mtime))
        finally:
            os.close(fd)

    def _hardlink(self, m, pfd, name) -> None:
        tparts = entry_parts(m.linkname, what=f"hard link {m.name!r} ->")
        if not tparts:
            raise LayerError(f"entry {m.name!r}: hard link to the layer root refused")
        tfd = self._parent(tparts, m.name, create=False)
        try:
            try:
                st = os.stat(tparts[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise LayerError(
                    f"entry {m.name!r}: hard link target {m.linkname!r} is not in the layer"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(f"entry {m.name!r}: hard link to a directory refused")
            os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _special(self, m, pfd, name, parts) -> None:
        if m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            if not self.allow_devices:
                raise LayerError(f"entry {m.name!r}: device nodes are not permitted here; refused")
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            try:
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            except PermissionError:
                raise LayerError(
                    f"entry {m.name!r}: device node cannot be created (not permitted); refused"
                ) from None
        self._own(m, parts, name=name, dir_fd=pfd)
        os.chmod(name, m.mode & 0o7777, dir_fd=pfd)
        os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)

    def _own(self, m, parts, fd=None, name=None, dir_fd=None) -> None:
        try:
            if fd is not None:
                os.fchown(fd, m.uid, m.gid)
            else:
                os.chown(name, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)
        except (PermissionError, OSError) as e:
            if self.as_root and not isinstance(e, PermissionError) and e.errno != errno.EINVAL:
                raise
            self.unapplied.append({"path": _show(parts), "uid": m.uid, "gid": m.gid})

    def _xattrs(self, m, parts, fd) -> None:
        for key, value in sorted(m.pax_headers.items()):
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr.") :]
            if attr.startswith(PRIVATE_XATTR_PREFIX):
                continue  # (the union's own marks: a layer cannot make them)
            try:
                os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))
            except OSError:
                self.unapplied.append({"path": _show(parts), "xattr": attr})

    def _finish_dirs(self) -> None:
        """Apply directory ownership, modes and mtimes last, deepest first."""
        for key in sorted(self.dirs, key=lambda k: (-len(k), k)):
            m = self.dirs[key]
            try:
                fd = (
                    open_beneath(self.root_fd, b"/".join(key) or b".", DIR_FLAGS)
                    if key
                    else os.dup(self.root_fd)
                )
            except OSError:
                continue
            try:
                self._own(m, list(key), fd=fd)
                os.fchmod(fd, m.mode & 0o7777)
                self._xattrs(m, list(key), fd)
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def extract_layer(
    tar_path: str, root: str, progress=None, allow_devices=None, lower_dirs=()
) -> list[dict]:
    """Unpack the layer tar at `tar_path` into the empty dir `root`; returns unapplied metadata.

    `lower_dirs` (top first) are the layers below it, checked for symlinks entries would go through.
    """
    extractor = Extractor(root, allow_devices, LayerView(list(lower_dirs)) if lower_dirs else None)
    try:
        with tarfile.open(tar_path, "r:") as tar:
            extractor.extract(tar, progress)
    except tarfile.TarError as e:
        raise LayerError(f"not a valid tar: {e}") from None
    finally:
        extractor.close()
    return extractor.unapplied


# ---- deterministic writing --------------------------------------------------------------


@dataclass
class TreeEntry:
    """One entry to put into a layer tar: its path in the layer and where its data comes from."""

    path: bytes  # relative to the layer root, no leading slash
    source: str | None  # the file on disk; None for a synthesized empty whiteout file
    # a metadata-only copy's data (see unionfs.metacopy): (layer directory, path in it)
    data: tuple[str, bytes] | None = None


class HashingWriter:
    """A file wrapper that hashes (sha256) and counts everything written through it."""

    def __init__(self, f, progress: Callable[[int], None] | None = None):
        self.f, self.sha, self.count, self.progress = f, hashlib.sha256(), 0, progress

    def write(self, data) -> int:
        self.sha.update(data)
        self.f.write(data)
        self.count += len(data)
        if self.progress:
            self.progress(self.count)
        return len(data)

    def tell(self) -> int:
        return self.count

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def _tarinfo(entry: TreeEntry, st: os.stat_result | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(os.fsdecode(entry.path))
    info.uname = info.gname = ""
    if st is None:
        info.type, info.mode, info.mtime, info.uid, info.gid, info.size = (
            tarfile.REGTYPE,
            0o644,
            0,
            0,
            0,
            0,
        )
        return info
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid, info.mtime = st.st_uid, st.st_gid, int(st.st_mtime)
    info.size = 0
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG:
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif fmt == stat.S_IFDIR:
        info.type = tarfile.DIRTYPE
    elif fmt == stat.S_IFLNK:
        info.type, info.linkname = tarfile.SYMTYPE, os.fsdecode(os.readlink(entry.source))
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        info.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif fmt == stat.S_IFIFO:
        info.type = tarfile.FIFOTYPE
    else:
        raise LayerError(f"{entry.source}: sockets cannot go into a layer")
    if fmt != stat.S_IFLNK:
        info.pax_headers = _xattr_headers(entry.source)
    return info


def _xattr_headers(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    headers = {}
    for n in sorted(names):
        if n.encode().startswith(SKIPPED_XATTR_PREFIXES):
            continue
        try:
            value = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
        headers["SCHILY.xattr." + n] = value.decode("utf-8", "surrogateescape")
    return headers


def _open_data(entry: TreeEntry, size: int):
    """The data of a metadata-only copy, SIZE bytes, as a binary file: its lower file's, never
    opened through a symlink, followed by what the copy holds past its end (its tail)."""
    layer, path = entry.data
    root = os.open(layer, O_PATH_DIR)
    try:
        fd = open_beneath(root, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    finally:
        os.close(root)
    held = os.fstat(fd).st_size
    if held > size:
        os.close(fd)
        raise LayerError(f"{entry.source}: its data in layer {layer} changed size")
    data = os.fdopen(fd, "rb")
    if held == size:
        return data
    try:
        own = os.fdopen(os.open(entry.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")
    except BaseException:
        data.close()
        raise
    own.seek(held)
    return io.BufferedReader(_Joined(data, own, held))  # (reads whole blocks, as tar wants)


class _Joined(io.RawIOBase):
    """Reads FIRST up to offset AT, then SECOND from there (a copy's lower data and tail)."""

    def __init__(self, first, second, at: int):
        self.first, self.second, self.left = first, second, at

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.left > 0:
            n = self.first.readinto(memoryview(buf)[:min(len(buf), self.left)])
            self.left -= n
            if n:
                return n
        return self.second.readinto(buf)

    def close(self) -> None:
        self.first.close()
        self.second.close()
        super().close()


def write_layer_tar(
    entries: Iterable[TreeEntry], out, progress=None, owner_map=None
) -> tuple[str, int]:
    """Write a deterministic layer tar of `entries` to the binary file `out`; (DiffID, size).

    `owner_map(uid, gid) -> (uid, gid)` translates on-disk owners into the layer's (rootless).
    """
    writer = HashingWriter(out, progress)
    seen_inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for entry in sorted(entries, key=lambda e: e.path):
            st = os.lstat(entry.source) if entry.source else None
            info = _tarinfo(entry, st)
            if owner_map is not None and st is not None:
                info.uid, info.gid = owner_map(info.uid, info.gid)
            if st is not None and info.isreg() and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen_inodes:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, seen_inodes[key], 0
                else:
                    seen_inodes[key] = info.name
            if info.isreg() and info.size:
                if entry.data is None:
                    fd = os.open(entry.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    data = os.fdopen(fd, "rb")
                else:
                    data = _open_data(entry, info.size)
                with data as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return writer.digest, writer.count
