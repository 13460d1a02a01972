"""Keeping the request loop on its client's CPU while requests come close together.

Through /dev/fuse a client waiting for a reply leaves its CPU idle, and waking an idle CPU
for the reply costs more than most requests where idle CPUs halt at once (a VM without
halt polling: tens of microseconds). The loop polls between requests (session._poll), but
on a CPU of its own, so every reply still wakes the client's. Together, a `Colocation`
moves the loop's thread to the CPU its client last ran on and makes it SCHED_IDLE from each
reply until it has the next request. The scheduler counts a CPU that runs only SCHED_IDLE
threads as free, so the reply wakes the client there and it preempts the loop at once; when
it sends its next request and waits, that CPU goes straight back to the polling loop.
Neither side is woken from idle, and the loop polls only on CPU time nobody else wants.
Requests are handled at the loop's own priority.

Together is not always faster: a client with work of its own after each reply then shares
one CPU with the loop instead of running beside it. Reading data is that case (the client
copies what it read; readahead asks for more without waiting): tar of every file, or a big
sequential read, took 10–20% longer together. So the loop stays apart while reads are a
quarter or more of the requests.

A SCHED_IDLE thread gets almost no CPU while normal ones want it, so the loop also stays
apart while more threads are runnable than it has CPUs (a look every CHECK_EVERY requests),
and for a while (OFF_FOR, doubling up to OFF_MAX) once two looks in a row, or a poll that
comes back late with a request waiting, find them so. Going back from
SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE of 20: without them (an unprivileged mount)
`possible()` says no and nothing changes.
"""

import logging
import os
import threading
import time

from unionfs import syscalls

log = logging.getLogger(__name__)

_PARAM = os.sched_param(0)
LOADAVG = "/proc/loadavg"  # its fourth field: threads runnable now / threads
CHECK_EVERY = 64  # requests between looks at the client's CPU and the machine's load
READS_APART = 0.25  # the share of reads of data in a check's requests that keeps it apart
STARVED = 0.005  # seconds a poll may come back late, with a request waiting, unremarked
OFF_FOR, OFF_MAX = 1.0, 60.0  # seconds apart after others were seen wanting the CPUs


def possible() -> bool:
    """Whether this process may make a thread SCHED_IDLE and turn it back (tried in a thread
    of its own, which ends either way)."""
    if os.sched_getscheduler(0) not in (os.SCHED_OTHER, os.SCHED_BATCH):
        return False  # (real-time or already idle: someone chose; leave it)
    if not os.access(LOADAVG, os.R_OK):
        return False
    turned_back = []

    def attempt():
        policy = os.sched_getscheduler(0)
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, _PARAM)
            os.sched_setscheduler(0, policy, _PARAM)
        except OSError:
            return
        turned_back.append(True)

    probe = threading.Thread(target=attempt, name="sched probe")
    probe.start()
    probe.join()
    return bool(turned_back)


class Colocation:
    """The polling loop's place and priority (see the module docstring); used by the thread
    that made it."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.policy = os.sched_getscheduler(0)
        self.idle = False  # whether the thread is SCHED_IDLE now
        self.broken = False  # the kernel refused a change: off for good
        self.enabled = False  # together now (from the first look that finds it pays)
        self._off_until = 0.0
        self._off_for = OFF_FOR
        self._was_crowded = False
        self._cpus = os.sched_getaffinity(0)  # (the CPUs this thread may use, at the last look)
        self._loadavg = os.open(LOADAVG, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        self.normal()
        os.close(self._loadavg)

    def before_reply(self) -> None:
        """Turn SCHED_IDLE, so that the reply wakes the client on this CPU."""
        if self.enabled and not self.idle and threading.get_ident() == self.thread:
            self._turn(os.SCHED_IDLE)

    def normal(self) -> None:
        """Back to the thread's own priority (a request to handle, or the loop sleeps)."""
        if self.idle:
            self._turn(self.policy)

    def _turn(self, policy: int) -> None:
        try:
            os.sched_setscheduler(0, policy, _PARAM)
        except OSError as e:  # (capabilities or limits changed under us: stop for good)
            if not self.broken:
                log.warning("colocation off: cannot change the loop's scheduling: %s", e.strerror)
            self.broken = True
            self.enabled = False
            return
        self.idle = policy == os.SCHED_IDLE

    def late(self) -> None:
        """A poll came back long after its time with a request waiting: others may want
        this CPU."""
        if self._crowded(self._cpus):
            self._back_off()
            self.enabled = False
            self.normal()

    def check(self, pid: int, reads: int) -> None:
        """Every CHECK_EVERY requests, READS of them reads of data: whether together pays,
        and if so following the client (thread PID, as the request's header gives it) to
        its CPU."""
        try:
            cpus = self._cpus = os.sched_getaffinity(0)
        except OSError:
            return
        crowded, self._was_crowded = self._was_crowded, self._crowded(cpus)
        if crowded and self._was_crowded:  # (twice running: not a kernel thread's moment)
            self._back_off()
        elif self.enabled:
            self._off_for = OFF_FOR  # (together, and uncrowded again: a next back-off is short)
        self.enabled = (not self.broken and not self._was_crowded
                        and reads < CHECK_EVERY * READS_APART and time.monotonic() >= self._off_until)
        if not self.enabled:
            self.normal()
            return
        cpu = _last_cpu(pid) if pid else None
        if cpu is not None and cpu in cpus and cpu != syscalls.current_cpu():
            try:
                os.sched_setaffinity(0, {cpu})  # (moves this thread there now)
                os.sched_setaffinity(0, cpus)  # (and lets the scheduler move it again)
            except OSError:  # (a CPU gone offline or out of our cpuset since)
                pass

    def _back_off(self) -> None:
        """Apart for a while, twice as long as last time if that was just before."""
        now = time.monotonic()
        if now < self._off_until:
            return
        self._off_until = now + self._off_for
        self._off_for = min(self._off_for * 2, OFF_MAX)

    def _crowded(self, cpus: set) -> bool:
        """More threads runnable on the machine than this thread has CPUs."""
        try:
            running = int(os.pread(self._loadavg, 128, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            return True
        return running > len(cpus)


def _last_cpu(pid: int) -> int | None:
    """The CPU thread PID last ran on, if it can be read."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 1024)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:  # (the command name, in parentheses, may hold spaces: count after its end)
        return int(data[data.rindex(b")") + 2:].split()[36])
    except (ValueError, IndexError):
        return None
