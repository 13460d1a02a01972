"""Changes in a writable layer: the `docker diff` listing, and the entries a commit puts in a layer.

A writable layer is read directly (no mount needed). Excluded everywhere: the union's work area
`/.wh..wh.pyunion` and the runner's generated `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`
(a directory holding nothing but excluded entries is left out too).
"""

import copy
import json
import os
import stat
import time
from dataclasses import dataclass

from runner import layertar
from runner.imageprogress import Progress
from runner.layerview import OPAQUE, WH, LayerView, has_opaque_xattr, is_whiteout_device
from runner.store import Image, Store, canonical_json, remove_tree
from unionfs import metacopy

EXCLUDED = {
    (b".wh..wh.pyunion",),
    (b"etc", b"hostname"),
    (b"etc", b"hosts"),
    (b"etc", b"resolv.conf"),
}


@dataclass
class UpperEntry:
    """One entry found in a writable layer, already classified."""

    parts: tuple[bytes, ...]
    path: bytes  # on disk
    st: os.stat_result | None
    kind: str  # "file" (anything real), "whiteout" (parts names the hidden entry), "opaque" (dir marker)




def _only_excluded(parts: tuple[bytes, ...], path: bytes) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return bool(names) and all(parts + (n,) in EXCLUDED for n in names)


def scan_upper(upper: str):
    """Yield UpperEntry items of a writable layer in sorted path order (parents first).

    Iterative (an explicit stack of directory listings), so any depth of nesting works.
    """
    stack = [_listing((), os.fsencode(upper))]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        entry, descend = item
        yield entry
        if descend:
            stack.append(_listing(entry.parts, entry.path))


def _listing(parts: tuple[bytes, ...], path: bytes):
    """(UpperEntry, descend?) for the directory `path` itself (if opaque) and its children."""
    if parts and has_opaque_xattr(path):
        yield UpperEntry(parts, path, None, "opaque"), False
    for name in sorted(os.listdir(path)):
        cparts = parts + (name,)
        if cparts in EXCLUDED:
            continue
        full = os.path.join(path, name)
        if name == OPAQUE:
            if parts:
                yield UpperEntry(parts, full, None, "opaque"), False
            continue
        if name.startswith(WH + WH):
            continue  # union/private metadata, never part of a layer
        if name.startswith(WH):
            yield UpperEntry(parts + (name[len(WH) :],), full, None, "whiteout"), False
            continue
        st = os.lstat(full)
        if is_whiteout_device(st):
            yield UpperEntry(cparts, full, st, "whiteout"), False
        elif stat.S_ISDIR(st.st_mode):
            if not _only_excluded(cparts, full):
                yield UpperEntry(cparts, full, st, "file"), True
        else:
            yield UpperEntry(cparts, full, st, "file"), False


def changes(upper: str, layer_dirs: list[str] | None) -> list[tuple[str, bytes]]:
    """(kind, "/path") pairs, sorted by path: A added, C changed, D deleted.

    With `layer_dirs` (the image, top first) an entry is C if the image has it, else A. Without
    (a bare directory), an entry is A, except a directory known to have existed below - one that
    is opaque or holds a whiteout somewhere beneath - which is C.
    """
    view = LayerView(layer_dirs) if layer_dirs is not None else None
    try:
        return _changes(upper, view)
    finally:
        if view is not None:
            view.close()


def _changes(upper: str, view: LayerView | None) -> list[tuple[str, bytes]]:
    result: dict[tuple[bytes, ...], str] = {}
    upper_names: set[tuple[bytes, ...]] = set()
    opaque_dirs: list[tuple[bytes, ...]] = []
    evidence: set[tuple[bytes, ...]] = set()  # dirs that must have existed below (bare mode)
    for e in scan_upper(upper):
        if e.kind == "whiteout":
            result[e.parts] = "D"
            evidence.update(e.parts[:i] for i in range(1, len(e.parts)))
        elif e.kind == "opaque":
            opaque_dirs.append(e.parts)
            evidence.update(e.parts[:i] for i in range(1, len(e.parts) + 1))
        else:
            upper_names.add(e.parts)
            if view is None:
                result[e.parts] = "A"
            else:
                result[e.parts] = "C" if view.lookup(e.parts) is not None else "A"
    if view is None:
        for parts in evidence:
            if parts in result:
                result[parts] = "C"
    else:
        for d in opaque_dirs:
            if not view.is_dir(d):
                continue
            for name in view.children(d):
                if d + (name,) not in upper_names:
                    result[d + (name,)] = "D"
    return [(kind, b"/" + b"/".join(parts)) for parts, kind in sorted(result.items())]


def layer_entries(upper: str, layer_dirs: list[str] | None = None) -> list[layertar.TreeEntry]:
    """What a commit of `upper` puts in the layer tar: real entries plus OCI whiteout files.

    A metadata-only copy (see unionfs.metacopy) gets its data from `layer_dirs` (the image
    below, top first), where the union found it.
    """
    entries: dict[bytes, layertar.TreeEntry] = {}
    with LayerView(layer_dirs or []) as view:
        for e in scan_upper(upper):
            if e.kind == "file" and stat.S_ISSOCK(e.st.st_mode):
                continue  # sockets cannot be archived (docker skips them too)
            _add_entry(entries, e, view)
    return list(entries.values())


def _add_entry(entries: dict[bytes, layertar.TreeEntry], e: UpperEntry, view: LayerView) -> None:
    if e.kind == "file":
        path = b"/".join(e.parts)
        data = None
        if stat.S_ISREG(e.st.st_mode) and e.st.st_size > 0:
            origin = metacopy.origin_of(e.path, path)
            if origin is not None:
                data = view.data_of(origin)
                if data is None:
                    raise layertar.LayerError(
                        f"/{os.fsdecode(path)}: no layer of the image holds its data "
                        f"(a metadata-only copy of /{os.fsdecode(origin)})")
        entries[path] = layertar.TreeEntry(path, os.fsdecode(e.path), data)
    elif e.kind == "whiteout":
        path = b"/".join(e.parts[:-1] + (WH + e.parts[-1],))
        entries[path] = layertar.TreeEntry(path, None)
    else:
        path = b"/".join(e.parts + (OPAQUE,))
        entries[path] = layertar.TreeEntry(path, None)


def rootless_owner_map():
    """For a rootless commit: host ids back to container ids, inverting the runner's id mapping.

    The caller's uid/gid are the container's 0; with subordinate ranges, subordinate id
    `start + k` is container id `1 + k`. Other ids are kept. As root, ids are written as stored.
    """
    if os.geteuid() == 0:
        return None
    from runner.idmap import plan_mapping

    mapping = plan_mapping(os.getuid(), os.getgid())

    def back(host: int, own: int, sub) -> int:
        if host == own:
            return 0
        if sub is not None and sub.start <= host < sub.start + sub.count:
            return 1 + host - sub.start
        return host

    return lambda uid, gid: (
        back(uid, mapping.uid, mapping.subuid),
        back(gid, mapping.gid, mapping.subgid),
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def commit_layer(store: Store, upper: str, image: Image, new_name: str | None, comment: str) -> str:
    """Turn `upper` into a new layer on top of `image`; store and name the new image; its ID."""
    entries = layer_entries(upper, image.layer_dirs)
    total = sum(os.lstat(e.source).st_size for e in entries if e.source)
    with store.locked():
        staged = store.staging_dir("l-")
        tar_path = os.path.join(staged, "layer.tar")
        with (
            open(tar_path, "wb") as f,
            Progress(f"committing {new_name or ''}".strip(), total) as bar,
        ):
            diff_id, size = layertar.write_layer_tar(entries, f, bar.update, rootless_owner_map())
        if store.has_layer(diff_id):
            remove_tree(staged)
        else:
            tree = os.path.join(staged, "tree")
            os.mkdir(tree, 0o755)
            unapplied = layertar.extract_layer(tar_path, tree, lower_dirs=image.layer_dirs)
            with open(os.path.join(staged, "layer.json"), "wb") as f:
                f.write(canonical_json({"diff_id": diff_id, "size": size, "unapplied": unapplied}))
            os.chmod(staged, 0o755)
            store.add_layer(staged, diff_id)
        doc = copy.deepcopy(image.document)
        now = _now()
        doc["created"] = now
        rootfs = doc.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        rootfs.setdefault("type", "layers")
        rootfs.setdefault("diff_ids", []).append(diff_id)
        doc.setdefault("history", []).append(
            {"created": now, "created_by": "pyunion commit", "comment": comment}
        )
        config = json.dumps(doc, separators=(",", ":")).encode()
        try:
            return store.add_image(config, [new_name] if new_name else [])
        except BaseException:
            store.collect_layers()
            raise
