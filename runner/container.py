"""One container run: the process tree, namespaces, the union mount and teardown.

Processes (host view):
  runner      `pyunion run`: cgroup, id maps, signal forwarding, terminal relay, cleanup
  keeper      own user (rootless) + mount namespace; serves the union (daemon child), unmounts
  spawner     joins the cgroup, unshares mount/pid/uts/ipc/cgroup(/net) namespaces
  init        pid 1: mounts, pivot_root, starts the command, reaps, forwards signals
  command     pid 2 in the container
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from runner import libc, rootfs
from runner.cgroups import Cgroup, Hierarchy, Limits, hierarchies
from runner.errors import RunError
from runner.idmap import IdMapping, plan_mapping, write_maps
from runner.init import RUNNER_FORWARDED, Command, hold_signals, run_init
from runner.initlayer import MOUNTPOINTS, resolve_in_layers, write_init_layer
from runner.privileges import last_cap
from runner.rootfs import Volume
from runner.terminal import relay
from unionfs.branches import RO_WH, RW, BranchSpec, format_branches
from unionfs.errors import UsageError

EXIT_RUNNER = 125
MOUNT_TIMEOUT = 60.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class RunSpec:
    """Everything a run needs, decided before any process is started."""

    layers: list[BranchSpec]  # read-only, top first
    argv: list[str]
    rw_dir: str | None = None  # kept writable layer; None: a temporary one
    # metadata-only copy-ups in the writable layer (see unionfs.metacopy): for the layers
    # the runner owns, not for a --rw DIR, which its user may read or copy by itself
    metacopy: bool = True
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None  # "UID[:GID]" or a name from the container's /etc/passwd
    hostname: str = ""
    volumes: list[Volume] = field(default_factory=list)
    net: str = "host"
    limits: Limits = field(default_factory=Limits)
    tty: bool = False
    use_chroot: bool = False


def new_id() -> str:
    return secrets.token_hex(6)


def _say(message: str) -> None:
    try:
        os.write(2, f"pyunion: {message}\n".encode(errors="replace"))
    except OSError:
        pass


def _device_of(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:  # a mount whose daemon has gone away
        return None


def _end_with_parent() -> None:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGTERM)


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def _lookup_user(user: str | None) -> tuple[int, int, str]:
    """Inside the container root: (uid, gid, home) for `-u` (numbers or passwd names)."""
    entries = {}
    try:
        with open("/etc/passwd") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 7 and fields[2].isdigit() and fields[3].isdigit():
                    entries[fields[0]] = (int(fields[2]), int(fields[3]), fields[5])
    except OSError:
        pass
    groups = {}
    try:
        with open("/etc/group") as f:
            for line in f:
                fields = line.split(":")
                if len(fields) >= 3 and fields[2].isdigit():
                    groups[fields[0]] = int(fields[2])
    except OSError:
        pass
    name, _, group = (user or "0").partition(":")
    if name.isdigit():
        uid = int(name)
        match = [e for e in entries.values() if e[0] == uid]
        gid, home = (match[0][1], match[0][2]) if match else (0, "/")
    elif name in entries:
        uid, gid, home = entries[name]
    else:
        raise RunError(f"user {name!r} not found in the container's /etc/passwd")
    if group:
        if group.isdigit():
            gid = int(group)
        elif group in groups:
            gid = groups[group]
        else:
            raise RunError(f"group {group!r} not found in the container's /etc/group")
    return uid, gid, home or "/"


class Runner:
    """Runs one container and cleans up after it."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.id = new_id()
        self.rootless = os.geteuid() != 0
        self.mapping: IdMapping | None = None
        if self.rootless:
            self.mapping = plan_mapping(os.getuid(), os.getgid())
        self.workspace = ""
        self.cgroup: Cgroup | None = None
        self.init_pid = 0
        self.keeper_pid = 0
        self.aborted_by = 0  # a signal that arrived before the container was started

    # --- runner process -------------------------------------------------------------

    def run(self) -> int:
        spec = self.spec
        if not spec.hostname:
            spec.hostname = self.id
        base = os.environ.get("XDG_RUNTIME_DIR") if self.rootless else None
        if base and not os.access(base, os.W_OK):
            base = None
        for sig in RUNNER_FORWARDED:  # from here on a signal never leaves anything behind
            signal.signal(sig, self._forward)
        try:
            self.workspace = tempfile.mkdtemp(prefix="pyunion-run-", dir=base)
            os.chmod(self.workspace, 0o755)
            self.cgroup = Cgroup.create(f"pyunion-{self.id}", spec.limits)
            return self._run_processes()
        finally:
            for sig in RUNNER_FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            if self.cgroup:
                self.cgroup.remove()
            if self.workspace:
                shutil.rmtree(self.workspace, ignore_errors=True)

    def _paths(self) -> tuple[str, str, str]:
        mnt = os.path.join(self.workspace, "root")
        init = os.path.join(self.workspace, "init")
        rw = self.spec.rw_dir or os.path.join(self.workspace, "rw")
        return mnt, init, rw

    def _run_processes(self) -> int:
        spec = self.spec
        mnt, init, rw = self._paths()
        for d in (mnt, init):
            os.mkdir(d, 0o755)
        if spec.rw_dir is None:
            os.mkdir(rw, 0o755)
        lookup = ([spec.rw_dir] if spec.rw_dir else []) + [b.path for b in spec.layers]
        volumes = []
        for v in spec.volumes:
            target, _ = resolve_in_layers(lookup, v.target)
            if target == "/" or target.split("/")[1] in MOUNTPOINTS:
                raise UsageError(f"-v {v.host}:{v.target}: resolves to {target} in the image")
            volumes.append(Volume(v.host, target, v.readonly))
        spec.volumes = volumes
        workdir, exists = resolve_in_layers(lookup, spec.workdir)
        write_init_layer(init, spec.hostname, volumes, [] if exists else [workdir])
        to_keeper_r, to_keeper_w = os.pipe()
        from_keeper_r, from_keeper_w = os.pipe()
        pid_r, pid_w = os.pipe()
        tty_parent = tty_child = None
        if spec.tty:
            tty_parent, tty_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.aborted_by:
            return 128 + self.aborted_by
        keeper = os.fork()
        if keeper == 0:
            code = EXIT_RUNNER
            try:
                os.close(to_keeper_w)
                os.close(from_keeper_r)
                os.close(pid_r)
                if tty_parent:
                    tty_parent.close()
                code = self._keeper(to_keeper_r, from_keeper_w, pid_w, tty_child)
            except RunError as e:
                _say(str(e))
            except BaseException as e:  # noqa: BLE001 - the child must never return
                _say(f"runner failed: {e}")
            finally:
                os._exit(code)
        self.keeper_pid = keeper
        if self.aborted_by:  # the signal came during the fork
            os.kill(keeper, signal.SIGKILL)
        os.close(to_keeper_r)
        os.close(from_keeper_w)
        os.close(pid_w)
        if tty_child:
            tty_child.close()
        try:
            if self.rootless:
                if _read_line(from_keeper_r) == "unshared":
                    try:
                        write_maps(keeper, self.mapping)
                        os.write(to_keeper_w, b"mapped\n")
                    except OSError as e:
                        _say(f"cannot map user ids: {e}")
            os.close(to_keeper_w)
            pid_text = _read_line(pid_r)
            if pid_text.isdigit() and not self.aborted_by:
                self.init_pid = int(pid_text)
            if tty_parent:
                try:
                    relay(tty_parent)
                except OSError as e:  # our stdout went away: the container still runs to its end
                    _say(f"terminal relay stopped: {e.strerror}")
            _, status = os.waitpid(keeper, 0)
        finally:
            os.close(from_keeper_r)
            os.close(pid_r)
            if tty_parent:
                tty_parent.close()
        if self.aborted_by:
            return 128 + self.aborted_by
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.WEXITSTATUS(status)

    def _forward(self, signum, _frame) -> None:
        """Pass a signal to the container's init; before the container exists, abort the run."""
        target, sig = self.init_pid, signum
        if not target:
            self.aborted_by = self.aborted_by or signum
            target, sig = self.keeper_pid, signal.SIGKILL  # everything below dies with it
        if target:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                pass

    # --- keeper: owns the mount namespace with the union -------------------------------

    def _keeper(self, to_keeper_r: int, from_keeper_w: int, pid_w: int, tty_sock) -> int:
        for sig in RUNNER_FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setsid()  # no controlling terminal: keyboard signals reach only the runner
        if self.rootless:
            try:
                libc.unshare(libc.CLONE_NEWUSER | libc.CLONE_NEWNS)
            except OSError as e:
                raise RunError(f"cannot create a user namespace: {e.strerror}") from None
            os.write(from_keeper_w, b"unshared\n")
            if _read_line(to_keeper_r) != "mapped":
                return EXIT_RUNNER
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        else:
            libc.unshare(libc.CLONE_NEWNS)
        os.close(to_keeper_r)
        os.close(from_keeper_w)
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
        mnt, init, rw = self._paths()
        daemon = self._start_union(mnt, init, rw)
        code = EXIT_RUNNER
        try:
            spawner = os.fork()
            if spawner == 0:
                code = EXIT_RUNNER
                try:
                    daemon_pid = daemon.pid
                    del daemon
                    code = self._spawner(mnt, pid_w, tty_sock, daemon_pid)
                except RunError as e:
                    _say(str(e))
                except BaseException as e:  # noqa: BLE001
                    _say(f"container setup failed: {e}")
                finally:
                    os._exit(code)
            os.close(pid_w)
            if tty_sock:
                tty_sock.close()
            _, status = os.waitpid(spawner, 0)
            code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        finally:
            self._stop_union(mnt, daemon)
            if self.spec.rw_dir is None:
                shutil.rmtree(rw, ignore_errors=True)
            shutil.rmtree(init, ignore_errors=True)
        return code

    def _start_union(self, mnt: str, init: str, rw: str) -> subprocess.Popen:
        """Serve the union on mnt (the daemon's log goes to a file, shown only on failure)."""
        branches = [BranchSpec(rw, RW), BranchSpec(init, RO_WH), *self.spec.layers]
        before = _device_of(mnt)
        # (a commit reads the data of metadata-only copies from the image's layers)
        options = "allow_other,metacopy" if self.spec.metacopy else "allow_other"
        cmd = [sys.executable, "-m", "unionfs", "mount", "-f", "-o", options]
        cmd += [format_branches(branches), mnt]
        with open(self._log_path(), "wb") as log:
            daemon = subprocess.Popen(
                cmd,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_end_with_parent,  # SIGTERM: the daemon unmounts and exits
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while _device_of(mnt) in (before, None):
            if daemon.poll() is not None:
                raise RunError(f"the union filesystem did not mount: {self._last_log_line()}")
            if time.monotonic() > deadline:
                daemon.kill()
                daemon.wait()
                raise RunError("the union filesystem did not come up in time")
            time.sleep(0.02)
        return daemon

    def _log_path(self) -> str:
        return os.path.join(self.workspace, "union.log")

    def _last_log_line(self) -> str:
        try:
            with open(self._log_path(), errors="replace") as f:
                text = [line.strip() for line in f if line.strip()]
        except OSError:
            text = []
        if not text:
            return "no message"
        return text[-1].removeprefix("pyunion: ")

    def _stop_union(self, mnt: str, daemon: subprocess.Popen) -> None:
        try:
            libc.umount2(mnt, libc.MNT_DETACH)
        except OSError as e:
            _say(f"cannot unmount the union: {e}")
            daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if daemon.returncode != 0:
            _say(f"the union filesystem failed: {self._last_log_line()}")

    # --- spawner: new namespaces, parent of the container's pid 1 ------------------------

    def _spawner(self, mnt: str, pid_w: int, tty_sock, daemon_pid: int) -> int:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        spec = self.spec
        found = hierarchies()
        own_dirs = {}
        if self.cgroup:
            self.cgroup.join(os.getpid())
            for h in found:
                for directory in self.cgroup.directories:
                    if directory.startswith(h.mountpoint.rstrip("/") + "/"):
                        own_dirs[h.mountpoint] = directory
        flags = libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC
        if spec.net == "none":
            flags |= libc.CLONE_NEWNET
        try:
            libc.unshare(flags | libc.CLONE_NEWCGROUP)
        except OSError:
            try:
                libc.unshare(flags)
            except OSError as e:
                raise RunError(f"cannot create namespaces: {e.strerror}") from None
        libc.sethostname(spec.hostname)
        hold_signals()
        init = os.fork()
        if init == 0:
            code = EXIT_RUNNER
            try:
                os.close(pid_w)
                code = self._init(mnt, tty_sock, found, own_dirs)
            except RunError as e:
                _say(str(e))
            except OSError as e:
                _say(f"container setup failed: {e}")
            except BaseException as e:  # noqa: BLE001
                _say(f"container setup failed: {e!r}")
            finally:
                os._exit(code)
        os.write(pid_w, f"{init}\n".encode())
        os.close(pid_w)
        if tty_sock:
            tty_sock.close()
        _, status = os.waitpid(init, 0)
        return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    # --- init: pid 1 -------------------------------------------------------------------

    def _init(self, mnt: str, tty_sock, found: list[Hierarchy], own_dirs: dict[str, str]) -> int:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(libc.PR_SET_DUMPABLE, 0)  # the container cannot reach into pid 1 via /proc/1
        spec = self.spec
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
        rootfs.mount_proc(mnt)
        rootfs.mount_dev(mnt)
        rootfs.mount_sys(mnt)
        rootfs.mount_cgroups(mnt, found, own_dirs)
        rootfs.mount_volumes(mnt, spec.volumes)
        caps = last_cap()
        note = rootfs.enter_root(mnt, spec.use_chroot)
        if note:
            _say(note)
        rootfs.harden_proc()
        if spec.net == "none":
            rootfs.loopback_up()
        uid, gid, home = _lookup_user(spec.user)
        env = {"PATH": DEFAULT_PATH, "HOSTNAME": spec.hostname, "HOME": home}
        if spec.tty:
            env["TERM"] = os.environ.get("TERM", "xterm")
        env.update(spec.env)
        tty_fd = None
        if spec.tty:
            master, tty_fd = os.openpty()
            socket.send_fds(tty_sock, [b"t"], [master])
            os.close(master)
            tty_sock.close()
            os.fchown(tty_fd, uid, gid)
        message_fd = os.dup(2)
        command = Command(spec.argv, env, uid, gid, spec.workdir, tty_fd, message_fd, caps)
        return run_init(command)
