"""User-namespace id maps: subordinate id ranges and writing uid_map/gid_map for a child."""

import pwd
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class IdRange:
    """A run of ids: `count` ids starting at `start` on the host."""

    start: int
    count: int


def subordinate_range(path: str, uid: int) -> IdRange | None:
    """The first range in /etc/subuid or /etc/subgid for this user (by name or number)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (name, str(uid)):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if count > 0:
            return IdRange(start, count)
    return None


@dataclass(frozen=True)
class IdMapping:
    """How a rootless run maps ids: the caller becomes 0, subordinate ids follow from 1."""

    uid: int
    gid: int
    subuid: IdRange | None
    subgid: IdRange | None

    @property
    def full(self) -> bool:
        return self.subuid is not None and self.subgid is not None

    def describe(self) -> str:
        if self.full:
            return f"uids 0-{self.subuid.count} and gids 0-{self.subgid.count} mapped"
        return "only uid 0 and gid 0 mapped"


def plan_mapping(uid: int, gid: int) -> IdMapping:
    """Use the full subordinate ranges when both exist and newuidmap/newgidmap are installed."""
    sub_u = subordinate_range("/etc/subuid", uid)
    sub_g = subordinate_range("/etc/subgid", uid)
    tools = shutil.which("newuidmap") and shutil.which("newgidmap")
    if sub_u and sub_g and tools:
        return IdMapping(uid, gid, sub_u, sub_g)
    return IdMapping(uid, gid, None, None)


def write_maps(pid: int, mapping: IdMapping) -> None:
    """Map ids for a process that has just unshared its user namespace."""
    if mapping.full:
        for tool, own, sub in (
            ("newuidmap", mapping.uid, mapping.subuid),
            ("newgidmap", mapping.gid, mapping.subgid),
        ):
            cmd = [tool, str(pid), "0", str(own), "1", "1", str(sub.start), str(sub.count)]
            res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if res.returncode != 0:
                detail = res.stderr.strip().splitlines()
                raise OSError(f"{tool} failed: {detail[-1] if detail else res.returncode}")
        return
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"0 {mapping.uid} 1\n")
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny\n")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"0 {mapping.gid} 1\n")
