"""The init layer: generated /etc files and mountpoints, between the image and the writable layer."""

import os

from runner.rootfs import Volume

MOUNTPOINTS = ("proc", "dev", "sys")
DEFAULT_RESOLV = "nameserver 127.0.0.1\n"


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


def write_init_layer(directory: str, hostname: str, volumes: list[Volume]) -> None:
    """Fill an empty directory with the init layer for one container."""
    etc = os.path.join(directory, "etc")
    os.makedirs(etc, mode=0o755, exist_ok=True)
    _write(os.path.join(etc, "hostname"), hostname + "\n")
    _write(os.path.join(etc, "hosts"), hosts_text(hostname))
    _write(os.path.join(etc, "resolv.conf"), host_resolv_conf())
    for name in MOUNTPOINTS:
        os.makedirs(os.path.join(directory, name), mode=0o755, exist_ok=True)
    for v in volumes:
        target = os.path.join(directory, v.target.strip("/"))
        if os.path.isdir(v.host):
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            if not os.path.exists(target):
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
