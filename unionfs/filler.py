"""Filling metadata-only copies in the background (`-o metacopy=fill`, the default).

A change of a lower file's metadata alone publishes a metadata-only copy at once (see
metacopy); the filler gives such copies their data once such changes pause, or a second
later if they do not: in batches whose data is copied, then synced together (their syncs
share a journal commit instead of one each), and only then unmarked. What waits when the
mount ends is filled before the daemon exits (which `pyunion umount` waits for): the
writable branch then holds whole files again. A batch holds each of its files' copy-up
locks: a write to one of them waits for the batch instead of racing it. A copy still marked
after a kill or crash reads its lower data meanwhile, and is filled once a later mount
meets it.
"""

import logging
import os
import resource
import threading
import time
from functools import partial

import trio

from unionfs.copyup import FillJob
from unionfs.inodes import UNCHECKED, Key, Node

log = logging.getLogger(__name__)

QUIET = 0.05  # seconds without a new metadata-only copy before filling starts
MAX_DELAY = 1.0  # seconds a copy waits at most while new ones keep coming
BATCH = 256  # copies filled and synced together
# copies waiting (an fd each) before filling starts anyway; at most a quarter of the fd limit
MAX_WAITING = 4096


class Filler:
    """Metadata-only copies of the writable branch waiting for their data, and the task that
    fills them. LOCKS: the copy-up locks by inode number (see UnionOperations._copy_up);
    IN_WORKER: runs a blocking function in a worker thread."""

    def __init__(self, union, locks: dict[int, trio.Lock], in_worker):
        self.union = union
        self._locks = locks
        self._in_worker = in_worker
        # by node key: an O_PATH fd of the copy, and where its data is (see Node.data_at)
        self._waiting: dict[Key, tuple[int, tuple[int, bytes]]] = {}
        self._added = trio.Event()
        self._loop: tuple | None = None  # (thread, trio token) of the task that fills
        self._wake_due = False
        self._last_added = 0.0
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._max_waiting = MAX_WAITING if limit == resource.RLIM_INFINITY \
            else max(BATCH, min(MAX_WAITING, limit // 4))

    def add(self, node: Node) -> None:
        """NODE is a metadata-only copy in the writable branch: fill it soon. It is held by
        an fd, so renames, removals and the kernel forgetting NODE do not lose it."""
        at = node.data_at
        if node.key in self._waiting or at is None or at is UNCHECKED or at[0] < 0:
            return
        try:
            fd = self.union.open_own(node, os.O_PATH)
        except OSError as e:
            log.warning("cannot hold %r to fill it (%s): it stays a metadata-only copy until "
                        "a mount meets it again", node.path, e.strerror)
            return
        self._waiting[node.key] = (fd, at)
        self._last_added = time.monotonic()
        if self._loop is not None and threading.get_ident() != self._loop[0]:
            # (a request served off the loop: see unionfs.uring)
            if not self._added.is_set() and not self._wake_due:
                self._wake_due = True
                self._loop[1].run_sync_soon(self._wake)
        else:
            self._added.set()

    def _wake(self) -> None:
        self._wake_due = False
        self._added.set()

    async def run(self) -> None:
        """Fill copies as they come, once they pause, or a second after the first one if
        they do not (a task for the mount's lifetime)."""
        self._loop = (threading.get_ident(), trio.lowlevel.current_trio_token())
        while True:
            await self._added.wait()
            deadline = time.monotonic() + MAX_DELAY
            while len(self._waiting) < self._max_waiting:
                pause = min(self._last_added + QUIET, deadline) - time.monotonic()
                if pause <= 0:
                    break
                await trio.sleep(pause)
            try:
                filled = await self._fill_some()
            except Exception:  # noqa: BLE001 - the mount serves on; the copies stay marked
                log.exception("unexpected error while filling metadata-only copies")
                filled = 0
            if not filled:
                await trio.sleep(QUIET)  # (the waiting ones are being copied up right now)
            if not self._waiting:
                self._added = trio.Event()

    async def drain(self) -> None:
        """Fill every copy that waits (before an unmount completes)."""
        while self._waiting:
            if not await self._fill_some():
                await trio.sleep(QUIET)

    async def _fill_some(self) -> int:
        """Fill up to BATCH waiting copies; how many were taken."""
        taken: list[tuple[Key, int, FillJob | None, int]] = []
        busy = []
        try:
            while self._waiting and len(taken) < BATCH:
                key = next(iter(self._waiting))
                fd, at = self._waiting.pop(key)
                ino = self.union.table.ino_of(key)
                lock = self._locks.setdefault(ino, trio.Lock())
                if lock.locked():  # (a write is filling it: it is done after that)
                    busy.append((key, (fd, at)))
                    continue
                lock.acquire_nowait()
                taken.append((key, fd, None, ino))  # (released below, whatever happens)
                taken[-1] = (key, fd, self._prepare(fd, at), ino)
            jobs = [job for _, _, job, _ in taken if job is not None]
            if jobs:
                with trio.CancelScope(shield=True):  # (a batch copied is a batch finished)
                    await self._in_worker(partial(_copy_and_sync, jobs))
                for key, _, job, _ in taken:
                    if job is not None:
                        self._finish(key, job)
        finally:
            for _, fd, job, ino in taken:
                if job is not None:
                    job.close()
                os.close(fd)
                lock = self._locks[ino]
                lock.release()
                if lock.statistics().tasks_waiting == 0 and not lock.locked():
                    del self._locks[ino]
            self._waiting.update(busy)
        return len(taken)

    def _prepare(self, fd: int, at: tuple[int, bytes]) -> FillJob | None:
        try:
            data_dirfd, data_name = self.union.data_location(at)
            job = FillJob(data_dirfd, data_name, fd, None, sync=self.union.sync)
            job.prepare()
        except OSError as e:
            log.warning("cannot fill the metadata-only copy of %r: %s; it reads that file",
                        at[1], e.strerror)
            return None
        return job

    def _finish(self, key: Key, job: FillJob) -> None:
        """Unmark a filled and synced copy (the node, if any, reads its own file from now on)."""
        if job.skipped:
            return
        try:
            if job.error is not None:
                raise job.error
            job.finish()
        except OSError as e:
            job.abort()
            log.warning("cannot fill a metadata-only copy (%s); it keeps reading its lower file",
                        e.strerror)
            return
        node = self.union.table.by_key.get(key)
        if node is not None and node.data_at is not UNCHECKED:
            self.union.filled(node)


def _copy_and_sync(jobs: list[FillJob]) -> None:
    """In a worker thread: copy the data of each copy still marked and named, then sync them
    all (their write-out began as they were copied, so the syncs mostly wait together). A
    job's failure is kept as its `error`."""
    for job in jobs:
        try:
            job.skipped = not job.is_marked() or job.links == 0
            if not job.skipped:  # (else filled by a write meanwhile, or removed: no name
                job.copy()  # is left to complete)
        except OSError as e:
            job.error = e
    for job in jobs:
        if not job.skipped and job.error is None:
            try:
                job.flush()
            except OSError as e:
                job.error = e
