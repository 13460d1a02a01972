"""Image archives: importing `docker save` tarballs and OCI layouts, exporting either format.

Import verifies every digest and size it is given, unpacks each new layer once (safely, see
layertar) into the store's staging area, and moves layers and image into the store only when
the whole archive checked out, so a failed import leaves nothing behind.
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile

from runner import layertar
from runner.imageprogress import Progress
from runner.store import DIGEST_RE, Store, canonical_json, normalize_name
from unionfs.errors import UsageError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20
MAX_JSON = 64 << 20


class ArchiveError(Exception):
    """An archive that cannot be imported; one line naming what is wrong."""


# ---- archive sources ----------------------------------------------------------------------


class DirSource:
    """Files of an unpacked archive directory; paths may not leave it."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ArchiveError(f"archive path {name!r} leaves the archive")
        path = os.path.realpath(os.path.join(self.root, name))
        if not path.startswith(self.root + os.sep):
            raise ArchiveError(f"archive path {name!r} leaves the archive")
        return path

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def open(self, name: str):
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise ArchiveError(f"archive has no {name}") from None

    def size(self, name: str) -> int:
        return os.path.getsize(self._path(name))


class TarSource:
    """Files of an archive tarball (plain or compressed), read in place."""

    def __init__(self, path: str):
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {}
            for m in self.tar.getmembers():
                self.members[os.path.normpath(m.name).lstrip("/")] = m
        except (tarfile.TarError, EOFError, OSError) as e:
            why = str(e).splitlines()[0].rstrip(":") if str(e) else type(e).__name__
            raise UsageError(
                f"{path}: not an image archive (docker save tar or OCI layout): {why}"
            ) from None

    def exists(self, name: str) -> bool:
        return os.path.normpath(name) in self.members

    def open(self, name: str):
        member = self.members.get(os.path.normpath(name))
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise ArchiveError(f"archive has no file {name}")
        return f

    def size(self, name: str) -> int:
        return self.members[os.path.normpath(name)].size


def open_source(path: str):
    if os.path.isdir(path):
        return DirSource(path)
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    return TarSource(path)


def read_json(source, name: str, digest: str | None = None, size: int | None = None):
    with source.open(name) as f:
        data = f.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise ArchiveError(f"{name}: too large for a JSON document")
    check_blob(name, data, digest, size)
    try:
        return data, json.loads(data)
    except ValueError:
        raise ArchiveError(f"{name}: not valid JSON") from None


def check_blob(name: str, data: bytes, digest: str | None, size: int | None) -> None:
    if size is not None and len(data) != size:
        raise ArchiveError(f"{name}: size {len(data)} does not match the expected {size}")
    if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ArchiveError(f"{name}: digest does not match {digest}")


def blob_name(digest) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ArchiveError(f"unsupported or malformed digest {digest!r}")
    return "blobs/sha256/" + digest[len("sha256:") :]


# ---- reading the archive formats ------------------------------------------------------------


class LayerRef:
    """Where one layer of an image comes from in the archive and what it must hash to."""

    def __init__(self, name, diff_id, digest=None, size=None):
        self.name, self.diff_id, self.digest, self.size = name, diff_id, digest, size


class ImageRef:
    """One image found in an archive: its config bytes, layers (bottom first) and names."""

    def __init__(self, config: bytes, layers: list[LayerRef], names: list[str]):
        self.config, self.layers, self.names = config, layers, names


def _diff_ids(config_doc, where: str, count: int) -> list[str]:
    rootfs = config_doc.get("rootfs") if isinstance(config_doc, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and DIGEST_RE.match(d) for d in diff_ids
    ):
        raise ArchiveError(f"{where}: config has no valid rootfs.diff_ids")
    if len(diff_ids) != count:
        raise ArchiveError(f"{where}: config lists {len(diff_ids)} layers but the manifest {count}")
    return diff_ids


def read_docker_save(source) -> list[ImageRef]:
    _, manifest = read_json(source, "manifest.json")
    if not isinstance(manifest, list):
        raise ArchiveError("manifest.json: expected a list of images")
    images = []
    for entry in manifest:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise ArchiveError("manifest.json: an entry has no Config")
        config_name = entry["Config"]
        stem = os.path.basename(config_name).removesuffix(".json")
        expect = "sha256:" + stem if DIGEST_RE.match("sha256:" + stem) else None
        config, doc = read_json(source, config_name, expect)
        layer_names = entry.get("Layers") or []
        if not isinstance(layer_names, list) or not all(isinstance(x, str) for x in layer_names):
            raise ArchiveError("manifest.json: Layers must be a list of paths")
        diff_ids = _diff_ids(doc, config_name, len(layer_names))
        layers = [LayerRef(n, d) for n, d in zip(layer_names, diff_ids, strict=True)]
        tags = entry.get("RepoTags") or []
        images.append(ImageRef(config, layers, [t for t in tags if isinstance(t, str)]))
    return images


def host_platform() -> tuple[str, str]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )
    return "linux", arch


def _pick_manifest(source, descriptor: dict, where: str) -> dict:
    """Follow nested indexes down to one image manifest descriptor (the host's platform)."""
    for _ in range(8):
        if descriptor.get("mediaType") not in INDEX_TYPES:
            return descriptor
        _, index = read_json(
            source,
            blob_name(descriptor.get("digest")),
            descriptor.get("digest"),
            descriptor.get("size"),
        )
        descriptor = _choose(index.get("manifests") or [], where)
    raise ArchiveError(f"{where}: indexes nested too deeply")


def _choose(manifests: list, where: str) -> dict:
    if len(manifests) == 1:
        return manifests[0]
    want = host_platform()
    for m in manifests:
        p = m.get("platform") or {}
        if (p.get("os"), p.get("architecture")) == want:
            return m
    raise ArchiveError(f"{where}: no manifest for platform {want[0]}/{want[1]}")


def _names_from(annotations: dict, archive_path: str) -> list[str]:
    full = annotations.get(CONTAINERD_NAME)
    ref = annotations.get(REF_NAME)
    if full:
        return [full]
    if ref:
        if ":" in ref or "/" in ref:
            return [ref]
        base = os.path.basename(os.path.normpath(archive_path)).split(".")[0].lower() or "image"
        return [f"{base}:{ref}"]
    return []


def read_oci_layout(source, archive_path: str) -> list[ImageRef]:
    _, index = read_json(source, "index.json")
    descriptors = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(descriptors, list) or not descriptors:
        raise ArchiveError("index.json: no manifests")
    named = [
        d
        for d in descriptors
        if (d.get("annotations") or {}).get(REF_NAME)
        or (d.get("annotations") or {}).get(CONTAINERD_NAME)
    ]
    if not named:
        descriptors = [_choose(descriptors, "index.json")]
    by_manifest: dict[str, ImageRef] = {}
    for d in named or descriptors:
        target = _pick_manifest(source, d, "index.json")
        digest = target.get("digest")
        names = _names_from(d.get("annotations") or {}, archive_path)
        if digest in by_manifest:
            by_manifest[digest].names.extend(names)
            continue
        _, manifest = read_json(source, blob_name(digest), digest, target.get("size"))
        cdesc = manifest.get("config") or {}
        config, doc = read_json(
            source, blob_name(cdesc.get("digest")), cdesc.get("digest"), cdesc.get("size")
        )
        ldescs = manifest.get("layers") or []
        diff_ids = _diff_ids(doc, blob_name(digest), len(ldescs))
        layers = [
            LayerRef(blob_name(ld.get("digest")), did, ld.get("digest"), ld.get("size"))
            for ld, did in zip(ldescs, diff_ids, strict=True)
        ]
        by_manifest[digest] = ImageRef(config, layers, names)
    return list(by_manifest.values())


# ---- unpacking layers -----------------------------------------------------------------------


class _Hashing:
    """A readable stream wrapper that hashes and counts what passes through."""

    def __init__(self, f, progress=None):
        self.f, self.sha, self.count, self.progress = f, hashlib.sha256(), 0, progress

    def read(self, n=-1):
        data = self.f.read(n)
        self.sha.update(data)
        self.count += len(data)
        if self.progress:
            self.progress(self.count)
        return data

    @property
    def digest(self):
        return "sha256:" + self.sha.hexdigest()


def _copy(src, dst) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)


def fetch_layer_tar(source, ref: LayerRef, out_path: str, staging: str, label: str) -> None:
    """Write the uncompressed layer tar to `out_path`, verifying blob digest/size and DiffID."""
    total = ref.size if isinstance(ref.size, int) else source.size(ref.name)
    with Progress(label, total) as bar, source.open(ref.name) as f:
        raw = _Hashing(f, bar.update)
        head = raw.read(4)
        rest = _Prefixed(head, raw)
        with open(out_path, "wb") as out:
            plain = layertar.HashingWriter(out)
            if head[:2] == GZIP_MAGIC:
                try:
                    _copy(gzip.GzipFile(fileobj=rest, mode="rb"), plain)
                except (OSError, EOFError, gzip.BadGzipFile) as e:
                    raise ArchiveError(f"layer {ref.name}: broken gzip data ({e})") from None
            elif head == ZSTD_MAGIC:
                blob = os.path.join(staging, "blob.zst")
                with open(blob, "wb") as b:
                    _copy(rest, b)
                _unzstd(blob, plain, ref.name)
                os.unlink(blob)
            else:
                _copy(rest, plain)
        _copy(raw, io.BytesIO())  # drain, so the blob digest covers any trailing bytes
    if ref.size is not None and raw.count != ref.size:
        raise ArchiveError(
            f"layer {ref.name}: size {raw.count} does not match the expected {ref.size}"
        )
    if ref.digest is not None and raw.digest != ref.digest:
        raise ArchiveError(f"layer {ref.name}: digest does not match {ref.digest}")
    if plain.digest != ref.diff_id:
        raise ArchiveError(
            f"layer {ref.name}: uncompressed digest {plain.digest} does not match DiffID {ref.diff_id}"
        )


class _Prefixed:
    """A stream that first returns some already-read bytes."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, n=-1):
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.f.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data if len(data) == n else data + self.f.read(n - len(data))
        return self.f.read(n)


def _unzstd(blob: str, out, name: str) -> None:
    if not shutil.which("zstd"):
        raise ArchiveError(
            f"layer {name} is zstd-compressed but the `zstd` command is not installed (apt install zstd)"
        )
    with subprocess.Popen(
        ["zstd", "-dcq", blob], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        _copy(proc.stdout, out)
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    if proc.returncode:
        raise ArchiveError(f"layer {name}: zstd failed: {err[-1] if err else proc.returncode}")


def stage_layer(store: Store, source, ref: LayerRef, lower_dirs: list[str], label: str) -> str:
    """Build a complete layer directory (tree/, layer.tar, layer.json) in the staging area."""
    staged = store.staging_dir("l-")
    tar_path = os.path.join(staged, "layer.tar")
    fetch_layer_tar(source, ref, tar_path, staged, label)
    os.mkdir(os.path.join(staged, "tree"), 0o755)
    size = os.path.getsize(tar_path)
    with Progress(label.replace("importing", "unpacking"), size) as bar:
        try:
            unapplied = layertar.extract_layer(
                tar_path, os.path.join(staged, "tree"), bar.update, lower_dirs=lower_dirs
            )
        except layertar.LayerError as e:
            raise ArchiveError(f"layer {ref.diff_id[7:19]}: {e}") from None
    info = {"diff_id": ref.diff_id, "size": size, "unapplied": unapplied}
    with open(os.path.join(staged, "layer.json"), "wb") as f:
        f.write(canonical_json(info))
    os.chmod(staged, 0o755)
    return staged


def import_archive(store: Store, path: str, name: str | None = None) -> list[tuple[str, list[str]]]:
    """`image import`: returns (image ID, names) for each image the archive held."""
    source = open_source(path)
    try:
        if source.exists("index.json") and source.exists("oci-layout"):
            images = read_oci_layout(source, path)
        elif source.exists("manifest.json"):
            images = read_docker_save(source)
        else:
            raise UsageError(
                f"{path}: neither a docker save archive (manifest.json) nor an OCI layout (oci-layout, index.json)"
            )
        if name is not None:
            if len(images) != 1:
                raise UsageError(f"{path} holds {len(images)} images; --name needs exactly one")
            images[0].names = [name]
        for image in images:
            image.names = [normalize_name(n) for n in image.names]
        with store.locked():
            staged: dict[str, str] = {}
            for image in images:
                for i, ref in enumerate(image.layers):
                    if ref.diff_id in staged or store.has_layer(ref.diff_id):
                        continue
                    lower = [
                        os.path.join(staged[d.diff_id], "tree")
                        if d.diff_id in staged
                        else store.layer_tree(d.diff_id)
                        for d in reversed(image.layers[:i])
                    ]
                    label = f"importing layer {i + 1}/{len(image.layers)} {ref.diff_id[7:19]}"
                    staged[ref.diff_id] = stage_layer(store, source, ref, lower, label)
            try:
                for diff_id, layer_dir in staged.items():
                    store.add_layer(layer_dir, diff_id)
                return [
                    (store.add_image(image.config, image.names), image.names) for image in images
                ]
            except BaseException:
                store.collect_layers()
                raise
    except ArchiveError as e:
        raise UsageError(f"{path}: {e}") from None
    finally:
        if isinstance(source, TarSource):
            source.tar.close()


# ---- export ---------------------------------------------------------------------------------


def _tar_file(
    tar: tarfile.TarFile, name: str, data: bytes | None = None, path: str | None = None, mode=0o644
):
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", mode
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    elif path is not None:
        info.size = os.path.getsize(path)
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)


def export_image(store: Store, ref: str, out_path: str, fmt: str = "docker") -> None:
    """`image export`: write a docker-load-able tarball or an OCI layout tarball, atomically."""
    image = store.require_image(ref)
    names = image.names
    with contextlib.suppress(UsageError):
        if normalize_name(ref) in image.names:
            names = [normalize_name(ref)]
    if os.path.isdir(out_path):
        raise UsageError(f"{out_path} is a directory; give a file name for the archive")
    config = store.config_bytes(image.id)
    layer_tars = [store.layer_tar(d) for d in image.diff_ids]
    total = sum(os.path.getsize(p) for p in layer_tars)
    directory = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pyunion-export-")
    except OSError as e:
        raise UsageError(f"cannot write {out_path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out, Progress(f"exporting {ref}", total) as bar:
            counter = layertar.HashingWriter(out, bar.update)
            with tarfile.open(fileobj=counter, mode="w", format=tarfile.PAX_FORMAT) as tar:
                if fmt == "docker":
                    _write_docker(tar, image, names, config, layer_tars)
                else:
                    _write_oci(tar, image, names, config, layer_tars)
        os.chmod(tmp, 0o644)
        os.rename(tmp, out_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_docker(tar, image, names, config, layer_tars) -> None:
    config_name = image.id[7:] + ".json"
    layer_names = [d[7:] + "/layer.tar" for d in image.diff_ids]
    manifest = [{"Config": config_name, "RepoTags": names or None, "Layers": layer_names}]
    _tar_file(tar, config_name, config)
    for d, name, path in sorted(zip(image.diff_ids, layer_names, layer_tars, strict=True)):
        _tar_file(tar, d[7:], mode=0o755)
        _tar_file(tar, name, path=path)
    _tar_file(tar, "manifest.json", json.dumps(manifest).encode())


def _write_oci(tar, image, names, config, layer_tars) -> None:
    doc = image.document
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": image.id, "size": len(config)},
        "layers": [
            {"mediaType": OCI_LAYER, "digest": d, "size": os.path.getsize(p)}
            for d, p in zip(image.diff_ids, layer_tars, strict=True)
        ],
    }
    manifest_bytes = json.dumps(manifest, indent=None).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    base = {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest_bytes)}
    if doc.get("architecture") and doc.get("os"):
        base["platform"] = {"architecture": doc["architecture"], "os": doc["os"]}
    descriptors = [dict(base, annotations={REF_NAME: n, CONTAINERD_NAME: n}) for n in names] or [
        base
    ]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    _tar_file(tar, "blobs", mode=0o755)
    _tar_file(tar, "blobs/sha256", mode=0o755)
    blobs = {image.id: ("data", config), manifest_digest: ("data", manifest_bytes)}
    for d, p in zip(image.diff_ids, layer_tars, strict=True):
        blobs[d] = ("path", p)
    for digest, (kind, value) in sorted(blobs.items()):
        if kind == "data":
            _tar_file(tar, blob_name(digest), value)
        else:
            _tar_file(tar, blob_name(digest), path=value)
    _tar_file(tar, "index.json", json.dumps(index).encode())
    _tar_file(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
