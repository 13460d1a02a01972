"""The content-addressed image store: layers by DiffID, images by config digest, names, containers.

On disk under `$PYUNION_HOME` (default `~/.local/share/pyunion`, `/var/lib/pyunion` for root):

    lock                       fcntl.flock'ed by every command that changes the store
    tmp/                       staging area; anything here without the lock held is stale
    layers/<hex>/tree/         the unpacked layer, usable as a `ro+wh` union branch
    layers/<hex>/layer.tar     the exact uncompressed tar whose sha256 is the DiffID
    layers/<hex>/layer.json    {"diff_id", "size", "unapplied": [...]} (ownership not applied)
    images/<hex>.json          the image config, byte for byte; the image ID is its sha256
    names.json                 {"repo:tag": "sha256:<image id>"}
    containers/<name>/         container.json {"name", "image", "created"} and upper/

Every object appears by a rename from tmp/, so an interrupted command leaves nothing half made.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field

from unionfs.errors import UsageError
from unionfs.layers import remove_tree_at

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
REPO_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]+)?$")
CONTAINER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def default_home() -> str:
    """The store directory: `$PYUNION_HOME`, else the per-user or (for root) system default."""
    home = os.environ.get("PYUNION_HOME")
    if home:
        return os.path.abspath(home)
    if os.geteuid() == 0:
        return "/var/lib/pyunion"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "pyunion")


def split_name(name: str) -> tuple[str, str]:
    """Split `REPO[:TAG]` into (repo, tag); the tag defaults to `latest`. Raises UsageError."""
    repo, tag = name, "latest"
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        repo, tag = name[:colon], name[colon + 1 :]
    if "@" in repo:
        raise UsageError(f"image name {name!r}: digests (@sha256:...) are not supported as names")
    if not TAG_RE.match(tag):
        raise UsageError(f"image name {name!r}: invalid tag {tag!r}")
    parts = repo.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        if not HOST_RE.match(parts[0]):
            raise UsageError(f"image name {name!r}: invalid registry host {parts[0]!r}")
        parts = parts[1:]
    if not repo or not all(REPO_COMPONENT_RE.match(p) for p in parts):
        raise UsageError(
            f"image name {name!r}: invalid repository name (lowercase letters, digits, . _ - and /)"
        )
    return repo, tag


def normalize_name(name: str) -> str:
    """The canonical `repo:tag` form of a name (Docker Hub prefixes dropped, `:latest` added)."""
    repo, tag = split_name(name)
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/"):
        if repo.startswith(prefix):
            repo = repo[len(prefix) :]
            break
    return f"{repo}:{tag}"


def remove_tree(path: str) -> None:
    """Delete a file or directory tree (any depth, also with read-only directories)."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return
    parent = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree_at(parent, os.fsencode(os.path.basename(os.path.abspath(path))))
    finally:
        os.close(parent)


def write_atomic(path: str, data: bytes, tmp_dir: str) -> None:
    """Write `data` to `path` via a temporary file in `tmp_dir` and a rename."""
    fd, tmp = _mkstemp(tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mkstemp(tmp_dir: str) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(dir=tmp_dir, prefix="w-")


def hex_of(digest: str) -> str:
    """The hex part of a `sha256:` digest, after checking its form."""
    if not DIGEST_RE.match(digest):
        raise UsageError(f"invalid digest {digest!r}")
    return digest[len("sha256:") :]


def canonical_json(obj) -> bytes:
    """The byte form pyunion writes JSON documents in (stable, so digests are stable)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Image:
    """One stored image: its ID, full config document, names and layers."""

    id: str
    document: dict
    names: list[str]
    layer_dirs: list[str]  # top first, usable as ro+wh union branches
    diff_ids: list[str] = field(default_factory=list)  # bottom first, as in the config

    @property
    def config(self) -> dict:
        """The OCI config's "config" object (Cmd, Entrypoint, Env, WorkingDir, User)."""
        return self.document.get("config") or {}

    @property
    def short_id(self) -> str:
        return self.id[len("sha256:") :][:12]


@dataclass
class Container:
    """A named container kept by `run --name`: its image and writable layer."""

    name: str
    image: str
    created: float
    upper: str


class Store:
    """The on-disk store; cheap to construct, every method reads the disk afresh."""

    def __init__(self, home: str | None = None):
        self.home = home or default_home()
        self.layers_dir = os.path.join(self.home, "layers")
        self.images_dir = os.path.join(self.home, "images")
        self.containers_dir = os.path.join(self.home, "containers")
        self.tmp_dir = os.path.join(self.home, "tmp")
        self.names_path = os.path.join(self.home, "names.json")
        self._lock_fd: int | None = None
        self._lock_depth = 0

    # ---- locking and staging -------------------------------------------------------------
    def ensure(self) -> None:
        """Create the store's directories if missing."""
        for d in (self.home, self.layers_dir, self.images_dir, self.containers_dir, self.tmp_dir):
            try:
                os.makedirs(d, mode=0o700 if d == self.home else 0o755, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create store directory {d}: {e.strerror}") from None

    @contextlib.contextmanager
    def locked(self):
        """Hold the store's exclusive lock; staging leftovers are swept when taking and leaving it."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        self.ensure()
        fd = os.open(os.path.join(self.home, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd, self._lock_depth = fd, 1
            self._sweep()
            yield self
        finally:
            if self._lock_depth:
                with contextlib.suppress(OSError):
                    self._sweep()
            self._lock_fd, self._lock_depth = None, 0
            os.close(fd)

    def _sweep(self) -> None:
        """Delete everything in tmp/ (only while holding the lock: then it is all stale)."""
        for entry in os.listdir(self.tmp_dir):
            remove_tree(os.path.join(self.tmp_dir, entry))

    def staging_dir(self, prefix: str) -> str:
        """A fresh directory under tmp/ (only valid while the lock is held)."""
        import tempfile

        self.ensure()
        return tempfile.mkdtemp(dir=self.tmp_dir, prefix=prefix)

    # ---- names ----------------------------------------------------------------------------
    def names(self) -> dict[str, str]:
        """The name -> image ID table."""
        try:
            with open(self.names_path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def _write_names(self, names: dict[str, str]) -> None:
        self.ensure()
        write_atomic(self.names_path, canonical_json(dict(sorted(names.items()))), self.tmp_dir)

    def tag(self, image_id: str, name: str) -> str:
        """Point `name` at an image (moving it from any other image); returns the canonical name."""
        name = normalize_name(name)
        with self.locked():
            names = self.names()
            names[name] = image_id
            self._write_names(names)
        return name

    # ---- layers ---------------------------------------------------------------------------
    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.layers_dir, hex_of(diff_id))

    def layer_tree(self, diff_id: str) -> str:
        return os.path.join(self.layer_path(diff_id), "tree")

    def layer_tar(self, diff_id: str) -> str:
        return os.path.join(self.layer_path(diff_id), "layer.tar")

    def has_layer(self, diff_id: str) -> bool:
        return os.path.isfile(os.path.join(self.layer_path(diff_id), "layer.json"))

    def layer_info(self, diff_id: str) -> dict:
        with open(os.path.join(self.layer_path(diff_id), "layer.json"), "rb") as f:
            return json.load(f)

    def add_layer(self, staged: str, diff_id: str) -> None:
        """Move a staged layer directory (tree/, layer.tar, layer.json) into place by rename."""
        target = self.layer_path(diff_id)
        try:
            os.rename(staged, target)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_tree(staged)  # already present: layers are immutable, keep the old one

    # ---- images ---------------------------------------------------------------------------
    def image_ids(self) -> list[str]:
        try:
            entries = os.listdir(self.images_dir)
        except FileNotFoundError:
            return []
        return sorted(
            "sha256:" + e[:-5]
            for e in entries
            if e.endswith(".json") and DIGEST_RE.match("sha256:" + e[:-5])
        )

    def add_image(self, config_bytes: bytes, names: list[str]) -> str:
        """Store an image config (its layers must already be stored) and name it; returns its ID."""
        image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        document = json.loads(config_bytes)
        with self.locked():
            for diff_id in document.get("rootfs", {}).get("diff_ids", []):
                if not self.has_layer(diff_id):
                    raise RuntimeError(f"layer {diff_id} is missing from the store")
            path = os.path.join(self.images_dir, hex_of(image_id) + ".json")
            if not os.path.exists(path):
                write_atomic(path, config_bytes, self.tmp_dir)
            if names:
                table = self.names()
                for n in names:
                    table[normalize_name(n)] = image_id
                self._write_names(table)
        return image_id

    def load_image(self, image_id: str, names: dict[str, str] | None = None) -> Image | None:
        path = os.path.join(self.images_dir, hex_of(image_id) + ".json")
        try:
            with open(path, "rb") as f:
                document = json.load(f)
        except FileNotFoundError:
            return None
        diff_ids = list(document.get("rootfs", {}).get("diff_ids", []))
        table = self.names() if names is None else names
        return Image(
            id=image_id,
            document=document,
            names=sorted(n for n, i in table.items() if i == image_id),
            layer_dirs=[self.layer_tree(d) for d in reversed(diff_ids)],
            diff_ids=diff_ids,
        )

    def config_bytes(self, image_id: str) -> bytes:
        with open(os.path.join(self.images_dir, hex_of(image_id) + ".json"), "rb") as f:
            return f.read()

    def images(self) -> list[Image]:
        names = self.names()
        return [img for i in self.image_ids() if (img := self.load_image(i, names))]

    def resolve_image(self, ref: str) -> Image | None:
        """The image a user reference names: NAME[:TAG], a full `sha256:` ID or an ID prefix."""
        names = self.names()
        with contextlib.suppress(UsageError):
            wanted = normalize_name(ref)
            if wanted in names:
                return self.load_image(names[wanted], names)
        hexpart = ref[len("sha256:") :] if ref.startswith("sha256:") else ref
        if re.fullmatch(r"[0-9a-f]{4,64}", hexpart):
            found = [i for i in self.image_ids() if i[len("sha256:") :].startswith(hexpart)]
            if len(found) == 1:
                return self.load_image(found[0], names)
            if len(found) > 1:
                raise UsageError(f"image ID prefix {ref!r} is ambiguous")
        return None

    def require_image(self, ref: str) -> Image:
        image = self.resolve_image(ref)
        if image is None:
            raise UsageError(f"no such image: {ref}")
        return image

    def remove_image(self, ref: str) -> list[str]:
        """`image rm`: untag a name, or delete an image by ID; returns what was done, as lines."""
        done = []
        with self.locked():
            image = self.require_image(ref)
            names = self.names()
            by_name = False
            with contextlib.suppress(UsageError):
                by_name = names.get(normalize_name(ref)) == image.id
            if by_name:
                del names[normalize_name(ref)]
                done.append(f"Untagged: {normalize_name(ref)}")
            else:
                for n in image.names:
                    del names[n]
                    done.append(f"Untagged: {n}")
            users = [c.name for c in self.containers() if c.image == image.id]
            if any(i == image.id for i in names.values()):
                self._write_names(names)
                return done
            if users:
                raise UsageError(
                    f"image {ref} is used by container {users[0]} (pyunion rm {users[0]} first)"
                )
            self._write_names(names)
            os.unlink(os.path.join(self.images_dir, hex_of(image.id) + ".json"))
            done.append(f"Deleted: {image.id}")
            done.extend(f"Deleted: {d}" for d in self.collect_layers())
        return done

    def collect_layers(self) -> list[str]:
        """Delete layers no image uses (call with the lock held); returns their DiffIDs."""
        used = set()
        for i in self.image_ids():
            img = self.load_image(i, {})
            if img:
                used.update(img.diff_ids)
        removed = []
        for entry in sorted(os.listdir(self.layers_dir)):
            diff_id = "sha256:" + entry
            if DIGEST_RE.match(diff_id) and diff_id not in used:
                staged = os.path.join(self.tmp_dir, "gc-" + entry)
                os.rename(os.path.join(self.layers_dir, entry), staged)
                remove_tree(staged)
                removed.append(diff_id)
        return removed

    # ---- containers -----------------------------------------------------------------------
    def container_path(self, name: str) -> str:
        if not CONTAINER_RE.match(name):
            raise UsageError(f"invalid container name {name!r} (letters, digits, _ . -)")
        return os.path.join(self.containers_dir, name)

    def load_container(self, name: str) -> Container | None:
        path = self.container_path(name)
        try:
            with open(os.path.join(path, "container.json"), "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        return Container(
            name=name,
            image=data["image"],
            created=float(data.get("created", 0)),
            upper=os.path.join(path, "upper"),
        )

    def containers(self) -> list[Container]:
        try:
            entries = sorted(os.listdir(self.containers_dir))
        except FileNotFoundError:
            return []
        return [c for e in entries if CONTAINER_RE.match(e) and (c := self.load_container(e))]

    def prepare_container(self, name: str, ref: str) -> str:
        """The writable layer dir of container `name` running image `ref` (created on first use)."""
        path = self.container_path(name)
        with self.locked():
            image = self.require_image(ref)
            existing = self.load_container(name)
            if existing:
                if existing.image != image.id:
                    raise UsageError(
                        f"container {name} already exists with image {existing.image[7:19]}, "
                        f"not {ref} (pyunion rm {name} first)"
                    )
                return existing.upper
            staged = self.staging_dir("c-")
            os.mkdir(os.path.join(staged, "upper"), 0o755)
            record = {"name": name, "image": image.id, "created": time.time()}
            with open(os.path.join(staged, "container.json"), "wb") as f:
                f.write(canonical_json(record))
            os.chmod(staged, 0o755)
            os.rename(staged, path)
        return os.path.join(path, "upper")

    def remove_container(self, name: str) -> None:
        """Delete a named container and its writable layer."""
        with self.locked():
            if self.load_container(name) is None:
                raise UsageError(f"no such container: {name}")
            staged = os.path.join(self.tmp_dir, "rm-" + name)
            os.rename(self.container_path(name), staged)
            remove_tree(staged)
