"""What the daemon asks of its own mount, run as a child process: `python probe.py MNT`.

Never from a thread of the daemon: a thread blocked on a request the daemon has read keeps the
daemon's /dev/fuse open after a SIGKILL, so the connection is never aborted and the process and
the mount hang for good. A child holds no /dev/fuse fd; if the daemon dies, its requests fail.
"""

import os
import sys


def show_no_open(mountpoint: str, budget: int = 32) -> None:
    """Open one regular file of the mount, so the kernel learns now that OPEN is not needed:
    until it has sent one OPEN (answered ENOSYS), it also sends a RELEASE for every created file
    (a tenth of the requests of unpacking a tarball). Looks at no more than BUDGET directories;
    does nothing if it finds no file it may open."""
    todo = [mountpoint]
    while todo and budget > 0:
        budget -= 1
        try:
            with os.scandir(todo.pop(0)) as entries:
                for e in entries:
                    if e.is_file(follow_symlinks=False):
                        try:
                            os.close(os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                             | os.O_NOCTTY | os.O_CLOEXEC))
                            return
                        except OSError:
                            continue
                    if e.is_dir(follow_symlinks=False):
                        todo.append(e.path)
        except OSError:
            continue


if __name__ == "__main__":
    show_no_open(sys.argv[1])
