"""The container's pid 1: starts the command, forwards signals to it and reaps every zombie."""

import errno
import fcntl
import os
import signal
import termios
from dataclasses import dataclass

from runner.privileges import drop_privileges

# signals `pyunion run` passes on to the container; pid 1 also passes on terminal ones
RUNNER_FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
FORWARDED = (*RUNNER_FORWARDED, signal.SIGWINCH, signal.SIGCONT)
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


@dataclass
class Command:
    """What pid 1 starts: argv, environment, identity, directory and terminal."""

    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    workdir: str
    tty_fd: int | None  # the pty slave, when -t
    message_fd: int  # the runner's stderr, for errors before exec
    last_cap: int


def exitcode(status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128+N for signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _say(fd: int, message: str) -> None:
    try:
        os.write(fd, f"pyunion: {message}\n".encode(errors="replace"))
    except OSError:
        pass


def _exec(cmd: Command) -> None:
    """In the forked child: become the command (never returns)."""
    try:
        for sig in range(1, signal.NSIG):
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        if cmd.tty_fd is not None:
            fcntl.ioctl(cmd.tty_fd, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(cmd.tty_fd, fd)
            os.close(cmd.tty_fd)
        drop_privileges(cmd.uid, cmd.gid, cmd.last_cap)
    except OSError as e:
        _say(cmd.message_fd, f"cannot start the command: {e.strerror or e}")
        os._exit(125)
    try:
        os.chdir(cmd.workdir)
    except OSError as e:
        _say(cmd.message_fd, f"working directory {cmd.workdir}: {e.strerror}")
        os._exit(125)
    try:
        os.execvpe(cmd.argv[0], cmd.argv, cmd.env)
    except OSError as e:
        _say(cmd.message_fd, f"{cmd.argv[0]}: {e.strerror}")
        os._exit(EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE)


def hold_signals() -> None:
    """Block the forwarded signals until pid 1 can handle them (a pid 1 without a handler
    would silently drop them; blocked, the kernel keeps them pending)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)


def run_init(cmd: Command) -> int:
    """Run the command as pid 2; return its exit status once it ends (zombies reaped meanwhile).

    Expects the forwarded signals held (hold_signals): they are released once the command runs.
    """
    child = 0

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    child = os.fork()
    if child == 0:
        _exec(cmd)
    if cmd.tty_fd is not None:
        os.close(cmd.tty_fd)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 125
        if pid == child:
            return exitcode(status)
