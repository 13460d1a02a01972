"""The init layer: generated /etc files and mountpoints, between the image and the writable layer."""

import os
import stat

from runner.rootfs import Volume

MOUNTPOINTS = ("proc", "dev", "sys")
DEFAULT_RESOLV = "nameserver 127.0.0.1\n"
MAX_SYMLINKS = 40


def hosts_text(hostname: str) -> str:
    return (
        f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    )


def host_resolv_conf() -> str:
    try:
        with open("/etc/resolv.conf") as f:
            return f.read()
    except OSError:
        return DEFAULT_RESOLV


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)


def _present(layer: str, parts: list[str]) -> str | None:
    """layer/parts... when it exists without following a symlink on the way (else None)."""
    path = layer
    for i, name in enumerate(parts):
        path = os.path.join(path, name)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None
    return path


def resolve_in_layers(layers: list[str], path: str) -> tuple[str, bool]:
    """A container path with the layers' symlinks followed (the top-most layer having each
    component decides), as the container would see it; and whether it exists there."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        found = next(
            (f for f in (_present(layer, resolved + [name]) for layer in layers) if f), None
        )
        if found is None:
            return "/" + "/".join(resolved + [name] + parts), False
        if os.path.islink(found):
            hops += 1
            if hops > MAX_SYMLINKS:
                return "/" + "/".join(resolved + [name] + parts), False
            target = os.readlink(found)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(name)
    return "/" + "/".join(resolved), True


def write_init_layer(
    directory: str, hostname: str, volumes: list[Volume], extra_dirs: list[str] = ()
) -> None:
    """Fill an empty directory with the init layer for one container.

    Volume targets and extra_dirs are container paths already resolved (resolve_in_layers).
    """
    etc = os.path.join(directory, "etc")
    os.makedirs(etc, mode=0o755, exist_ok=True)
    _write(os.path.join(etc, "hostname"), hostname + "\n")
    _write(os.path.join(etc, "hosts"), hosts_text(hostname))
    _write(os.path.join(etc, "resolv.conf"), host_resolv_conf())
    for name in [*MOUNTPOINTS, *extra_dirs]:
        os.makedirs(os.path.join(directory, name.strip("/")), mode=0o755, exist_ok=True)
    for v in volumes:
        target = os.path.join(directory, v.target.strip("/"))
        if os.path.isdir(v.host):
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            if not os.path.exists(target):
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
