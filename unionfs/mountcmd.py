"""`pyunion mount|umount|refresh` and the mount-helper forms; the daemon's ordered lifecycle."""

import gc
import logging
import logging.handlers
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from unionfs.branches import RO_WH, RW, BranchSpec, check_branches, parse_branches
from unionfs.errors import UsageError
from unionfs.whiteout import CONTROL_XATTR

log = logging.getLogger("unionfs")

# kernel mount flags libfuse passes through
KERNEL_FLAGS = {"suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync", "atime",
                "noatime", "dirsync"}
# options of mount(8)/fstab that mean nothing to the filesystem itself
GENERIC = {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail",
           "_netdev", "relatime", "norelatime", "strictatime", "lazytime", "nodiratime", "diratime",
           "loud", "silent"}


@dataclass
class MountOptions:
    readonly: bool = False
    allow_other: bool = False
    default_permissions: bool = True
    entry_timeout: float = 86400.0
    attr_timeout: float = 86400.0
    negative_timeout: float = 86400.0
    writeback: bool = False
    volatile: bool = False
    # metadata-only copy-ups (see unionfs.metacopy): "fill" (filled in the background, see
    # unionfs.filler), "on" (kept until written), "off" (whole copies at once)
    metacopy: str = "fill"
    extras: bool = True  # unionfs.session (off: pyfuse3's own loop and handlers)
    poll_us: float = 200.0  # the session's longest wait by polling (see Session._poll)
    opens: bool = False  # have the kernel send OPEN/OPENDIR, as old kernels do (diagnosis)
    plus_auto: bool = False  # readdirplus=auto: attributes with listings only when they are used
    low_latency: bool = False  # keep idle CPUs polling while requests come close together
    uring: bool = False  # take requests through FUSE over io_uring where the kernel offers it
    # poll on the client's CPU at idle priority (see unionfs.colocate); None: where allowed
    colocate: bool | None = None
    logfile: str | None = None
    fsname: str = "pyunion"
    workdir: str | None = None
    kernel_flags: list[str] = field(default_factory=list)
    # overlay-style branch options
    lowerdir: str | None = None
    upperdir: str | None = None
    unknown: list[str] = field(default_factory=list)


MAX_TIMEOUT = 2**32 - 1  # seconds: what the kernel's entry and attribute timeouts hold
MAX_POLL_US = 100_000


def _number(key: str, value: str, unit: str, maximum: float) -> float:
    """An option's value: a number of UNIT from 0 to MAXIMUM, else a clear UsageError."""
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UsageError(f"option {key}: not a number of {unit}: {value!r}")
    if v < 0:
        raise UsageError(f"option {key}: must not be negative")
    if v > maximum:
        raise UsageError(f"option {key}: must be at most {maximum:g} {unit}")
    return v


def parse_options(items: list[str]) -> MountOptions:
    """Parse `-o` option strings (each a comma-separated list)."""
    o = MountOptions()
    for item in items:
        for opt in filter(None, item.split(",")):
            key, sep, value = opt.partition("=")
            if key in ("ro", "rw") and not sep:
                o.readonly = key == "ro"
            elif key == "allow_other" and not sep:
                o.allow_other = True
            elif key == "default_permissions" and not sep:
                o.default_permissions = True
            elif key == "nodefault_permissions" and not sep:
                o.default_permissions = False
            elif key == "timeout" and sep:
                o.entry_timeout = o.attr_timeout = o.negative_timeout = \
                    _number(key, value, "seconds", MAX_TIMEOUT)
            elif key in ("entry_timeout", "attr_timeout", "negative_timeout") and sep:
                setattr(o, key, _number(key, value, "seconds", MAX_TIMEOUT))
            elif key in ("writeback", "nowriteback") and not sep:
                o.writeback = key == "writeback"
            elif key == "volatile" and not sep:
                o.volatile = True
            elif key in ("metacopy", "nometacopy") and not sep:
                o.metacopy = "on" if key == "metacopy" else "off"
            elif key == "metacopy" and sep:
                if value not in ("fill", "on", "off"):
                    raise UsageError(f"option metacopy: 'fill', 'on' or 'off', not {value!r}")
                o.metacopy = value
            elif key == "noextras" and not sep:
                o.extras = False
            elif key == "opens" and not sep:
                o.opens = True
            elif key == "lowlatency" and not sep:
                o.low_latency = True
            elif key == "uring" and not sep:
                o.uring = True
            elif key in ("colocate", "nocolocate") and not sep:
                o.colocate = key == "colocate"
            elif key == "readdirplus" and sep:
                if value not in ("always", "auto"):
                    raise UsageError(f"option readdirplus: 'always' or 'auto', not {value!r}")
                o.plus_auto = value == "auto"
            elif key == "poll" and sep:
                o.poll_us = _number(key, value, "microseconds", MAX_POLL_US)
            elif key in ("logfile", "fsname", "workdir", "lowerdir", "upperdir") and sep:
                if not value:
                    raise UsageError(f"option {key} needs a value")
                setattr(o, key, value)
            elif key in KERNEL_FLAGS and not sep:
                o.kernel_flags.append(key)
            elif key in GENERIC or key.startswith(("x-", "comment=")):
                pass
            else:
                o.unknown.append(opt)
    if o.plus_auto and not o.extras:
        raise UsageError("option readdirplus=auto needs pyunion's own session: drop noextras")
    if o.low_latency and not o.extras:
        raise UsageError("option lowlatency needs pyunion's own session: drop noextras")
    if o.uring and not o.extras:
        raise UsageError("option uring needs pyunion's own session: drop noextras")
    if o.uring and o.low_latency:
        raise UsageError("options uring and lowlatency: choose one")
    if o.low_latency and not o.poll_us:
        raise UsageError("option lowlatency holds its request while the daemon polls: drop poll=0")
    if o.colocate and not o.extras:
        raise UsageError("option colocate needs pyunion's own session: drop noextras")
    if o.colocate and not o.poll_us:
        raise UsageError("option colocate moves the daemon's polling: drop poll=0")
    return o


def _take_args(argv: list[str]) -> tuple[list[str], list[str], set[str]]:
    """Split argv into (-o values, positionals, flags among -f/-d)."""
    opts, pos, flags = [], [], set()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o":
            if i + 1 >= len(argv):
                raise UsageError("-o needs an option list")
            opts.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts.append(a[2:])
        elif a in ("-f", "-d", "-n", "-s", "-v"):  # -n -s -v come from mount(8) helpers
            flags.add(a)
        elif a == "--":
            pos.extend(argv[i + 1:])
            break
        elif a.startswith("-") and len(a) > 1:
            raise UsageError(f"unknown flag {a}")
        else:
            pos.append(a)
        i += 1
    return opts, pos, flags


HELP = {
    "mount": """\
usage: pyunion mount [-o OPT[,OPT...]] [-f] [-d] BRANCHES MOUNTPOINT
  BRANCHES     DIR[=MODE]:DIR[=MODE]:..., top first; MODE is rw (the first branch's
               default), ro+wh (the others' default: whiteouts honoured) or ro
  -f           stay in the foreground (log to stderr)
  -d           log every request
  -o OPTIONS   ro, allow_other, nodefault_permissions, timeout=SEC, entry_timeout=SEC,
               attr_timeout=SEC, negative_timeout=SEC, writeback, volatile,
               metacopy=fill|on|off (metacopy, nometacopy), poll=USEC, lowlatency, uring,
               colocate, nocolocate,
               readdirplus=always|auto, opens, noextras, logfile=PATH, fsname=NAME,
               workdir=DIR, and the kernel flags nodev, nosuid, noexec, noatime, sync, ...
               (README.md says what each one does)
""",
    "umount": "usage: pyunion umount MOUNTPOINT\n",
    "refresh": "usage: pyunion refresh MOUNTPOINT   (drop what the mount cached of its branches)\n",
}


def main(command: str, argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(HELP[command])
        return 0
    if command == "mount":
        return mount_main(argv)
    if command == "umount":
        return umount_main(argv)
    return refresh_main(argv)


def mount_main(argv: list[str]) -> int:
    opts, pos, flags = _take_args(argv)
    if len(pos) != 2:
        raise UsageError("usage: pyunion mount [-o OPT[,OPT...]] [-f] [-d] BRANCHES MOUNTPOINT")
    o = parse_options(opts)
    if o.unknown:
        raise UsageError(f"unknown mount option {o.unknown[0]!r}")
    if o.lowerdir or o.upperdir:
        raise UsageError("lowerdir/upperdir are for the overlay form: pyunion -o lowerdir=... MOUNTPOINT")
    return mount(parse_branches(pos[0]), pos[1], o, "-f" in flags, "-d" in flags)


def helper_main(argv: list[str]) -> int:
    """`pyunion [SOURCE] MOUNTPOINT -o ...`: how mount.fuse3 and containers-storage call us."""
    opts, pos, flags = _take_args(argv)
    if len(pos) not in (1, 2):
        raise UsageError(f"unknown command {argv[0]!r} (see pyunion --help)")
    source, mountpoint = (None, pos[0]) if len(pos) == 1 else pos
    o = parse_options(opts)
    if o.unknown:
        print(f"pyunion: ignoring unknown option(s): {','.join(o.unknown)}", file=sys.stderr)
    if o.lowerdir:
        specs = overlay_branches(o.lowerdir, o.upperdir, o.workdir)
        if o.upperdir is None:
            o.readonly = True
    elif o.upperdir:
        raise UsageError("upperdir needs lowerdir")
    elif source and source != "none":
        specs = parse_branches(source)
    else:
        raise UsageError("no branches: give lowerdir=... (and upperdir=,workdir=) or BRANCHES as the source")
    return mount(specs, mountpoint, o, "-f" in flags, "-d" in flags)


def overlay_branches(lowerdir: str, upperdir: str | None, workdir: str | None) -> list[BranchSpec]:
    """Branches for overlay's lowerdir=L1:L2,upperdir=U (L1 is the upper-most lower layer)."""
    lowers = [p for p in lowerdir.split(":")]
    if any(not p for p in lowers):
        raise UsageError(f"empty layer in lowerdir={lowerdir}")
    specs = [BranchSpec(p, RO_WH) for p in lowers]
    if upperdir is not None:
        if workdir is None:
            raise UsageError("upperdir needs workdir")
        specs.insert(0, BranchSpec(upperdir, RW))
    return specs


def _check_fuse_device() -> None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot use /dev/fuse: {e.strerror}") from None
    os.close(fd)


def _check_workdir(specs: list[BranchSpec], workdir: str | None) -> str | None:
    if workdir is None:
        return None
    try:
        wst = os.stat(workdir)
    except OSError as e:
        raise UsageError(f"workdir {workdir}: {e.strerror}") from None
    if not os.path.isdir(workdir):
        raise UsageError(f"workdir {workdir}: not a directory")
    top = next((s for s in specs if s.writable), None)
    if top is None:
        return None
    if os.stat(top.path).st_dev != wst.st_dev:
        raise UsageError(f"workdir {workdir} is not on the same filesystem as {top.path}")
    real = os.path.realpath(workdir)
    for s in specs:
        if real == s.path or real.startswith(s.path.rstrip("/") + "/"):
            raise UsageError(f"workdir {workdir} is inside the branch {s.path}")
    return real


def mount(specs: list[BranchSpec], mountpoint: str, o: MountOptions, foreground: bool, debug: bool) -> int:
    specs = check_branches(specs, mountpoint)
    workdir = _check_workdir(specs, o.workdir)
    _check_fuse_device()
    if o.low_latency:
        from unionfs.syscalls import CPU_LATENCY_QOS, CpuLatencyRequest

        try:
            CpuLatencyRequest.check()
        except OSError as e:
            raise UsageError(f"option lowlatency: cannot use {CPU_LATENCY_QOS}: "
                             f"{e.strerror} (it needs root)") from None
    if o.colocate is None and o.low_latency:
        o.colocate = False  # (idle CPUs poll then: a client and the daemon do better apart)
    if o.colocate is not False:
        from unionfs import colocate

        allowed = o.extras and o.poll_us > 0 and colocate.possible()
        if o.colocate and not allowed:
            raise UsageError("option colocate: this process may not make a thread SCHED_IDLE and "
                             "turn it back (that needs CAP_SYS_NICE or an RLIMIT_NICE of 20)")
        o.colocate = allowed
    if foreground:
        return serve(specs, mountpoint, o, workdir, debug, ready=None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        code = 1
        ready = Readiness(w)
        try:
            code = serve(specs, mountpoint, o, workdir, debug, ready=ready)
        except BaseException as e:  # before ready: tell the parent; after: already logged
            ready.report(f"{e}")
        finally:
            os._exit(code)
    os.close(w)
    msg = b""
    while chunk := os.read(r, 4096):
        msg += chunk
    os.close(r)
    if msg == b"OK":
        return 0
    os.waitpid(pid, 0)
    raise UsageError(msg.decode(errors="replace").strip() or "the daemon failed to start")


def _tune_gc() -> None:
    """Spare the daemon most of the cycle collector's rounds. What exists once the mount is
    set up (modules, the union) lives as long as the daemon: frozen, no collection scans it
    again. And requests make many short-lived objects, which reference counting frees: a
    collection every 10,000 allocations instead of 700 is enough for the rest. (Stat of the
    whole benchmark tree: a tenth less time; the 10,000-entry listing: a twentieth.)"""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


class Readiness:
    """The pipe on which the daemon tells the waiting `pyunion mount` how its start went:
    "OK", or the error. Only the first report is sent (the pipe is closed after it)."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def report(self, text: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, text.encode())
        except OSError:
            pass
        os.close(fd)


def _setup_logging(o: MountOptions, debug: bool, foreground: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s pyunion[%(process)d] %(levelname)s %(name)s: %(message)s")
    if o.logfile:
        handler: logging.Handler = logging.FileHandler(o.logfile)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        fmt = logging.Formatter("pyunion[%(process)d]: %(levelname)s %(name)s: %(message)s")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(fmt)
    root.handlers[:] = [handler]


def serve(specs, mountpoint: str, o: MountOptions, workdir: str | None, debug: bool,
          ready: Readiness | None) -> int:
    """Mount and serve until unmounted or signalled; READY is told "OK" once the mount is
    live and the start-up probe is done with it (see _report_ready_when_probed)."""
    import pyfuse3
    import trio

    from unionfs.fs import UnionOperations
    from unionfs.union import Union

    _setup_logging(o, debug, ready is None)
    # a stop signal that comes before the loop listens for it is kept for the loop, instead of
    # killing the daemon with its mount still there
    early_signals: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda n, _: early_signals.append(n))
    os.umask(0)  # modes come from the kernel with the caller's umask applied
    _raise_fd_limit()
    try:
        union = Union(specs, workdir=workdir, readonly=o.readonly, sync=not o.volatile,
                      metacopy=o.metacopy != "off")
    except OSError as e:
        where = os.fsdecode(e.filename) if e.filename else "a branch"
        raise UsageError(f"branch {where}: {e.strerror}") from None
    # (with metacopy=off, copies left by an earlier mount are filled too)
    ops = UnionOperations(union, o.entry_timeout, o.attr_timeout, o.negative_timeout, o.writeback,
                          debug, fill=o.metacopy != "on")
    fuse_options = {f"fsname={o.fsname}", "subtype=pyunion"} | set(o.kernel_flags)
    if o.default_permissions:
        fuse_options.add("default_permissions")
    if o.allow_other:
        fuse_options.add("allow_other")
    if union.readonly:
        fuse_options.add("ro")
    if not o.extras:
        log.info("running on pyfuse3's own request loop and handlers (-o noextras)")
    real_mountpoint = os.path.realpath(mountpoint)  # (resolved now: later it is our own mount)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options)
    except RuntimeError:
        union.close()
        raise UsageError(f"cannot mount on {mountpoint} (see the message above)") from None
    log.info("mounted %s on %s", ":".join(f"{s.path}={s.mode}" for s in specs), os.path.abspath(mountpoint))
    if ready is not None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    session = None
    if o.extras:
        from unionfs.session import Session, find_device_fd

        fd = find_device_fd()
        if fd is not None:
            session = Session(ops, fd, o.writeback, o.poll_us / 1e6, o.opens, o.plus_auto,
                              o.low_latency, o.uring, bool(o.colocate))
        else:
            log.info("no single /dev/fuse fd found: running on pyfuse3's request loop")

    probe = _start_probe(real_mountpoint) if session and not o.opens else None

    async def run():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, session.stop if session else pyfuse3.terminate,
                               early_signals)
            nursery.start_soon(_raise_readahead_when_live, ops, real_mountpoint)
            if ready is not None:
                nursery.start_soon(_report_ready_when_probed, ready, probe)
            if ops.filler is not None:
                nursery.start_soon(ops.filler.run)
            await (session.serve() if session else pyfuse3.main())
            nursery.cancel_scope.cancel()
        if ops.filler is not None:  # (unmounted or stopped: the branch is made whole before
            await ops.filler.drain()  # the daemon exits, which `pyunion umount` waits for)

    _tune_gc()
    clean = False
    try:
        trio.run(run)
        clean = True
    except BaseException:
        log.exception("the FUSE main loop failed")
        raise
    finally:
        if ready is not None:
            ready.report("OK")  # (it was mounted, whatever ended the loop before the report)
        if probe is not None and probe.poll() is None:
            # it holds a directory of the mount open, which would keep the mount busy; its
            # requests are all answered at once or still queued, so it dies when killed
            probe.kill()
            try:
                probe.wait(timeout=2)
            except subprocess.TimeoutExpired:
                log.warning("the probe of the mount (pid %d) did not exit", probe.pid)
        pyfuse3.close(unmount=True)
        union.table.forget_all()
        union.close()
        log.info("unmounted %s%s", mountpoint, "" if clean else " after an error")
    return 0


READAHEAD_KB = 1024
PROBE_WAIT = 1.0  # seconds `pyunion mount` may wait for the start-up probe before it returns


def _raise_fd_limit() -> None:
    """Every open file of the mount's users is an fd of the daemon: allow as many as we may."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.debug("cannot raise the fd limit: %s", e)


async def _report_ready_when_probed(ready: Readiness, probe: subprocess.Popen | None) -> None:
    """Tell the waiting `pyunion mount` that the mount is ready once the start-up probe is
    done with it: the probe holds a directory of the mount open for a moment, and an
    unmount right after `pyunion mount` returned found the mount busy."""
    import trio

    if probe is not None:
        with trio.move_on_after(PROBE_WAIT):
            while probe.poll() is None:
                await trio.sleep(0.001)
    ready.report("OK")


async def _raise_readahead_when_live(ops, mountpoint: str) -> None:
    await ops.initialized.wait()  # (answering INIT sets the read-ahead: raise it after that)
    _raise_readahead(mountpoint)


def _raise_readahead(mountpoint: str) -> None:
    """Let sequential reads arrive as 1 MiB requests instead of the kernel's default 128 KiB.

    The mount's device number comes from mountinfo: nothing here sends a request to the mount
    (see unionfs.probe for why the daemon never does).
    """
    entry = _mount_entry(mountpoint)
    if entry is None:
        log.debug("cannot raise read-ahead: %s is not in mountinfo", mountpoint)
        return
    device = entry[0]
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:  # not root, or no sysfs: keep the default
        log.debug("cannot raise read-ahead: %s", e)


def _start_probe(mountpoint: str) -> subprocess.Popen | None:
    """Run unionfs.probe on the mount in a child process (never in one of our threads); as a
    plain script, without site packages, it starts in a few milliseconds."""
    from unionfs import probe

    try:
        return subprocess.Popen([sys.executable, "-I", "-S", probe.__file__, mountpoint],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True)
    except OSError as e:
        log.debug("cannot start the probe of the mount: %s", e)
        return None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _stop_on_signal(stop, early: list[int]) -> None:
    """Call STOP at the first stop signal, including one in EARLY (come before this listened)."""
    import trio

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if not early:
            async for signum in signals:
                early.append(signum)
                break
        log.info("signal %d: unmounting", early[0])
        stop()


def _mount_entry(real_mountpoint: str) -> tuple[str, str] | None:
    """(device "MAJOR:MINOR", filesystem type) of the topmost mount on REAL_MOUNTPOINT (a
    resolved path), from /proc/self/mountinfo; None if nothing is mounted there."""
    real = os.fsencode(real_mountpoint)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if point == real:
                found = fields[2].decode(), fields[fields.index(b"-") + 1].decode()
    return found


def _unentered_path(mountpoint: str) -> str:
    """MOUNTPOINT as mountinfo names it, with only its parent resolved: resolving the last
    name would stat the mount's root, which waits for ever on a hung daemon."""
    head, tail = os.path.split(os.path.abspath(mountpoint))
    return os.path.join(os.path.realpath(head), tail)


def _daemon_pid(device: str) -> int | None:
    """The process serving FUSE mount DEVICE ("0:N"): the one holding /dev/fuse connection N
    (named in the fd's fdinfo since Linux 6.x). None if not found (or an older kernel)."""
    connection = device.partition(":")[2].encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/fuse":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                    info = f.read()
            except OSError:
                continue
            if re.search(rb"^fuse_connection:\s*" + connection + rb"$", info, re.M):
                return int(pid)
    return None


def umount_main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UsageError("usage: pyunion umount MOUNTPOINT")
    mountpoint = argv[0]
    entry = _mount_entry(_unentered_path(mountpoint)) or _mount_entry(os.path.realpath(mountpoint))
    if entry is None:
        if not os.path.lexists(mountpoint):
            raise UsageError(f"{mountpoint}: no such directory")
        raise UsageError(f"{mountpoint} is not mounted")
    device, fstype = entry
    if fstype != "fuse.pyunion":
        raise UsageError(f"{mountpoint} is not a pyunion mount (it is {fstype})")
    # found without a request to the mount where the kernel tells: a hung daemon answers none
    pid = _daemon_pid(device)
    if pid is None:
        try:
            pid = int(os.getxattr(mountpoint, "pyunion.pid"))
        except (OSError, ValueError):
            pid = None
    tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
    res = subprocess.run([*tool, mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        raise UsageError(lines[-1] if lines else f"{tool[0]} failed")
    if pid is not None:
        _wait_for_daemon(pid)
    return 0


def _wait_for_daemon(pid: int, notice_after: float = 5) -> None:
    """Wait for the daemon to finish its clean-up and exit (not if it is stopped): it may
    have metadata-only copies to fill (see unionfs.filler), however long that takes."""
    notice = time.monotonic() + notice_after
    while True:
        if notice is not None and time.monotonic() > notice:
            print(f"pyunion: waiting for the daemon (pid {pid}) to finish filling copies in "
                  "the writable branch (Ctrl-C leaves it to finish alone)", file=sys.stderr)
            notice = None
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(") ", 1)[1][0]
        except OSError:
            return
        if state == "Z":
            return
        if state in "tT":
            print(f"pyunion: the daemon (pid {pid}) is stopped; it exits once continued",
                  file=sys.stderr)
            return
        time.sleep(0.02)


def refresh_main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UsageError("usage: pyunion refresh MOUNTPOINT")
    try:
        os.setxattr(argv[0], CONTROL_XATTR, b"1")
    except OSError as e:
        raise UsageError(f"{argv[0]}: cannot refresh: {e.strerror}") from None
    return 0
