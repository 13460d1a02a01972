"""Inside a container: the mount table (proc, dev, sys, cgroup, volumes) and entering the root."""

import errno
import fcntl
import os
import socket
import stat
import struct
from dataclasses import dataclass

from runner import libc
from runner.cgroups import Hierarchy
from runner.libc import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT

DEVICES = {  # name -> (major, minor), all mode 0666
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug")
# statvfs flag -> mount flag (only the ones that differ or that a user namespace locks)
_STATVFS_FLAGS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: libc.MS_NOATIME,
    os.ST_NODIRATIME: libc.MS_NODIRATIME,
    os.ST_RELATIME: libc.MS_RELATIME,
}


@dataclass(frozen=True)
class Volume:
    """A `-v HOST:CT[:ro]` bind mount."""

    host: str
    target: str
    readonly: bool


def remount_readonly(path: str) -> None:
    """Make a bind mount read-only, keeping the flags a user namespace does not let us drop."""
    current = os.statvfs(path).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st_flag, ms_flag in _STATVFS_FLAGS.items():
        if current & st_flag:
            flags |= ms_flag
    libc.mount(None, path, None, flags)


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def mount_proc(root: str) -> None:
    libc.mount("proc", _inside(root, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _can_make_nodes(dev: str) -> bool:
    """Whether device nodes can be made and used here (not in a user namespace)."""
    probe = os.path.join(dev, ".probe")
    try:
        os.mknod(probe, 0o666 | stat.S_IFCHR, os.makedev(*DEVICES["null"]))
        with open(probe, "rb", buffering=0):
            return True
    except OSError:
        return False
    finally:
        if os.path.lexists(probe):
            os.unlink(probe)


def mount_dev(root: str) -> None:
    """A small tmpfs with the standard devices (device nodes, or bind mounts when rootless)."""
    dev = _inside(root, "/dev")
    libc.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    use_nodes = _can_make_nodes(dev)
    for name, (major, minor) in DEVICES.items():
        path = os.path.join(dev, name)
        if use_nodes:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(path, 0o666)
        else:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
            libc.mount(f"/dev/{name}", path, None, MS_BIND)
    pts = os.path.join(dev, "pts")
    os.mkdir(pts, 0o755)
    opts = "newinstance,ptmxmode=0666,mode=0620"
    try:
        libc.mount("devpts", pts, "devpts", MS_NOSUID | MS_NOEXEC, opts + ",gid=5")
    except OSError as e:
        if e.errno != errno.EINVAL:  # gid 5 not mapped in a single-id user namespace
            raise
        libc.mount("devpts", pts, "devpts", MS_NOSUID | MS_NOEXEC, opts)
    shm = os.path.join(dev, "shm")
    os.mkdir(shm, 0o1777)
    libc.mount("shm", shm, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
    for name, target in DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))


def mount_sys(root: str) -> None:
    """Read-only /sys: a fresh sysfs where allowed, else a read-only bind of the host's."""
    target = _inside(root, "/sys")
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        libc.mount("sysfs", target, "sysfs", flags)
    except PermissionError:
        libc.mount("/sys", target, None, MS_BIND | MS_REC)
        remount_readonly(target)


def mount_cgroups(root: str, found: list[Hierarchy], own_dirs: dict[str, str]) -> None:
    """/sys/fs/cgroup showing the container's own cgroup in each hierarchy (read-only).

    own_dirs maps a hierarchy mountpoint to the container's directory there (for a bind
    mount where the kernel refuses a fresh cgroup mount).
    """
    base = _inside(root, "/sys/fs/cgroup")
    if not os.path.isdir(base) or not found:
        return
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if len(found) == 1 and found[0].container_dir == "":
        _mount_hierarchy(found[0], base, flags, own_dirs)
        return
    libc.mount("cgroup", base, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755")
    for h in found:
        if not h.container_dir or "/" in h.container_dir:
            continue
        target = os.path.join(base, h.container_dir)
        os.mkdir(target, 0o755)
        _mount_hierarchy(h, target, flags, own_dirs)
    remount_readonly(base)


def _mount_hierarchy(h: Hierarchy, target: str, flags: int, own_dirs: dict[str, str]) -> None:
    fstype = "cgroup2" if h.version == 2 else "cgroup"
    try:
        libc.mount("cgroup", target, fstype, flags, h.mount_data)
    except OSError:
        source = own_dirs.get(h.mountpoint)
        if source is None:
            return
        try:
            libc.mount(source, target, None, MS_BIND)
            remount_readonly(target)
        except OSError:
            pass


def mount_volumes(root: str, volumes: list[Volume]) -> None:
    for v in volumes:
        target = _inside(root, v.target)
        libc.mount(v.host, target, None, MS_BIND | MS_REC)
        if v.readonly:
            remount_readonly(target)


def enter_root(root: str, use_chroot: bool) -> str | None:
    """pivot_root into root and detach the old root; chroot when forced or impossible.

    Returns a note for stderr when chroot was used.
    """
    os.chdir(root)
    if not use_chroot:
        try:
            libc.pivot_root(".", ".")
            libc.umount2(".", libc.MNT_DETACH)
            os.chdir("/")
            return None
        except OSError as e:
            note = f"pivot_root impossible ({e.strerror}), falling back to chroot"
    else:
        note = "using chroot instead of pivot_root (--chroot)"
    os.chroot(".")
    os.chdir("/")
    return note


def harden_proc() -> None:
    """After entering the root: read-only kernel tunables and masked kernel internals."""
    for name in PROC_READONLY:
        path = f"/proc/{name}"
        if os.path.exists(path):
            try:
                libc.mount(path, path, None, MS_BIND | MS_REC)
                remount_readonly(path)
            except OSError:
                pass
    for name in PROC_MASKED:
        path = f"/proc/{name}"
        if os.path.exists(path):
            try:
                libc.mount("/dev/null", path, None, MS_BIND)
            except OSError:
                pass


def loopback_up() -> None:
    """Bring up `lo` in a fresh network namespace."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), siocgifflags, req))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))
