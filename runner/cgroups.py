"""Control groups for a container: discovery of v1/v2 hierarchies, limits, join and removal."""

import os
import time
from dataclasses import dataclass, field

from runner.errors import RunError
from unionfs.errors import UsageError

CGROUP_ROOT = "/sys/fs/cgroup"
CPU_PERIOD = 100000


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and this process's place in it."""

    version: int  # 1 or 2
    mountpoint: str
    controllers: frozenset[str]  # v1: mount options naming controllers (and name=...)
    path: str  # this process's cgroup, relative to the hierarchy root

    @property
    def directory(self) -> str:
        return os.path.join(self.mountpoint, self.path.lstrip("/"))

    @property
    def container_dir(self) -> str:
        """Where the container mounts this hierarchy, relative to /sys/fs/cgroup."""
        return (
            os.path.relpath(self.mountpoint, CGROUP_ROOT) if self.mountpoint != CGROUP_ROOT else ""
        )

    @property
    def mount_data(self) -> str | None:
        if self.version == 2:
            return None
        names = sorted(self.controllers)
        if all(n.startswith("name=") for n in names):
            names = ["none", *names]
        return ",".join(names)

    def available(self) -> frozenset[str]:
        """Controllers usable for limits in this hierarchy."""
        if self.version == 1:
            return self.controllers
        try:
            with open(os.path.join(self.mountpoint, "cgroup.controllers")) as f:
                return frozenset(f.read().split())
        except OSError:
            return frozenset()


def _unescape(path: str) -> str:
    return path.encode().decode("unicode_escape")


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup, with this process's cgroup in each."""
    membership_v1, membership_v2 = {}, None
    with open("/proc/self/cgroup") as f:
        for line in f.read().splitlines():
            hid, ctrls, path = line.split(":", 2)
            if hid == "0" and not ctrls:
                membership_v2 = path
            else:
                membership_v1[frozenset(ctrls.split(","))] = path
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f.read().splitlines():
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            root, mnt = _unescape(fields[3]), _unescape(fields[4])
            fstype = rfields[0]
            if not (mnt == CGROUP_ROOT or mnt.startswith(CGROUP_ROOT + "/")):
                continue
            if fstype == "cgroup2" and membership_v2 is not None:
                rel = os.path.relpath(membership_v2, root) if root != "/" else membership_v2
                found.append(Hierarchy(2, mnt, frozenset(), "/" + rel.lstrip("/").lstrip(".")))
            elif fstype == "cgroup":
                opts = set(rfields[2].split(","))
                for ctrls, path in membership_v1.items():
                    if ctrls <= opts:
                        rel = os.path.relpath(path, root) if root != "/" else path
                        found.append(Hierarchy(1, mnt, ctrls, "/" + rel.lstrip("/").lstrip(".")))
                        break
    return found


def parse_size(text: str) -> int:
    """`512m`, `1g`, `65536`, `100k` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = text.strip().lower()
    if len(raw) > 1 and raw.endswith("b") and raw[-2] in units:
        raw = raw[:-1]
    mult = 1
    if raw and raw[-1] in units:
        mult, raw = units[raw[-1]], raw[:-1]
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"--memory: invalid size {text!r} (use e.g. 64m, 1g)") from None
    size = int(value * mult)
    if size < 1 << 20:
        raise UsageError(f"--memory: {text!r} is too small (at least 1m)")
    return size


@dataclass
class Limits:
    """Resource limits asked for on the command line; None means unlimited."""

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None

    def controllers(self) -> dict[str, str]:
        """controller -> the option that asked for it."""
        wanted = {}
        if self.memory is not None:
            wanted["memory"] = "--memory"
        if self.cpus is not None:
            wanted["cpu"] = "--cpus"
        if self.pids is not None:
            wanted["pids"] = "--pids-limit"
        return wanted


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _copy_cpuset(directory: str) -> None:
    parent = os.path.dirname(directory)
    for name in ("cpuset.cpus", "cpuset.mems"):
        try:
            with open(os.path.join(parent, name)) as f:
                value = f.read().strip()
            _write(os.path.join(directory, name), value)
        except OSError:
            pass


_NOT_DELEGATED = " (cgroup not delegated to this user)"


def _create_v2(h: Hierarchy, name: str, needed: list[str], wanted: dict[str, str]) -> str:
    """A v2 cgroup with the needed controllers enabled: under our own cgroup, or, where that
    holds processes (the no-internal-processes rule), beside it higher up the tree."""
    first_error = None
    parent = h.directory.rstrip("/")
    while True:
        directory = os.path.join(parent, name)
        try:
            os.mkdir(directory)
            try:
                for ctrl in needed:
                    _write(os.path.join(parent, "cgroup.subtree_control"), f"+{ctrl}")
                return directory
            except OSError:
                os.rmdir(directory)
                raise
        except OSError as e:
            first_error = first_error or f"{directory}: {e.strerror}"
        if parent == h.mountpoint.rstrip("/") or not parent:
            break
        parent = os.path.dirname(parent)
    option = wanted[needed[0]]
    hint = _NOT_DELEGATED if os.geteuid() else ""
    raise RunError(
        f"{option}: cannot create a cgroup with {', '.join(needed)}: {first_error}{hint}"
    )


@dataclass
class Cgroup:
    """The container's cgroup directories, one per hierarchy it could be created in."""

    name: str
    directories: list[str] = field(default_factory=list)
    limited: set[str] = field(default_factory=set)  # directories that carry a limit

    @classmethod
    def create(cls, name: str, limits: Limits) -> "Cgroup":
        """Create the cgroup and apply limits; RunError when a limit cannot be applied."""
        group = cls(name)
        wanted = limits.controllers()
        found = hierarchies()
        chosen = {}  # controller -> hierarchy
        for ctrl, option in wanted.items():
            v1 = [h for h in found if h.version == 1 and ctrl in h.controllers]
            v2 = [h for h in found if h.version == 2 and ctrl in h.available()]
            if not v1 and not v2:
                raise RunError(f"{option}: no cgroup {ctrl} controller on this host")
            chosen[ctrl] = (v1 or v2)[0]
        try:
            for h in found:
                needed = [c for c, ch in chosen.items() if ch is h]
                if h.version == 2 and needed:
                    directory = _create_v2(h, name, needed, wanted)
                else:
                    directory = os.path.join(h.directory, name)
                    try:
                        os.mkdir(directory)
                    except OSError as e:
                        if needed:
                            raise RunError(
                                f"{wanted[needed[0]]}: cannot create cgroup {directory}: "
                                f"{e.strerror}{_NOT_DELEGATED if os.geteuid() else ''}"
                            ) from None
                        continue
                group.directories.append(directory)
                if h.version == 1 and "cpuset" in h.controllers:
                    _copy_cpuset(directory)
                if needed:
                    group.limited.add(directory)
                    group._apply(h, directory, needed, limits, wanted)
        except BaseException:
            group.remove()
            raise
        return group

    def _apply(self, h: Hierarchy, directory: str, needed, limits: Limits, wanted) -> None:
        settings = []
        if "memory" in needed:
            if h.version == 1:
                settings += [("memory.limit_in_bytes", str(limits.memory), True)]
                settings += [("memory.memsw.limit_in_bytes", str(limits.memory), False)]
            else:
                settings += [
                    ("memory.max", str(limits.memory), True),
                    ("memory.swap.max", "0", False),
                ]
        if "cpu" in needed:
            quota = max(1000, int(limits.cpus * CPU_PERIOD))
            if h.version == 1:
                settings += [("cpu.cfs_period_us", str(CPU_PERIOD), True)]
                settings += [("cpu.cfs_quota_us", str(quota), True)]
            else:
                settings += [("cpu.max", f"{quota} {CPU_PERIOD}", True)]
        if "pids" in needed:
            settings += [("pids.max", str(limits.pids), True)]
        for filename, value, required in settings:
            path = os.path.join(directory, filename)
            if not required and not os.path.exists(path):
                continue
            try:
                _write(path, value)
            except OSError as e:
                if required:
                    option = wanted[filename.split(".")[0]]
                    raise RunError(f"{option}: cannot set {path}: {e.strerror}") from None

    def join(self, pid: int) -> None:
        """Move a process into every directory of the cgroup (best effort for unlimited ones)."""
        for directory in self.directories:
            try:
                _write(os.path.join(directory, "cgroup.procs"), str(pid))
            except OSError as e:
                if directory in self.limited:
                    raise RunError(f"cannot join cgroup {directory}: {e.strerror}") from None

    def remove(self) -> None:
        """Remove the directories once the processes in them are gone."""
        for directory in reversed(self.directories):
            for _ in range(50):
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
        self.directories = []
