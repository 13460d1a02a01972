"""Dropping privileges for the container command: capabilities, user and group, no_new_privs."""

import errno
import os

from runner import libc

# The default set of container runtimes (Docker/OCI): everything else is dropped.
DEFAULT_CAPS = (
    0,  # CHOWN
    1,  # DAC_OVERRIDE
    3,  # FOWNER
    4,  # FSETID
    5,  # KILL
    6,  # SETGID
    7,  # SETUID
    8,  # SETPCAP
    10,  # NET_BIND_SERVICE
    13,  # NET_RAW
    18,  # SYS_CHROOT
    27,  # MKNOD
    29,  # AUDIT_WRITE
    31,  # SETFCAP
)
DEFAULT_MASK = sum(1 << c for c in DEFAULT_CAPS)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_privileges(uid: int, gid: int, last: int) -> None:
    """Reduce to the default capability set, become uid:gid, and forbid gaining privileges.

    `last` is /proc/sys/kernel/cap_last_cap, read before entering the container root.
    """
    for cap in range(last + 1):
        if cap not in DEFAULT_CAPS:
            try:
                libc.prctl(libc.PR_CAPBSET_DROP, cap)
            except OSError:
                pass
    try:
        libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    try:
        os.setgroups([gid])
    except OSError:
        if gid != os.getgid():  # a single-id user namespace denies setgroups
            raise
    try:
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        reason = "not mapped in the user namespace" if e.errno == errno.EINVAL else e.strerror
        raise OSError(e.errno, f"cannot become uid {uid} gid {gid}: {reason}") from None
    if uid == 0:
        libc.capset(DEFAULT_MASK, DEFAULT_MASK, 0)
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
