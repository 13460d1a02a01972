"""The systems under test: how each one mounts the layers on a fresh writable layer and unmounts."""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.layers import Layers

if TYPE_CHECKING:
    from bench.scratch import Scratch

MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0  # seconds a FUSE daemon gets to exit after its unmount


class MountError(Exception):
    """Mounting or unmounting a system failed; the message is one line."""


class SlowExit(MountError):
    """The daemon was unmounted cleanly but took longer than EXIT_TIMEOUT to exit (then killed)."""


@dataclass
class Mounted:
    """A live instance of a system: the merged tree at `path`, and its daemon (FUSE systems)."""

    path: Path
    pid: int | None = None
    cleanups: list = field(default_factory=list)
    log: Path | None = None  # the daemon's stdout and stderr
    # seconds from the unmount to the daemon's exit: work it left for after the workload
    exit_seconds: float | None = None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the daemon (all its threads) has used so far."""
        if self.pid is None:
            return None
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_memory_kib(self) -> int | None:
        """The daemon's peak resident set (VmHWM) so far, in KiB."""
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None


def _unescape_mountinfo(text: str) -> str:
    return text.encode().decode("unicode_escape") if "\\" in text else text


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in _mount_points()


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise MountError(f"{what}: {last}")


def detach_mounts(path: Path, including_top: bool = True) -> None:
    """Lazily unmount everything mounted at or below PATH (left by an interrupted run)."""
    top = os.path.realpath(path)
    for point in sorted((p for p in _mount_points() if p.startswith(top + "/")
                         or (including_top and p == top)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, stderr=subprocess.DEVNULL)


def remove_tree(path: Path) -> None:
    """Remove PATH, first detaching anything mounted in it: never remove files through a mount."""
    if not path.exists():
        return
    detach_mounts(path)
    if not is_mounted(path):
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def pyunion_command() -> list[str]:
    """The pyunion program of this checkout (its virtualenv), else the one on PATH."""
    local = Path(sys.executable).parent / "pyunion"
    if local.exists():
        return [str(local)]
    found = shutil.which("pyunion")
    return [found] if found else [sys.executable, "-m", "unionfs"]


class System:
    """One union implementation; subclasses say how to mount it."""

    name = ""
    label = ""
    programs: tuple[str, ...] = ()  # executables it needs
    apt_packages: tuple[str, ...] = ()  # where they come from
    workloads: frozenset[str] | None = None  # the workloads it runs (None: every one)

    def missing_programs(self) -> list[str]:
        return [p for p in self.programs if not shutil.which(p)]

    def mount(self, layers: Layers, scratch: "Scratch", private: tuple[str, ...], writes: bool) -> Mounted:
        raise NotImplementedError

    @staticmethod
    def unmount(mounted: Mounted) -> None:
        errors = []
        for cleanup in reversed(mounted.cleanups):
            try:
                cleanup()
            except (OSError, MountError, subprocess.SubprocessError) as e:
                errors.append(e)
        mounted.cleanups.clear()
        if errors:
            first = errors[0]
            raise first if isinstance(first, MountError) else MountError(str(first))


class Native(System):
    """A plain merged copy; a hard-linked farm of it when the workload writes."""

    name = "native"
    label = "native"

    def mount(self, layers, scratch, private, writes):
        if not writes:
            return Mounted(layers.native)
        farm = scratch.farm
        remove_tree(farm)
        _run(["cp", "-al", str(layers.native), str(farm)], "making the native farm")
        mounted = Mounted(farm, cleanups=[lambda: remove_tree(farm)])
        for rel in private:  # what the workload changes in place must not be shared links
            source, target = layers.native / rel, farm / rel
            if not os.path.lexists(source):
                continue
            _run(["cp", "-a", str(source), f"{target}.copy"], "copying a private file")
            if target.is_dir() and not target.is_symlink():
                remove_tree(target)
            os.replace(f"{target}.copy", target)
        return mounted


class _Layered(System):
    """A system that stacks an empty writable directory over app and base."""

    def _dirs(self, scratch: "Scratch") -> tuple[Path, Path, Path]:
        top = scratch.fresh(self.name)
        upper, work, mnt = top / "upper", top / "work", top / "mnt"
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        return top, upper, mnt


class KernelOverlay(_Layered):
    name = "overlayfs"
    label = "kernel overlayfs"

    def mount(self, layers, scratch, private, writes):
        top, upper, mnt = self._dirs(scratch)
        options = f"lowerdir={layers.app}:{layers.base},upperdir={upper},workdir={top / 'work'}"
        _run(["mount", "-t", "overlay", "overlay", "-o", options, str(mnt)], "mount -t overlay")
        return Mounted(
            mnt,
            cleanups=[lambda: scratch.retire(top), lambda: _run(["umount", str(mnt)], "umount")],
        )


class _Fuse(_Layered):
    """A FUSE daemon run in the foreground by us, so its pid and memory are known."""

    def argv(self, layers: Layers, top: Path, upper: Path, mnt: Path) -> list[str]:
        raise NotImplementedError

    def unmount_argv(self, mnt: Path) -> list[str]:
        return ["umount", str(mnt)]

    def mount(self, layers, scratch, private, writes):
        top, upper, mnt = self._dirs(scratch)
        log_path = scratch.out / "logs" / f"{self.name}.log"
        log_path.parent.mkdir(exist_ok=True)
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            self.argv(layers, top, upper, mnt),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        mounted = Mounted(mnt, pid=proc.pid, cleanups=[lambda: scratch.retire(top)], log=log_path)
        mounted.cleanups.append(lambda: self._stop(proc, mnt, mounted))
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                status = "timed out" if proc.returncode is None else _exit_status(proc.returncode)
                message = f"{self.label} did not mount ({status}): {_last_line(log_path)}"
                try:
                    self.unmount(mounted)
                except MountError:
                    pass  # the failed mount is the news
                if log_path.exists():  # keep the daemon's log for the post-mortem
                    kept = log_path.with_name(f"failed-mount-{self.name}-{time.time_ns()}.log")
                    shutil.copyfile(log_path, kept)
                    message += f" (daemon log: {kept})"
                raise MountError(message)
            time.sleep(0.005)
        return mounted

    def _stop(self, proc: subprocess.Popen, mnt: Path, mounted: Mounted) -> None:
        problem, slow = None, False
        start = time.perf_counter()
        if proc.poll() is not None:
            problem = f"{self.label} daemon died during the run ({_exit_status(proc.returncode)})"
        if is_mounted(mnt):
            done = subprocess.run(self.unmount_argv(mnt), capture_output=True, text=True)
            if done.returncode != 0:
                problem = f"{self.label} unmount failed: {(done.stderr.strip() or '?').splitlines()[-1]}"
        try:
            proc.wait(timeout=EXIT_TIMEOUT)
            mounted.exit_seconds = time.perf_counter() - start
        except subprocess.TimeoutExpired:
            slow = problem is None
            problem = problem or f"{self.label} daemon still running {EXIT_TIMEOUT:.0f} s after unmount"
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        if problem:
            raise (SlowExit if slow else MountError)(problem)


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1] if lines else "no message"


class FuseOverlayfs(_Fuse):
    name = "fuse-overlayfs"
    label = "fuse-overlayfs"
    programs = ("fuse-overlayfs",)
    apt_packages = ("fuse-overlayfs",)

    def argv(self, layers, top, upper, mnt):
        options = f"lowerdir={layers.app}:{layers.base},upperdir={upper},workdir={top / 'work'}"
        return ["fuse-overlayfs", "-f", "-o", options, str(mnt)]


class UnionfsFuse(_Fuse):
    name = "unionfs-fuse"
    label = "unionfs-fuse"
    programs = ("unionfs-fuse",)
    apt_packages = ("unionfs-fuse",)

    def argv(self, layers, top, upper, mnt):
        branches = f"{upper}=RW:{layers.app}=RO:{layers.base}=RO"
        return ["unionfs-fuse", "-f", "-o", "cow", branches, str(mnt)]


class Pyunion(_Fuse):
    name = "pyunion"
    label = "pyunion"
    mount_args: tuple[str, ...] = ()  # what a variant adds to `pyunion mount -f`

    def argv(self, layers, top, upper, mnt):
        branches = f"{upper}=rw:{layers.app}=ro+wh:{layers.base}=ro+wh"
        return [*pyunion_command(), "mount", "-f", *self.mount_args, branches, str(mnt)]

    def unmount_argv(self, mnt):
        return [*pyunion_command(), "umount", str(mnt)]


class PyunionLowLatency(Pyunion):
    """pyunion -o lowlatency: idle CPUs kept from halting while requests flow (root only).
    Not in the default run: it changes the machine's power management, which no peer does."""

    name = "pyunion-lowlatency"
    label = "pyunion -o lowlatency"
    mount_args = ("-o", "lowlatency")


class PyunionUring(Pyunion):
    """pyunion -o uring: requests through FUSE over io_uring, a queue per CPU (the run turns
    the fuse module's enable_uring on, which only daemons that ask for it use). Not in the
    default run: it needs that setting, which is off unless root turns it on."""

    name = "pyunion-uring"
    label = "pyunion -o uring"
    mount_args = ("-o", "uring")


class PyunionNoColocate(Pyunion):
    """pyunion -o nocolocate: the daemon polls on a CPU of its own, as before colocation
    (unionfs/colocate.py); shows what that buys. Not in the default run."""

    name = "pyunion-nocolocate"
    label = "pyunion -o nocolocate"
    mount_args = ("-o", "nocolocate")


class PyunionMetacopy(Pyunion):
    """pyunion -o metacopy, as `pyunion run` mounts containers' layers: metadata changes
    copy no data. Run only where that makes a difference."""

    name = "pyunion-metacopy"
    label = "pyunion -o metacopy"
    mount_args = ("-o", "metacopy")
    workloads = frozenset({"chown_r"})


SYSTEMS = {s.name: s for s in (Native(), KernelOverlay(), FuseOverlayfs(), UnionfsFuse(), Pyunion(),
                               PyunionMetacopy(), PyunionLowLatency(), PyunionUring(),
                               PyunionNoColocate())}
DEFAULT_SYSTEMS = [n for n in SYSTEMS
                   if n not in (PyunionLowLatency.name, PyunionUring.name, PyunionNoColocate.name)]
REFERENCE = "fuse-overlayfs"
