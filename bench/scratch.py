"""Where the systems' writable layers live during a run: a fresh ext4 filesystem per run.

ext4 does not reuse an inode number freed in the last 30 seconds (5 minutes while its inode
table block is dirty): every create scans past each of them. On a filesystem where earlier
runs and cleanups deleted many trees, a create costs twenty times what it costs on a fresh
one (measured here: 200 µs against 10 µs), and whichever system runs just after a cleanup
pays for it. So each run makes a fresh filesystem (a sparse image on a loop device) for the
writable layers, and moves finished trees aside instead of deleting them until the run ends.
Where no loop device can be had, a plain directory is used, with a warning.
"""

import itertools
import os
import subprocess
from pathlib import Path

from bench.systems import detach_mounts, is_mounted, remove_tree

IMAGE_BYTES = 32 << 30  # sparse: only what the run writes takes disk space
BIG_FILE_BYTES = 64 << 20  # files this big are deleted at once (one inode: no scan to speak of)


class Scratch:
    """Fresh empty directories for writable layers, and a place to retire them after use."""

    def __init__(self, out: Path, log):
        self.out = out
        self.farm = out / "farm"  # native's hard-linked copies: on the layers' filesystem
        self.root = out / "scratch"
        self.image = out / "scratch.img"
        self.log = log
        self.on_image = False
        self.device: str | None = None  # the loop device holding the image
        self._serial = itertools.count()

    def __enter__(self) -> "Scratch":
        self._drop_leftovers()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.image, "wb") as f:
                f.truncate(IMAGE_BYTES)
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                  str(self.image)])
            self.device = _attach(self.image)
            _run(["mount", self.device, str(self.root)])
            self.on_image = True
        except (OSError, RuntimeError) as e:
            self._release_image()
            self.log(f"warning: no fresh filesystem for the writable layers ({e}); create-heavy "
                     "workloads may be slowed by earlier deletions")
        (self.root / "retired").mkdir(exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self._drop_leftovers()

    def fresh(self, name: str) -> Path:
        """A new, empty directory."""
        path = self.root / f"{name}-{next(self._serial)}"
        remove_tree(path)  # only after an interrupted run on a plain directory
        path.mkdir()
        return path

    def retire(self, path: Path) -> None:
        """Put PATH out of the way without freeing its inodes now (its big files go at once)."""
        if not path.exists():
            return
        detach_mounts(path)
        if is_mounted(path):
            return
        for parent, _, files in os.walk(path):
            for name in files:
                file = os.path.join(parent, name)
                try:
                    if os.lstat(file).st_size >= BIG_FILE_BYTES:
                        os.unlink(file)
                except OSError:
                    pass
        os.rename(path, self.root / "retired" / f"{path.name}-{next(self._serial)}")

    def _drop_leftovers(self) -> None:
        """Unmount and delete this run's filesystem (or an interrupted run's)."""
        remove_tree(self.farm)
        if self.root.exists():
            detach_mounts(self.root, including_top=False)
        if is_mounted(self.root):
            subprocess.run(["umount", str(self.root)], check=False)
            if is_mounted(self.root):
                subprocess.run(["umount", "-l", str(self.root)], check=False)
        self._release_image()
        remove_tree(self.root)
        self.on_image = False

    def _release_image(self) -> None:
        """Detach every loop device holding the image (this run's, or an interrupted one's),
        and delete it."""
        if self.image.exists():
            held = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "--associated",
                                   str(self.image)], capture_output=True, text=True).stdout.split()
            for device in {*held, *([self.device] if self.device else [])}:
                subprocess.run(["losetup", "--detach", device], check=False)
        self.device = None
        self.image.unlink(missing_ok=True)


def _attach(image: Path) -> str:
    """A loop device for IMAGE, with direct I/O where it can (else the image's page cache
    doubles the filesystem's: an fsync of 512 MiB took 1.3 s instead of 0.3 s)."""
    for direct in (["--direct-io=on"], []):
        done = subprocess.run(["losetup", "--find", "--show", *direct, str(image)],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.strip()
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    raise RuntimeError(f"losetup: {last}")


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"{argv[0]}: {last}")
