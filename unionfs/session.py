"""The FUSE session: reads the kernel's requests from /dev/fuse and answers them itself.

pyfuse3 mounts (libfuse's fuse_session_mount, through fusermount3 when unprivileged); from the
INIT request on, this module speaks the kernel protocol (see wire) over the adapter's `do_*`
functions. A request costs a read, a dict lookup, the union's work and a write: about a fifth
of a round through libfuse, ctypes callbacks and pyfuse3's coroutines.

Requests are answered in the loop, in order, except those that may have to wait for a copy-up
or the disk: a write, setattr, link, rename, setxattr or removexattr when a copy-up that moves
data is due first, an open (with `opens`), and an fsync unlikely to be quick. Those run as trio tasks, so
a big copy-up or a long fsync never holds other requests up. Between requests that come close
together the loop polls instead of sleeping (see `_poll`). Every request goes through one
choke point: OSError and FUSEError become their errno, anything else is logged and answered EIO.

The kernel is asked to send no OPEN, OPENDIR and FLUSH (where it can do without them), so
file and directory handles are inode numbers, and it caches listings and symlinks.
"""

import errno
import logging
import os
import select
import struct
import threading
import time
from functools import partial

import pyfuse3
import trio

from unionfs import colocate, syscalls, uring, wire
from unionfs.wire import (
    ATTR_OUT,
    BODY,
    ENTRY_OUT,
    IN_HEADER,
    OUT_HEADER,
)

log = logging.getLogger(__name__)

NS = 1_000_000_000
MAX_WRITE = 1 << 20
BUFFER_SIZE = MAX_WRITE + 4096  # a write request: header, write_in and the data
# how long the loop polls for the next request before it sleeps (see Session._poll), seconds
POLL_MAX = 200e-6
POLL_MIN = 10e-6
# yield to other trio tasks (copy-ups, signals) at least this often under a flood of requests
CHECKPOINT_EVERY = 64
# with requests through io_uring, how often the loop looks at /dev/fuse (see _drain_device)
DEVICE_CHECK = 0.2
WANTED = (wire.ASYNC_READ | wire.BIG_WRITES | wire.DO_READDIRPLUS | wire.ASYNC_DIO
          | wire.PARALLEL_DIROPS | wire.MAX_PAGES | wire.CACHE_SYMLINKS | wire.HANDLE_KILLPRIV_V2)
# With AUTO_INVAL_DATA the kernel drops a file's cached data whenever attributes it fetches
# again show another mtime. That is how a mount whose attributes expire soon (-o timeout=N)
# sees data changed in a branch directly; with longer ones (a day by default: `pyunion
# refresh` drops the caches) it fetches them again only after a change made through the
# mount, and then dropped the very data just written (SQLite read its pages back after
# every commit).
AUTO_INVAL_BELOW = 3600.0  # attribute timeouts (seconds) that get it


_PADS = [b"\0" * n for n in range(8)]  # what aligns a dirent's name to 8 bytes

# where the first name of a request starts (for the debug log)
_NAME_AT = {wire.LOOKUP: BODY, wire.UNLINK: BODY, wire.RMDIR: BODY, wire.SYMLINK: BODY,
            wire.REMOVEXATTR: BODY, wire.MKDIR: BODY + wire.MKDIR_IN.size,
            wire.MKNOD: BODY + wire.MKNOD_IN.size, wire.CREATE: BODY + wire.CREATE_IN.size,
            wire.LINK: BODY + wire.LINK_IN.size, wire.RENAME: BODY + wire.RENAME_IN.size,
            wire.RENAME2: BODY + wire.RENAME2_IN.size, wire.GETXATTR: BODY + wire.GETXATTR_IN.size,
            wire.SETXATTR: BODY + wire.SETXATTR_IN.size}


def find_device_fd() -> int | None:
    """The fd of /dev/fuse that pyfuse3.init() opened (or got from fusermount3)."""
    found = [int(n) for n in os.listdir("/proc/self/fd")
             if _readlink(f"/proc/self/fd/{n}") == "/dev/fuse"]
    return found[0] if len(found) == 1 else None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


class Caller:
    """Who sent a request, for the adapter's handlers (pyfuse3's RequestContext fields)."""

    __slots__ = ("uid", "gid", "pid")

    def __init__(self, uid: int, gid: int, pid: int):
        self.uid, self.gid, self.pid = uid, gid, pid


def _run_now(coro):
    """Run a handler coroutine that never waits, to its end, outside trio's scheduling."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a handler expected to answer at once waited")


def _timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * NS)


class _HoldsLock(trio.abc.Instrument):
    """Holds LOCK while a trio task runs (see Session._start_queues)."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock

    def before_task_step(self, task) -> None:
        self.lock.acquire()

    def after_task_step(self, task) -> None:
        self.lock.release()


class Session:
    """Serves one mounted union's /dev/fuse fd until it is unmounted or stopped."""

    def __init__(self, ops, fd: int, writeback: bool = False, poll_max: float = POLL_MAX,
                 opens: bool = False, plus_auto: bool = False, low_latency: bool = False,
                 use_uring: bool = False, colocation: bool = False):
        """OPENS: have the kernel send OPEN and OPENDIR, as kernels before 5.1 do.
        PLUS_AUTO: let the kernel list with plain READDIR (names only, no attributes, no
        inodes made) where nobody has looked up or stat()ed an entry of the directory since
        its last listing request (the kernel's readdirplus=auto rule).
        LOW_LATENCY: while requests come close together, keep idle CPUs from halting (see
        _poll).
        USE_URING: take requests through io_uring, a queue per CPU, where the kernel offers it
        (see unionfs.uring).
        COLOCATION: poll on the client's CPU at idle priority where that is faster (see
        unionfs.colocate; the caller checks that this process may)."""
        self.ops = ops
        self.opens = opens
        self.union = ops.union
        self._nlink = self.union.attr_nlink
        self.fd = fd
        self.debug = ops.debug
        self.wanted = WANTED | (wire.WRITEBACK_CACHE if writeback else 0) \
            | (wire.EXPORT_SUPPORT if ops.supports_dot_lookup else 0) \
            | (wire.POSIX_ACL if ops.enable_acl else 0) \
            | (wire.READDIRPLUS_AUTO if plus_auto else 0) \
            | (wire.AUTO_INVAL_DATA if ops.attr_timeout < AUTO_INVAL_BELOW else 0)
        self.no_open = False
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._nursery: trio.Nursery | None = None
        self._stopped = False
        self._tasks = 0
        self.poll_max = poll_max
        self._window = min(POLL_MIN, poll_max)  # how long _poll() waits now
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._latency = syscalls.CpuLatencyRequest() if low_latency else None
        self.colocation = colocation and poll_max > 0
        self._colo: colocate.Colocation | None = None  # made by the loop's thread
        self._reads = 0  # READ requests since the last look at colocation
        self._caller = (0, 0, 0)
        self.use_uring = use_uring
        self.queues: uring.Queues | None = None  # once requests come through io_uring
        # (queue, entry) of each request from io_uring not answered yet, by unique
        self._ring_requests: dict[int, tuple] = {}
        # held by whichever thread runs handlers or trio tasks, once there are queues
        self.lock = threading.Lock()
        self._token = None
        self._trio_thread: int | None = None
        self._holds_lock = _HoldsLock(self.lock)
        self._entry_valid = _timeout(ops.entry_timeout)
        self._attr_valid = _timeout(ops.attr_timeout)
        seconds, nanoseconds = _timeout(ops.negative_timeout)
        self._negative = ENTRY_OUT.pack(0, 0, seconds, 0, nanoseconds, 0, *(0,) * 16)
        self._handlers = {
            wire.INIT: self._init, wire.DESTROY: self._destroy,
            wire.LOOKUP: self._lookup, wire.FORGET: self._forget,
            wire.BATCH_FORGET: self._batch_forget, wire.GETATTR: self._getattr,
            wire.SETATTR: self._setattr, wire.READLINK: self._readlink,
            wire.SYMLINK: self._symlink, wire.MKNOD: self._mknod, wire.MKDIR: self._mkdir,
            wire.UNLINK: self._unlink, wire.RMDIR: self._rmdir, wire.RENAME: self._rename,
            wire.RENAME2: self._rename2, wire.LINK: self._link, wire.OPEN: self._open,
            wire.READ: self._read, wire.WRITE: self._write, wire.STATFS: self._statfs,
            wire.RELEASE: self._release, wire.FSYNC: self._fsync,
            wire.SETXATTR: self._setxattr, wire.GETXATTR: self._getxattr,
            wire.LISTXATTR: self._listxattr, wire.REMOVEXATTR: self._removexattr,
            wire.FLUSH: self._unsupported, wire.OPENDIR: self._opendir,
            wire.READDIR: self._readdir, wire.READDIRPLUS: self._readdirplus,
            wire.RELEASEDIR: self._releasedir, wire.FSYNCDIR: self._fsyncdir,
            wire.ACCESS: self._access, wire.CREATE: self._create, wire.TMPFILE: self._tmpfile,
            wire.INTERRUPT: self._interrupt, wire.FALLOCATE: self._fallocate,
            wire.LSEEK: self._lseek,
        }

    # ------------------------------------------------------------------ the loop

    async def serve(self) -> None:
        """Answer requests until the file system is unmounted or `stop()` is called."""
        os.set_blocking(self.fd, False)
        self.ops.invalidate = self._invalidate
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        if self.colocation:
            self._colo = colocate.Colocation()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._take_requests()
            finally:
                if self._colo is not None:
                    self._colo.close()
                    self._colo = None
            if self._latency is not None:
                self._latency.release()
            nursery.cancel_scope.cancel()
        if self.queues is not None:
            trio.lowlevel.remove_instrument(self._holds_lock)
            self.lock.release()  # (held for this step: see _start_queues)

    async def _take_requests(self) -> None:
        """Read and answer requests from /dev/fuse until unmounted or stopped."""
        served = 0
        while not self._stopped:
            try:
                size = os.readv(self.fd, [self._buf])
            except BlockingIOError:
                if self.queues is not None:  # (FORGETs alone: the queues read them too)
                    await trio.sleep(DEVICE_CHECK)
                    continue
                size = self._poll() if self._window else None
                if size is None:
                    if self._colo is not None:  # (never asleep at idle priority)
                        self._colo.normal()
                    try:
                        await trio.lowlevel.wait_readable(self.fd)
                    except trio.ClosedResourceError:
                        break
                    continue
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if e.errno == errno.ENODEV:  # unmounted
                    break
                raise
            if self._colo is not None:  # (requests are handled at the loop's own priority)
                self._colo.normal()
            self._dispatch(size)
            served += 1
            if self._colo is not None and served % colocate.CHECK_EVERY == 0:
                self._colo.check(self._caller[2], self._reads)
                self._reads = 0
            if self._tasks or served % CHECKPOINT_EVERY == 0:
                if self._colo is not None:  # (tasks' steps run at the loop's own priority)
                    self._colo.normal()
                await trio.lowlevel.checkpoint()

    def _poll(self) -> int | None:
        """Wait for the next request by polling, for a while: the size read, or None.

        Waking a sleeping daemon costs the client more than the request itself where a CPU
        has to be woken from idle (tens of microseconds in a virtual machine). While requests
        come close together the loop polls for the next one instead of sleeping, yielding the
        CPU to anything else runnable; the window grows while that pays and shrinks when it
        does not, so an idle mount uses no CPU.

        With -o lowlatency the same burst also holds a CPU latency request, so that the
        client's CPU polls too while it waits for each reply instead of halting: in a VM
        whose idle CPUs halt at once, waking one costs more than most requests (unpacking a
        tarball took 0.55 s instead of 1.3 s). It is dropped as soon as the loop sleeps.
        """
        deadline = time.perf_counter() + self._window
        ready = self._poller.poll  # (a failed read would cost an exception each round)
        while True:
            os.sched_yield()
            if not ready(0):
                if time.perf_counter() < deadline:
                    continue
                self._window = min(max(self._window / 2, POLL_MIN), self.poll_max)
                if self._latency is not None:
                    self._latency.release()
                return None
            try:
                size = os.readv(self.fd, [self._buf])
            except OSError:
                return None  # the main loop reads again and sees it
            if self._colo is not None and time.perf_counter() - deadline > colocate.STARVED:
                self._colo.late()
            self._window = min(self._window * 2, self.poll_max)
            if self._latency is not None and not self._latency.held:
                self._hold_latency()
            return size

    def _hold_latency(self) -> None:
        try:
            self._latency.hold()
        except OSError as e:
            log.error("-o lowlatency: cannot hold a CPU latency request: %s; going on without",
                      e.strerror)
            self._latency = None

    def stop(self) -> None:
        """End `serve()` (the caller then unmounts)."""
        self._stopped = True
        if self._latency is not None:
            self._latency.release()
        trio.lowlevel.notify_closing(self.fd)

    def _dispatch(self, size: int) -> None:
        length, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(self._buf)
        if length != size:
            log.error("request %d: %d bytes read, %d announced", unique, size, length)
        handler = self._handlers.get(opcode)
        if self.debug:
            log.debug("%s from pid %d", self._describe(opcode, nodeid, length), pid)
        if handler is None:
            if opcode not in wire.NO_REPLY:
                self._error(unique, errno.ENOSYS)
            return
        self._caller = (uid, gid, pid)
        try:
            handler(unique, nodeid, length)
        except Exception as e:  # noqa: BLE001 - the choke point: answer, log, keep serving
            self._fail(unique, opcode, nodeid, e)

    def _describe(self, opcode: int, nodeid: int, length: int) -> str:
        """A request as the debug log shows it: name(inode, first name or offset and size)."""
        args = [repr(nodeid)]
        start = _NAME_AT.get(opcode)
        if start is not None:
            args.append(repr(bytes(self._view[start:length]).split(b"\0", 1)[0]))
        elif opcode in (wire.READ, wire.WRITE):
            _, offset, size, _, _, _, _ = wire.READ_IN.unpack_from(self._buf, BODY)
            args += [repr(offset), repr(size) if opcode == wire.READ else f"<{size} bytes>"]
        return f"{wire.NAMES.get(opcode, opcode)}({', '.join(args)})"

    def _fail(self, unique: int, opcode: int, nodeid: int, e: BaseException) -> None:
        if isinstance(e, pyfuse3.FUSEError):
            err = e.errno
            if self.debug:
                log.debug("%s inode %d -> %s", wire.NAMES.get(opcode), nodeid, os.strerror(err))
        elif isinstance(e, OSError):
            err = e.errno or errno.EIO
            if self.debug:
                log.debug("%s inode %d -> %s", wire.NAMES.get(opcode), nodeid, e)
        else:
            log.error("unexpected error in %s (inode %d)", wire.NAMES.get(opcode, opcode), nodeid,
                      exc_info=e)
            err = errno.EIO
        if opcode not in wire.NO_REPLY:
            self._error(unique, err)

    def _spawn(self, unique: int, opcode: int, nodeid: int, coro, answer) -> None:
        """Run a request that may wait as a task; ANSWER(unique, result) replies."""
        async def run():
            try:
                result = await coro
                answer(unique, result)
            except Exception as e:  # noqa: BLE001 - the choke point, as in _dispatch
                self._fail(unique, opcode, nodeid, e)
            finally:
                self._tasks -= 1

        self._tasks += 1
        self._in_loop(self._nursery.start_soon, run)

    def _in_loop(self, fn, *args) -> None:
        """Call FN(*ARGS) in the trio thread: now if this is it, else soon."""
        if threading.get_ident() == self._trio_thread:
            fn(*args)
        else:
            self._token.run_sync_soon(fn, *args)

    def _now_or_task(self, unique: int, opcode: int, nodeid: int, node, coro, answer) -> None:
        """Run a change of NODE's metadata that copies it up first: at once if the copy-up
        moves no data (CORO then waits for nothing), else as a task, since the copy may be big."""
        if self.ops.copy_up_at_once(node, meta=True):
            answer(unique, _run_now(coro))
        else:
            self._spawn(unique, opcode, nodeid, coro, answer)

    # ------------------------------------------------------------------ replies

    def _send(self, unique: int, *parts, err: int = 0) -> bool:
        """Reply to request UNIQUE (an error ERR, with no PARTS); False if the kernel no
        longer waits for it."""
        if self._ring_requests:
            at = self._ring_requests.pop(unique, None)
            if at is not None:
                at[0].reply(at[1], err, parts)
                return True
        size = OUT_HEADER.size + sum(map(len, parts))
        if self._colo is not None:
            self._colo.before_reply()
        try:
            os.writev(self.fd, [OUT_HEADER.pack(size, -err, unique), *parts])
            return True
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # interrupted, unmounted
                log.error("reply to request %d failed: %s", unique, e)
            return False

    def _error(self, unique: int, err: int) -> None:
        self._send(unique, err=err)

    def _ok(self, unique: int, _result=None) -> None:
        self._send(unique)

    def _attr(self, node, st: os.stat_result, nlink: int | None = None) -> tuple:
        a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return (node.ino, st.st_size, st.st_blocks, a // NS, m // NS, c // NS, a % NS, m % NS,
                c % NS, st.st_mode, self._nlink(node, st) if nlink is None else nlink, st.st_uid,
                st.st_gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)

    def _entry(self, node, st: os.stat_result, nlink: int | None = None) -> bytes:
        (es, ens), (as_, ans) = self._entry_valid, self._attr_valid
        return ENTRY_OUT.pack(node.ino, 0, es, as_, ens, ans, *self._attr(node, st, nlink))

    def _new_entry(self, unique: int, found: tuple, *more: bytes, nlink: int | None = None) -> None:
        """Reply with an entry the kernel then holds a reference to (NLINK: its link count,
        if not the file's own)."""
        node, st = found
        if self._send(unique, self._entry(node, st, nlink), *more):
            node.lookups += 1

    def _attr_reply(self, unique: int, node, st: os.stat_result) -> None:
        s, ns = self._attr_valid
        self._send(unique, ATTR_OUT.pack(s, ns, 0, *self._attr(node, st)))

    def _name(self, start: int, length: int) -> bytes:
        return bytes(self._view[start:length - 1])

    def _two_names(self, start: int, length: int) -> tuple[bytes, bytes]:
        first, second = bytes(self._view[start:length - 1]).split(b"\0", 1)
        return first, second

    # ------------------------------------------------------------------ session

    def _init(self, unique, nodeid, length):
        major, minor, max_readahead, flags = wire.INIT_IN.unpack_from(self._buf, BODY)
        if major != wire.MAJOR or minor < wire.OLDEST_MINOR or not flags & wire.DO_READDIRPLUS:
            log.error("the kernel speaks FUSE %d.%d; pyunion needs %d.%d or later", major, minor,
                      wire.MAJOR, wire.OLDEST_MINOR)
            self._error(unique, errno.EPROTO)
            self.stop()
            return
        self.no_open = bool(flags & wire.NO_OPEN_SUPPORT) and not self.opens
        self.ops.no_opendir = bool(flags & wire.NO_OPENDIR_SUPPORT) and not self.opens
        if flags & wire.INIT_EXT and length >= BODY + wire.INIT_IN.size + wire.INIT_IN_FLAGS2.size:
            flags |= wire.INIT_IN_FLAGS2.unpack_from(self._buf, BODY + wire.INIT_IN.size)[0] << 32
        queues = self._make_queues(flags) if self.use_uring else None
        wanted = self.wanted | (wire.INIT_EXT | wire.OVER_IO_URING if queues else 0)
        agreed = wanted & flags
        reply = wire.INIT_OUT.pack(wire.MAJOR, wire.MINOR, max_readahead, agreed & 0xFFFFFFFF, 0, 0,
                                   MAX_WRITE, 1, MAX_WRITE // 4096, 0, agreed >> 32)
        if minor < 23:
            reply = reply[:wire.INIT_OUT_COMPAT_SIZE]
        self.ops.init()
        self._send(unique, reply)
        log.debug("FUSE %d.%d, flags %#x of %#x", major, minor, agreed, flags)
        if queues:
            self._start_queues(queues)

    def _make_queues(self, offered: int) -> "uring.Queues | None":
        """The io_uring queues for -o uring, if the kernel offers them and lets us make rings
        (a kernel that agrees to io_uring holds every request until they are registered)."""
        if not offered & wire.OVER_IO_URING:
            log.warning("-o uring: the kernel offers no FUSE over io_uring (Linux 6.14 or later, "
                        "with %s set to Y): serving through /dev/fuse", uring.ENABLE_PARAMETER)
            return None
        try:
            return uring.Queues(self.fd, max(8192, MAX_WRITE), self._dispatch_queued,
                                self._drain_device)
        except OSError as e:
            log.warning("-o uring: %s: serving through /dev/fuse", e.strerror)
            return None

    def _start_queues(self, queues: "uring.Queues") -> None:
        """Serve requests through a queue per CPU from now on (see unionfs.uring). From here
        on handlers and trio tasks take turns: each holds self.lock while it runs (trio's
        task steps through an instrument; this one, already running, takes it now)."""
        trio.lowlevel.add_instrument(self._holds_lock)
        self.lock.acquire()  # (before the first queue can take a request)
        try:
            queues.start()
        except OSError as e:
            # (the kernel turned io_uring off for the mount when it refused the registration)
            trio.lowlevel.remove_instrument(self._holds_lock)
            self.lock.release()
            log.warning("-o uring: %s: serving through /dev/fuse", e.strerror)
            return
        self.queues = queues
        self._window = self.poll_max = 0  # (/dev/fuse brings FORGETs alone now)
        if self._colo is not None:  # (each queue's thread serves its own CPU)
            self._colo.close()
            self._colo = None
        log.info("serving through FUSE over io_uring, %d queues", len(queues.queues))

    def _dispatch_queued(self, buf: bytearray, length: int, queue, index: int) -> None:
        """Handle a request that came through io_uring (in its queue's thread)."""
        with self.lock:
            self._ring_requests[struct.unpack_from("=Q", buf, 8)[0]] = (queue, index)
            self._dispatch_from(buf, length)

    def _drain_device(self, buf: bytearray) -> None:
        """Handle what waits in /dev/fuse (in a queue's thread, after its requests): FORGETs,
        which the kernel still sends there. Taking them where requests are served anyway
        spares waking the loop's thread for each."""
        while True:
            try:
                size = os.readv(self.fd, [buf])
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):
                    continue
                return  # (unmounted: the loop sees it too)
            with self.lock:
                self._dispatch_from(buf, size)

    def _dispatch_from(self, buf: bytearray, length: int) -> None:
        saved = self._buf, self._view
        self._buf, self._view = buf, memoryview(buf)
        try:
            self._dispatch(length)
        finally:
            self._buf, self._view = saved

    def _destroy(self, unique, nodeid, length):
        self._send(unique)
        self.stop()

    def _unsupported(self, unique, nodeid, length):
        self._error(unique, errno.ENOSYS)  # the kernel stops sending these

    def _interrupt(self, unique, nodeid, length):
        pass  # requests are answered in order anyway; copy-ups are not cut short

    # ------------------------------------------------------------------ lookups

    def _lookup(self, unique, nodeid, length):
        found = self.ops.do_lookup(nodeid, self._name(BODY, length))
        if found is None:
            self._send(unique, self._negative)
        else:
            self._new_entry(unique, found)

    def _forget(self, unique, nodeid, length):
        self.ops.do_forget([(nodeid, wire.FORGET_IN.unpack_from(self._buf, BODY)[0])])

    def _batch_forget(self, unique, nodeid, length):
        count = wire.BATCH_FORGET_IN.unpack_from(self._buf, BODY)[0]
        start = BODY + wire.BATCH_FORGET_IN.size
        one = wire.FORGET_ONE
        self.ops.do_forget([one.unpack_from(self._buf, start + i * one.size) for i in range(count)])

    def _getattr(self, unique, nodeid, length):
        self._attr_reply(unique, *self.ops.do_getattr(nodeid))

    def _setattr(self, unique, nodeid, length):
        (valid, _, _, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
         _) = wire.SETATTR_IN.unpack_from(self._buf, BODY)
        now = time.time_ns() if valid & (wire.FATTR_ATIME_NOW | wire.FATTR_MTIME_NOW) else None
        changes = {
            "mode": mode if valid & wire.FATTR_MODE else None,
            "uid": uid if valid & wire.FATTR_UID else None,
            "gid": gid if valid & wire.FATTR_GID else None,
            "size": size if valid & wire.FATTR_SIZE else None,
            "atime_ns": atime * NS + atimensec if valid & wire.FATTR_ATIME
            else now if valid & wire.FATTR_ATIME_NOW else None,
            "mtime_ns": mtime * NS + mtimensec if valid & wire.FATTR_MTIME
            else now if valid & wire.FATTR_MTIME_NOW else None,
        }
        node = self.ops._node(nodeid)
        kill = valid & wire.FATTR_KILL_SUIDGID and not valid & wire.FATTR_MODE

        def answer(unique, st):
            self._attr_reply(unique, node, self.ops.kill_suidgid(node, st) if kill else st)

        if changes["size"] is not None and self.ops.resize_past_data(node, changes["size"]):
            changes["size"] = None
        if self.ops.copy_up_at_once(node, changes["size"], meta=changes["size"] is None):
            answer(unique, self.ops.do_setattr(node, **changes))
        else:
            self._spawn(unique, wire.SETATTR, nodeid, self.ops.change_attrs(node, changes), answer)

    def _readlink(self, unique, nodeid, length):
        self._send(unique, self.ops.do_readlink(nodeid))

    # ------------------------------------------------------------------ namespace changes

    def _symlink(self, unique, nodeid, length):
        name, target = self._two_names(BODY, length)
        uid, gid, _ = self._caller
        self._new_entry(unique, self.ops.do_symlink(nodeid, name, target, uid, gid))

    def _mknod(self, unique, nodeid, length):
        mode, rdev, _, _ = wire.MKNOD_IN.unpack_from(self._buf, BODY)
        name = self._name(BODY + wire.MKNOD_IN.size, length)
        uid, gid, _ = self._caller
        self._new_entry(unique, self.ops.do_mknod(nodeid, name, mode, rdev, uid, gid))

    def _mkdir(self, unique, nodeid, length):
        mode, _ = wire.MKDIR_IN.unpack_from(self._buf, BODY)
        name = self._name(BODY + wire.MKDIR_IN.size, length)
        uid, gid, _ = self._caller
        self._new_entry(unique, self.ops.do_mkdir(nodeid, name, mode, uid, gid))

    def _unlink(self, unique, nodeid, length):
        self.ops.do_unlink(nodeid, self._name(BODY, length))
        self._send(unique)

    def _rmdir(self, unique, nodeid, length):
        self.ops.do_rmdir(nodeid, self._name(BODY, length))
        self._send(unique)

    def _rename(self, unique, nodeid, length):
        newdir, = wire.RENAME_IN.unpack_from(self._buf, BODY)
        old, new = self._two_names(BODY + wire.RENAME_IN.size, length)
        self._rename_as(unique, wire.RENAME, nodeid, old, newdir, new, 0)

    def _rename2(self, unique, nodeid, length):
        newdir, flags, _ = wire.RENAME2_IN.unpack_from(self._buf, BODY)
        old, new = self._two_names(BODY + wire.RENAME2_IN.size, length)
        self._rename_as(unique, wire.RENAME2, nodeid, old, newdir, new, flags)

    def _rename_as(self, unique, opcode, nodeid, old, newdir, new, flags):
        """A rename that must copy a file's data up first waits as a task; the rest are answered
        at once."""
        if self.ops.rename_copy_due(nodeid, old) is None:
            self.ops.rename_now(nodeid, old, newdir, new, flags)
            self._send(unique)
        else:
            self._spawn(unique, opcode, nodeid, self.ops.do_rename(nodeid, old, newdir, new, flags),
                        self._ok)

    def _link(self, unique, nodeid, length):
        old, = wire.LINK_IN.unpack_from(self._buf, BODY)
        name = self._name(BODY + wire.LINK_IN.size, length)
        self._now_or_task(unique, wire.LINK, nodeid, self.ops._node(old),
                          self.ops.do_link(old, nodeid, name), self._new_entry)

    # ------------------------------------------------------------------ files

    def _open(self, unique, nodeid, length):
        if self.no_open:
            self._error(unique, errno.ENOSYS)  # the kernel stops sending OPEN (and RELEASE)
            return
        flags, _ = wire.OPEN_IN.unpack_from(self._buf, BODY)
        self._spawn(unique, wire.OPEN, nodeid, self.ops.do_open(nodeid, flags),
                    lambda unique, fh: self._send(unique, wire.OPEN_OUT.pack(fh, wire.FOPEN_KEEP_CACHE, 0)))

    def _create(self, unique, nodeid, length):
        flags, mode, _, _ = wire.CREATE_IN.unpack_from(self._buf, BODY)
        name = self._name(BODY + wire.CREATE_IN.size, length)
        uid, gid, _ = self._caller
        found = self.ops.do_create(nodeid, name, mode, flags, uid, gid)
        self._new_entry(unique, found, wire.OPEN_OUT.pack(found[0].ino, wire.FOPEN_KEEP_CACHE, 0))

    def _tmpfile(self, unique, nodeid, length):
        """O_TMPFILE: laid out as CREATE, its name a placeholder. The kernel takes the new
        file's one link away itself as it makes it nameless, so the reply says it has one."""
        flags, mode, _, _ = wire.CREATE_IN.unpack_from(self._buf, BODY)
        uid, gid, _ = self._caller
        found = self.ops.do_tmpfile(nodeid, mode, flags, uid, gid)
        self._new_entry(unique, found, wire.OPEN_OUT.pack(found[0].ino, wire.FOPEN_KEEP_CACHE, 0),
                        nlink=1)

    def _read(self, unique, nodeid, length):
        self._reads += 1
        _, offset, size, _, _, _, _ = wire.READ_IN.unpack_from(self._buf, BODY)
        self._send(unique, self.ops.do_read(nodeid, offset, size))

    def _write(self, unique, nodeid, length):
        _, offset, size, flags, _, _, _ = wire.WRITE_IN.unpack_from(self._buf, BODY)
        start = BODY + wire.WRITE_IN.size
        node = self.ops._node(nodeid)

        def answer(unique, count):
            if flags & wire.WRITE_KILL_SUIDGID:
                self.ops.kill_suidgid(node)
            self._send(unique, wire.WRITE_OUT.pack(count, 0))

        if self.union.needs_copy_up(node):
            count = self.ops.write_past_data(node, offset, self._view[start:start + size])
            if count is not None:  # (an append: no data to copy first)
                answer(unique, count)
                return
            data = bytes(self._view[start:start + size])  # the buffer is reused meanwhile
            self._spawn(unique, wire.WRITE, nodeid, self.ops.write_copying(node, offset, data),
                        answer)
        else:
            answer(unique, self.ops.do_write(node, offset, self._view[start:start + size]))

    def _release(self, unique, nodeid, length):
        self._send(unique)  # nothing is kept per open

    def _fsync(self, unique, nodeid, length):
        """An fsync likely to be quick runs in the loop, unless other requests wait; the rest
        run in a worker thread, which also answers: the client goes on as soon as its data is
        on disk, without waiting for the loop to hear that the thread is done."""
        _, flags, _ = wire.FSYNC_IN.unpack_from(self._buf, BODY)
        job = self.ops.fsync_job(nodeid, bool(flags & wire.FSYNC_FDATASYNC))
        if job is None:
            self._send(unique)
            return
        sync, quick = job
        if quick and not self._poller.poll(0):
            sync()
            self._send(unique)
            return

        def sync_and_answer():
            try:
                sync()
            except OSError as e:
                self._error(unique, e.errno or errno.EIO)
            else:
                self._send(unique)

        self._spawn(unique, wire.FSYNC, nodeid, self.ops.in_worker(sync_and_answer),
                    lambda unique, _: None)  # (answered already)

    def _fallocate(self, unique, nodeid, length):
        _, offset, size, mode, _ = wire.FALLOCATE_IN.unpack_from(self._buf, BODY)
        node = self.ops._node(nodeid)
        if self.union.needs_copy_up(node):
            self._spawn(unique, wire.FALLOCATE, nodeid,
                        self.ops.fallocate_copying(node, mode, offset, size),
                        lambda unique, _: self._send(unique))
        else:
            syscalls.fallocate(self.ops.fd_for(nodeid, True), mode, offset, size)
            self._send(unique)

    def _lseek(self, unique, nodeid, length):
        _, offset, whence, _ = wire.LSEEK_IN.unpack_from(self._buf, BODY)
        pos = self.ops.do_lseek(nodeid, offset, whence)
        self._send(unique, wire.LSEEK_OUT.pack(pos))

    def _statfs(self, unique, nodeid, length):
        sv = self.union.statfs()
        self._send(unique, wire.STATFS_OUT.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files,
                                                sv.f_ffree, sv.f_bsize, self.union.namemax,
                                                sv.f_frsize, 0))

    # ------------------------------------------------------------------ directories

    def _opendir(self, unique, nodeid, length):
        if self.ops.no_opendir:
            self._error(unique, errno.ENOSYS)  # the kernel stops sending OPENDIR, caches listings
            return
        fh = _run_now(self.ops.opendir(nodeid, Caller(*self._caller)))
        self._send(unique, wire.OPEN_OUT.pack(fh, 0, 0))

    def _releasedir(self, unique, nodeid, length):
        fh = wire.READ_IN.unpack_from(self._buf, BODY)[0]
        _run_now(self.ops.releasedir(fh))
        self._send(unique)

    def _readdir(self, unique, nodeid, length):
        fh, offset, size, _, _, _, _ = wire.READ_IN.unpack_from(self._buf, BODY)
        parts = []
        used = 0
        pack = wire.DIRENT.pack
        fixed = wire.DIRENT.size

        pads = _PADS

        def emit(name, ino, kind, next_id):
            nonlocal used
            namelen = len(name)
            pad = -namelen & 7
            length = fixed + namelen + pad
            if used + length > size:
                return False
            parts.append(pack(ino, next_id, namelen, kind))
            parts.append(name)
            parts.append(pads[pad])
            used += length
            return True

        self.ops.do_readdir_names(nodeid if self.ops.no_opendir else fh, offset, emit)
        self._send(unique, b"".join(parts))

    def _readdirplus(self, unique, nodeid, length):
        fh, offset, size, _, _, _, _ = wire.READ_IN.unpack_from(self._buf, BODY)
        parts = []
        taken = []
        used = 0

        (es, ens), (as_, ans) = self._entry_valid, self._attr_valid
        pack = wire.DIRENTPLUS.pack
        fixed = wire.DIRENTPLUS.size

        nlink = self._nlink
        pads = _PADS

        def emit(name, node, st, next_id):
            nonlocal used
            namelen = len(name)
            pad = -namelen & 7
            length = fixed + namelen + pad
            if used + length > size:
                return False
            ino = node.ino
            a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
            mode = st.st_mode
            # (the fields of _attr, inline: this runs once per entry listed)
            parts.append(pack(ino, 0, es, as_, ens, ans, ino, st.st_size, st.st_blocks, a // NS,
                              m // NS, c // NS, a % NS, m % NS, c % NS, mode, nlink(node, st),
                              st.st_uid, st.st_gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0,
                              ino, next_id, namelen, (mode >> 12) & 0o17))
            parts.append(name)
            parts.append(pads[pad])
            used += length
            if name != b"." and name != b"..":
                taken.append(node)
            return True

        self.ops.do_readdir(nodeid if self.ops.no_opendir else fh, offset, emit)
        if not self._send(unique, b"".join(parts)):
            self.ops.do_forget([(node.ino, 1) for node in taken])  # the kernel took none of them

    def _fsyncdir(self, unique, nodeid, length):
        fh = wire.FSYNC_IN.unpack_from(self._buf, BODY)[0]
        self.ops.do_fsyncdir(nodeid if self.ops.no_opendir else fh)
        self._send(unique)

    # ------------------------------------------------------------------ the rest

    def _getxattr(self, unique, nodeid, length):
        size, _ = wire.GETXATTR_IN.unpack_from(self._buf, BODY)
        name = self._name(BODY + wire.GETXATTR_IN.size, length)
        value = self.ops.do_getxattr(nodeid, name)
        if value is None:
            self._error(unique, self.ops.absent_xattr_errno(name))
        else:
            self._sized(unique, size, value)

    def _listxattr(self, unique, nodeid, length):
        size, _ = wire.GETXATTR_IN.unpack_from(self._buf, BODY)
        self._sized(unique, size, b"".join(name + b"\0" for name in self.ops.do_listxattr(nodeid)))

    def _sized(self, unique: int, size: int, value: bytes) -> None:
        """Reply to an xattr query: the size only when asked with 0, ERANGE if it does not fit."""
        if size == 0:
            self._send(unique, wire.XATTR_OUT.pack(len(value), 0))
        elif len(value) > size:
            self._error(unique, errno.ERANGE)
        else:
            self._send(unique, value)

    def _setxattr(self, unique, nodeid, length):
        size, _ = wire.SETXATTR_IN.unpack_from(self._buf, BODY)
        start = BODY + wire.SETXATTR_IN.size
        end = self._buf.index(b"\0", start, length)
        name = bytes(self._view[start:end])
        value = bytes(self._view[end + 1:end + 1 + size])
        self._now_or_task(unique, wire.SETXATTR, nodeid, self.ops._node(nodeid),
                          self.ops.setxattr(nodeid, name, value, Caller(*self._caller)), self._ok)

    def _removexattr(self, unique, nodeid, length):
        name = self._name(BODY, length)
        self._now_or_task(unique, wire.REMOVEXATTR, nodeid, self.ops._node(nodeid),
                          self.ops.removexattr(nodeid, name, Caller(*self._caller)), self._ok)

    def _access(self, unique, nodeid, length):
        mask, _ = wire.ACCESS_IN.unpack_from(self._buf, BODY)
        _run_now(self.ops.access(nodeid, mask, Caller(*self._caller)))
        self._send(unique)

    # ------------------------------------------------------------------ notifications

    def _invalidate(self, entries: list[tuple[int, bytes]], inodes: list[int]) -> None:
        """Tell the kernel to drop ENTRIES (parent inode, name) and INODES, from a thread: the
        kernel may need locks that requests still waiting for an answer hold."""
        messages = []
        for parent, name in entries:
            body = wire.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
            messages.append(OUT_HEADER.pack(OUT_HEADER.size + len(body), wire.NOTIFY_INVAL_ENTRY, 0)
                            + body)
        for ino in inodes:
            body = wire.NOTIFY_INVAL_INODE_OUT.pack(ino, 0, 0)
            messages.append(OUT_HEADER.pack(OUT_HEADER.size + len(body), wire.NOTIFY_INVAL_INODE, 0)
                            + body)
        self._in_loop(self._nursery.start_soon, partial(trio.to_thread.run_sync, self._notify,
                                                        messages, abandon_on_cancel=True))

    def _notify(self, messages: list[bytes]) -> None:
        for message in messages:
            try:
                os.write(self.fd, message)
            except OSError as e:  # ENOENT: not cached anyway
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    log.debug("notification failed: %s", e)
