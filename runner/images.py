"""The `image`, `ps`, `rm`, `diff` and `commit` subcommands: argument parsing and output."""

import argparse
import json
import os
import sys
import time

from runner import layertar
from runner.imagearchive import export_image, import_archive
from runner.layerdiff import changes, commit_layer
from runner.store import Image, Store, normalize_name, split_name
from unionfs.errors import UsageError
from unionfs.layers import branch_in_use

CONFIG_KEYS = {"Cmd": None, "Entrypoint": None, "Env": None, "WorkingDir": "", "User": ""}


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one-line UsageErrors instead of exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _parser(prog: str) -> Parser:
    return Parser(prog=f"pyunion {prog}", allow_abbrev=False)


# ---- image ----------------------------------------------------------------------------------


def image_size(store: Store, image: Image) -> int:
    total = 0
    for d in image.diff_ids:
        try:
            total += int(store.layer_info(d).get("size", 0))
        except (OSError, ValueError):
            pass
    return total


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n}"


def cmd_image_import(store: Store, argv: list[str]) -> int:
    p = _parser("image import")
    p.add_argument("path")
    p.add_argument("--name", help="name the image NAME[:TAG] instead of using the archive's names")
    args = p.parse_args(argv)
    if args.name is not None:
        split_name(args.name)  # validate before any work
    for image_id, names in import_archive(store, args.path, args.name):
        print(f"Loaded image: {', '.join(names)}" if names else f"Loaded image ID: {image_id}")
    return 0


def cmd_image_ls(store: Store, argv: list[str]) -> int:
    p = _parser("image ls")
    p.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
    args = p.parse_args(argv)
    rows = []
    for image in store.images():
        created = str(image.document.get("created", ""))[:19].replace("T", " ")
        size = human_size(image_size(store, image))
        for name in image.names or ["<none>:<none>"]:
            repo, _, tag = name.rpartition(":")
            rows.append((repo, tag, image.short_id, created, size))
    if args.quiet:
        for short in dict.fromkeys(r[2] for r in rows):
            print(short)
        return 0
    header = ("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")
    _table([header, *sorted(rows)])
    return 0


def _table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_image_rm(store: Store, argv: list[str]) -> int:
    p = _parser("image rm")
    p.add_argument("names", nargs="+", metavar="NAME")
    args = p.parse_args(argv)
    for ref in args.names:
        for line in store.remove_image(ref):
            print(line)
    return 0


def inspect_document(store: Store, image: Image) -> dict:
    doc = image.document
    config = dict(CONFIG_KEYS)
    config.update(doc.get("config") or {})
    return {
        "Id": image.id,
        "RepoTags": image.names,
        "RepoDigests": [],
        "Parent": "",
        "Comment": "",
        "Created": doc.get("created", ""),
        "Author": doc.get("author", ""),
        "Architecture": doc.get("architecture", ""),
        "Os": doc.get("os", ""),
        "Config": config,
        "RootFS": {"Type": "layers", "Layers": list(image.diff_ids)},
        "Size": image_size(store, image),
        "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
    }


def cmd_image_inspect(store: Store, argv: list[str]) -> int:
    p = _parser("image inspect")
    p.add_argument("names", nargs="+", metavar="NAME")
    args = p.parse_args(argv)
    images = [store.require_image(ref) for ref in args.names]
    print(json.dumps([inspect_document(store, i) for i in images], indent=4))
    return 0


def cmd_image_export(store: Store, argv: list[str]) -> int:
    p = _parser("image export")
    p.add_argument("name")
    p.add_argument("file")
    p.add_argument("--format", choices=("docker", "oci"), default="docker")
    args = p.parse_args(argv)
    export_image(store, args.name, args.file, args.format)
    return 0


def cmd_image_tag(store: Store, argv: list[str]) -> int:
    p = _parser("image tag")
    p.add_argument("source")
    p.add_argument("target")
    args = p.parse_args(argv)
    split_name(args.target)
    store.tag(store.require_image(args.source).id, args.target)
    return 0


IMAGE_COMMANDS = {
    "import": cmd_image_import,
    "load": cmd_image_import,
    "ls": cmd_image_ls,
    "list": cmd_image_ls,
    "rm": cmd_image_rm,
    "inspect": cmd_image_inspect,
    "export": cmd_image_export,
    "save": cmd_image_export,
    "tag": cmd_image_tag,
}


# ---- containers -----------------------------------------------------------------------------


def _image_label(store: Store, image_id: str) -> str:
    image = store.load_image(image_id)
    if image is None:
        return image_id[7:19] + " (deleted)"
    return image.names[0] if image.names else image.short_id


def cmd_ps(store: Store, argv: list[str]) -> int:
    p = _parser("ps")
    p.add_argument("-q", "--quiet", action="store_true", help="only names")
    args = p.parse_args(argv)
    rows = [("NAME", "IMAGE", "CREATED")]
    for c in store.containers():
        if args.quiet:
            print(c.name)
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.created))
        rows.append((c.name, _image_label(store, c.image), created))
    if not args.quiet:
        _table(rows)
    return 0


def cmd_rm(store: Store, argv: list[str]) -> int:
    p = _parser("rm")
    p.add_argument("-f", "--force", action="store_true", help="remove even if it looks mounted")
    p.add_argument("names", nargs="+", metavar="NAME")
    args = p.parse_args(argv)
    for name in args.names:
        c = store.load_container(name)
        if c is None:
            raise UsageError(f"no such container: {name}")
        if not args.force and branch_in_use(c.upper):
            raise UsageError(
                f"container {name} looks in use (its layer is mounted); stop it or use rm -f"
            )
        store.remove_container(name)
        print(name)
    return 0


def _diff_target(store: Store, target: str, image_ref: str | None) -> tuple[str, list[str] | None]:
    """The writable layer dir named by NAME|DIR and the image layers to compare it against."""
    container = None
    try:
        container = store.load_container(target)
    except UsageError:
        pass
    if container is None and not os.path.isdir(target):
        raise UsageError(f"no such container or directory: {target}")
    if container is None:
        real = os.path.realpath(target)
        container = next((c for c in store.containers() if os.path.realpath(c.upper) == real), None)
        upper = target
    else:
        upper = container.upper
    if image_ref is not None:
        return upper, store.require_image(image_ref).layer_dirs
    if container is not None:
        image = store.load_image(container.image)
        if image is None:
            raise UsageError(f"the image of container {container.name} is gone")
        return upper, image.layer_dirs
    return upper, None


def cmd_diff(store: Store, argv: list[str]) -> int:
    p = _parser("diff")
    p.add_argument("target", metavar="NAME|DIR")
    p.add_argument("--image", help="compare a bare DIR against this image's layers")
    args = p.parse_args(argv)
    upper, layers = _diff_target(store, args.target, args.image)
    out = sys.stdout.buffer
    for kind, path in changes(upper, layers):
        out.write(kind.encode() + b" " + path + b"\n")
    out.flush()
    return 0


def cmd_commit(store: Store, argv: list[str]) -> int:
    p = _parser("commit")
    p.add_argument("name", metavar="NAME")
    p.add_argument("image", metavar="IMAGE[:TAG]")
    p.add_argument("-m", "--message", default="", help="a comment recorded in the image history")
    args = p.parse_args(argv)
    new_name = normalize_name(args.image)
    container = store.load_container(args.name)
    if container is None:
        raise UsageError(f"no such container: {args.name}")
    image = store.load_image(container.image)
    if image is None:
        raise UsageError(f"the image of container {args.name} is gone")
    image_id = commit_layer(store, container.upper, image, new_name, args.message)
    print(image_id)
    return 0


CONTAINER_COMMANDS = {"ps": cmd_ps, "rm": cmd_rm, "diff": cmd_diff, "commit": cmd_commit}


def main(command: str, argv: list[str]) -> int:
    store = Store()
    try:
        if command == "image":
            if not argv or argv[0] not in IMAGE_COMMANDS:
                raise UsageError("usage: pyunion image import|ls|rm|inspect|export|tag ...")
            return IMAGE_COMMANDS[argv[0]](store, argv[1:])
        if command in CONTAINER_COMMANDS:
            return CONTAINER_COMMANDS[command](store, argv)
        raise UsageError(f"unknown command {command}")
    except layertar.LayerError as e:
        print(f"pyunion: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"pyunion: {command}: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as e:
        print(f"pyunion: {command}: {e}", file=sys.stderr)
        return 1
