"""`-t`: relaying between the user's terminal (or pipes) and the container's pseudo-terminal."""

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import termios
import tty

BUFSIZE = 65536


def _copy_winsize(src: int, dst: int) -> None:
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)
    except OSError:
        pass


@contextlib.contextmanager
def _raw_mode(fd: int):
    """Put the user's terminal in raw mode (the container's pty does the line editing)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def relay(sock: socket.socket) -> None:
    """Receive the pty master from the container's init and copy until the container closes it."""
    try:
        _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    except OSError:
        return
    if not fds:
        return
    master = fds[0]
    stdin_open = True
    _copy_winsize(0, master)
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: _copy_winsize(0, master))
    try:
        with _raw_mode(0):
            while True:
                watched = [master] + ([0] if stdin_open else [])
                ready, _, _ = select.select(watched, [], [])
                if master in ready:
                    try:
                        data = os.read(master, BUFSIZE)
                    except OSError as e:
                        if e.errno != errno.EIO:
                            raise
                        data = b""
                    if not data:
                        break
                    _write_all(1, data)
                if 0 in ready:
                    data = os.read(0, BUFSIZE)
                    if data:
                        _write_all(master, data)
                    else:
                        stdin_open = False
                        _write_all(master, b"\x04")  # end of input on the terminal
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        os.close(master)
