"""FUSE over io_uring: each CPU's requests answered by a thread on that CPU (`-o uring`).

With /dev/fuse, a request made on one CPU wakes the daemon on whichever CPU it sleeps on and
the reply wakes the caller back across CPUs: in a VM that wake-up costs more than most
requests. Since Linux 6.14 the kernel can queue requests per CPU on io_uring instead (the
fuse module's `enable_uring` parameter turns it on): the request wakes the thread that serves
that CPU's queue, on that CPU, and the reply (a COMMIT_AND_FETCH command, which also asks for
the next request) wakes the caller there. This module owns the rings: one per CPU, each with
a few entries (a header buffer and a payload buffer the kernel fills with a request), served
by a thread pinned to the CPU. The session's handlers run in those threads, one at a time
(see Session.lock); FORGET and INTERRUPT still come through /dev/fuse.

A reply made later by another thread (a request that waited for a copy-up, an fsync in a
worker) goes to the queue's outbox; an eventfd read on the queue's own ring wakes its thread,
which commits it. Commands are always submitted by the queue's own thread: the kernel fills
an entry with the next request in the context of the thread that submitted its command.
"""

import ctypes
import errno
import logging
import mmap
import os
import select
import struct
import threading

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

PR_SET_NAME = 15
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SETUP_SQE128 = 1 << 10
ENTER_GETEVENTS = 1
OFF_SQ_RING = 0
OFF_SQES = 0x10000000
SQE_SIZE = 128
OP_READ = 22
OP_URING_CMD = 46
CMD_REGISTER = 1
CMD_COMMIT_AND_FETCH = 2

ENABLE_PARAMETER = "/sys/module/fuse/parameters/enable_uring"

# struct fuse_uring_req_header: in_out[128] (fuse_in_header / fuse_out_header), op_in[128]
# (the request's first argument), ring_ent_in_out {flags, commit_id, payload_sz, ...}
HEADER_SIZE = 288
OP_IN = 128
ENT_IN_OUT = 256
CMD_REQ = struct.Struct("=QQH6x")  # flags commit_id qid
SQE = struct.Struct("=BBHiIIQIIQ")  # opcode flags ioprio fd cmd_op pad addr len op_flags user_data
CQE = struct.Struct("=QiI")  # user_data res flags
WAKE = 1 << 32  # user_data of the eventfd read that wakes a queue's thread

ENTRIES_PER_QUEUE = 8  # requests a CPU can have in flight (waiting for a copy-up, say)


def enabled() -> bool:
    """Whether the running kernel lets FUSE daemons use io_uring (the fuse module's
    enable_uring parameter, root's to set)."""
    try:
        with open(ENABLE_PARAMETER) as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", ctypes.c_uint32 * 8), ("sq_user_addr", ctypes.c_uint64),
                ("cq_off", ctypes.c_uint32 * 8), ("cq_user_addr", ctypes.c_uint64)]


class Ring:
    """An io_uring instance with 128-byte submission entries, used by one thread."""

    def __init__(self, entries: int):
        p = _Params()
        p.flags = SETUP_SQE128
        fd = _libc.syscall(SYS_IO_URING_SETUP, entries, ctypes.byref(p))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = fd
        try:
            sq, cq = list(p.sq_off), list(p.cq_off)
            size = max(sq[6] + p.sq_entries * 4, cq[5] + p.cq_entries * CQE.size)
            self._rings = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                    offset=OFF_SQ_RING)
            self._sqes = mmap.mmap(fd, p.sq_entries * SQE_SIZE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=OFF_SQES)
        except BaseException:
            os.close(fd)
            raise

        def u32(off):
            return ctypes.c_uint32.from_buffer(self._rings, off)

        self._sq_tail, self._sq_mask, self._sq_array = u32(sq[1]), u32(sq[2]).value, sq[6]
        self._cq_head, self._cq_tail = u32(cq[0]), u32(cq[1])
        self._cq_mask, self._cqes = u32(cq[2]).value, cq[5]
        self._pending = 0

    @staticmethod
    def make(opcode: int, fd: int, cmd_op: int, addr: int, length: int, user_data: int,
             cmd: bytes = b"") -> bytearray:
        """A submission entry."""
        sqe = bytearray(SQE_SIZE)
        SQE.pack_into(sqe, 0, opcode, 0, 0, fd, cmd_op, 0, addr, length, 0, user_data)
        sqe[48:48 + len(cmd)] = cmd  # (the command area)
        return sqe

    def push(self, sqe) -> None:
        """Queue submission entry SQE (sent by the next enter())."""
        tail = self._sq_tail.value
        index = tail & self._sq_mask
        off = index * SQE_SIZE
        self._sqes[off:off + SQE_SIZE] = sqe
        struct.pack_into("=I", self._rings, self._sq_array + index * 4, index)
        self._sq_tail.value = tail + 1  # (x86 and CPython keep the stores in order)
        self._pending += 1

    def enter(self, wait: int) -> None:
        """Submit what is queued; with WAIT, sleep until that many completions are there."""
        done = _libc.syscall(SYS_IO_URING_ENTER, self.fd, self._pending, wait,
                             ENTER_GETEVENTS if wait else 0, None, 0)
        if done < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                return
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        self._pending -= done

    def completions(self) -> list[tuple[int, int]]:
        """The completions there: (user_data, result)."""
        head, tail = self._cq_head.value, self._cq_tail.value
        found = []
        while head != tail:
            user_data, res, _ = CQE.unpack_from(self._rings, self._cqes + (head & self._cq_mask) * CQE.size)
            found.append((user_data, res))
            head += 1
        self._cq_head.value = head
        return found

    def close(self) -> None:
        del self._sq_tail, self._cq_head, self._cq_tail  # (views into the mapping)
        self._sqes.close()
        self._rings.close()
        os.close(self.fd)


class _Entry:
    """One request buffer registered with the kernel: its header and payload."""

    def __init__(self, payload_size: int):
        self.header = ctypes.create_string_buffer(HEADER_SIZE)
        # (mapped, not allocated: its pages cost memory only once a request or reply uses them)
        self.payload = mmap.mmap(-1, payload_size)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.payload))
        self.iov = (ctypes.c_uint64 * 4)(ctypes.addressof(self.header), HEADER_SIZE,
                                         address, payload_size)
        self.header_view = memoryview(self.header).cast("B")
        self.payload_view = memoryview(self.payload)
        self.commit = bytearray(SQE_SIZE)  # its COMMIT_AND_FETCH command, but the commit id


class Queue:
    """The ring of one CPU and the thread that serves it (see the module docstring)."""

    def __init__(self, server: "Queues", qid: int):
        self.server = server
        self.qid = qid
        self.entries = [_Entry(server.payload_size) for _ in range(ENTRIES_PER_QUEUE)]
        self.outbox: list[tuple[int, int, list]] = []
        self.outbox_lock = threading.Lock()
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._wake_buf = ctypes.create_string_buffer(8)
        self.ring = Ring(4 * ENTRIES_PER_QUEUE)  # (made here: a kernel that refuses says so now)
        self._early: list[tuple[int, int]] = []  # completions seen while registering
        self.thread = threading.Thread(target=self._run, name=f"fuse queue {qid}", daemon=True)
        self.started = threading.Event()
        self.failure: OSError | None = None

    def reply(self, index: int, err: int, parts) -> None:
        """Answer the request in entry INDEX (from any thread)."""
        if threading.get_ident() == self.thread.ident:
            self._commit(index, err, parts)
        else:
            with self.outbox_lock:
                self.outbox.append((index, err, list(parts)))
            os.eventfd_write(self.wake_fd, 1)

    def _commit(self, index: int, err: int, parts) -> None:
        entry = self.entries[index]
        body = b"".join(parts)
        header = entry.header_view
        unique = struct.unpack_from("=Q", header, 8)[0]
        struct.pack_into("=IiQ", header, 0, 16 + len(body), -err, unique)
        entry.payload_view[:len(body)] = body
        struct.pack_into("=I", header, ENT_IN_OUT + 16, len(body))
        commit = entry.commit
        commit[56:64] = header[ENT_IN_OUT + 8:ENT_IN_OUT + 16]  # (the command's commit_id)
        self.ring.push(commit)

    def _arm_wake(self) -> None:
        self.ring.push(self._wake)

    def _run(self) -> None:
        _libc.prctl(PR_SET_NAME, self.thread.name.encode()[:15], 0, 0, 0)  # (for top -H, ps -L)
        try:
            try:
                os.sched_setaffinity(0, {self.qid})
            except OSError:  # (a CPU possible but offline, or not ours: served from anywhere)
                pass
            fd = self.server.fd
            for i, entry in enumerate(self.entries):
                self.ring.push(Ring.make(OP_URING_CMD, fd, CMD_REGISTER, ctypes.addressof(entry.iov),
                                         2, i, CMD_REQ.pack(0, 0, self.qid)))
                entry.commit[:] = Ring.make(OP_URING_CMD, fd, CMD_COMMIT_AND_FETCH, 0, 0, i,
                                            CMD_REQ.pack(0, 0, self.qid))
            self._wake = Ring.make(OP_READ, self.wake_fd, 0, ctypes.addressof(self._wake_buf), 8,
                                   WAKE)
            self._arm_wake()
            self.ring.enter(0)
            # a refused registration completes at once (the kernel then goes on with /dev/fuse)
            self._early = self.ring.completions()
            for user_data, res in self._early:
                if user_data != WAKE and res < 0:
                    raise OSError(-res, f"registering queue {self.qid}: {os.strerror(-res)}")
        except OSError as e:
            self.failure = e
            self.ring.close()
            os.close(self.wake_fd)
            return
        finally:
            self.started.set()
        try:
            self._serve()
        finally:
            self.ring.close()
            os.close(self.wake_fd)

    def _serve(self) -> None:
        """Answer the queue's requests until the file system is unmounted."""
        ring = self.ring
        buf = bytearray(self.server.payload_size + 4096)
        drain = self.server.drain
        device = select.poll()  # (cheaper than a read that fails when nothing waits)
        device.register(self.server.fd, select.POLLIN)
        device_waits = device.poll
        completions = self._early
        while True:
            for user_data, res in completions:
                if res in (-errno.ENOTCONN, -errno.ECANCELED, -errno.ECONNABORTED):
                    return  # unmounted
                try:
                    if user_data == WAKE:
                        self._send_replies()
                    elif res >= 0:
                        self._take(user_data, buf)
                    else:  # (the kernel keeps the entry out of use)
                        log.error("FUSE queue %d, entry %d: %s", self.qid, user_data,
                                  os.strerror(-res))
                except Exception:  # noqa: BLE001 - a stopped queue would hang its CPU's callers
                    log.exception("FUSE queue %d: unexpected error; serving on", self.qid)
            if device_waits(0):
                drain(buf)
            try:
                ring.enter(1)
            except OSError as e:
                log.error("FUSE queue %d: %s", self.qid, e.strerror)
            completions = ring.completions()

    def _send_replies(self) -> None:
        """Commit the replies other threads left in the outbox, and wait for more."""
        with self.outbox_lock:
            replies, self.outbox = self.outbox, []
        self._arm_wake()
        for index, err, parts in replies:
            self._commit(index, err, parts)

    def _take(self, index: int, buf: bytearray) -> None:
        """Hand the request in entry INDEX to the session (an I/O error if it cannot)."""
        try:
            self._lay_out(index, buf)
        except Exception:  # noqa: BLE001 - answered, so that its caller goes on
            log.exception("FUSE queue %d: a request could not be read", self.qid)
            self._commit(index, errno.EIO, ())

    def _lay_out(self, index: int, buf: bytearray) -> None:
        """Hand the request in entry INDEX to the session, laid out as /dev/fuse gives it."""
        entry = self.entries[index]
        header = entry.header_view
        length = struct.unpack_from("=I", header, 0)[0]
        payload = struct.unpack_from("=I", header, ENT_IN_OUT + 16)[0]
        first = length - 40 - payload  # (the size of the request's first argument)
        buf[:40] = header[:40]
        buf[40:40 + first] = header[OP_IN:OP_IN + first]
        buf[40 + first:length] = entry.payload_view[:payload]
        self.server.dispatch(buf, length, self, index)


class Queues:
    """FUSE over io_uring for a mounted session: a queue per CPU (see the module docstring)."""

    def __init__(self, fd: int, payload_size: int, dispatch, drain):
        """FD: the session's /dev/fuse; PAYLOAD_SIZE: at least the biggest request or reply
        (max_write, max_pages); DISPATCH(buf, length, queue, index): handle a request;
        DRAIN(buf): handle what waits in /dev/fuse (after each round of requests)."""
        self.fd = fd
        self.payload_size = payload_size
        self.dispatch = dispatch
        self.drain = drain
        self.queues: list[Queue] = []
        try:
            for qid in range(_possible_cpus()):
                self.queues.append(Queue(self, qid))
        except BaseException:
            for q in self.queues:
                q.ring.close()
                os.close(q.wake_fd)
            raise

    def start(self) -> None:
        """Register every queue's entries (after the INIT reply); OSError if the kernel
        refuses (then it goes on with /dev/fuse)."""
        for q in self.queues:
            q.thread.start()
            q.started.wait()
            if q.failure is not None:
                raise q.failure


def _possible_cpus() -> int:
    """How many queues the kernel expects: one per possible CPU."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            last = f.read().strip().split(",")[-1]
        return int(last.split("-")[-1]) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1
