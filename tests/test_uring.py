"""`-o uring`: requests through FUSE over io_uring, a queue per CPU served by a thread on that
CPU (see unionfs.uring), with the same results as through /dev/fuse."""

import os
import subprocess
import sys
import time

import pytest

from conftest import tree, wait_filled

BIG = 8 << 20  # copied up in a worker thread, its reply sent from the loop's thread


def _queue_threads(pid: int) -> dict[str, int]:
    """The daemon's queue threads: name -> CPU time used (clock ticks)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            name = f.read().strip()
        if name.startswith("fuse queue"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            found[name] = int(fields[11]) + int(fields[12])  # utime + stime
    return found


def _on_cpu(cpu: int, code: str) -> None:
    """Run CODE (Python) in a process pinned to CPU, as a client of the mount there."""
    subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c", code], check=True,
                   timeout=60)


def test_requests_from_every_cpu_are_served_through_their_queue(union, fuse_uring):
    low = union["low"]
    (low / "d").mkdir()
    (low / "d/lower").write_bytes(b"lower data\n")
    big = os.urandom(BIG)
    (low / "big").write_bytes(big)
    (low / "gone").write_text("x")
    before = tree(low)
    union.mount("uring")
    assert "serving through FUSE over io_uring" in union.log.read_text()
    pid = union.daemon_pid()
    cpus = sorted(os.sched_getaffinity(0))
    for cpu in cpus:
        _on_cpu(cpu, f"""
import os
m = {str(union.mnt)!r}
os.makedirs(f"{{m}}/new{cpu}/sub")
for i in range(200):
    with open(f"{{m}}/new{cpu}/sub/f{{i}}", "wb") as f:
        f.write(b"%d" % i * 100)
        os.fsync(f.fileno())
os.rename(f"{{m}}/new{cpu}/sub/f0", f"{{m}}/new{cpu}/renamed")
assert sorted(os.listdir(f"{{m}}/new{cpu}/sub"))[:2] == ["f1", "f10"]
os.chown(f"{{m}}/d/lower", {cpu + 5}, {cpu + 5})
with open(f"{{m}}/d/lower", "ab") as f:
    f.write(b"appended on cpu {cpu}\\n")
""")
    # a change that waits for a copy-up in a worker (answered from the loop's thread)
    with open(union / "big", "r+b") as f:
        f.write(b"X")
    os.unlink(union / "gone")
    threads = _queue_threads(pid)
    assert len(threads) == len(cpus) and all(threads.values()), threads  # each one served

    want_lower = b"lower data\n" + b"".join(b"appended on cpu %d\n" % c for c in cpus)
    assert (union / "d/lower").read_bytes() == want_lower
    assert os.stat(union / "d/lower").st_uid == cpus[-1] + 5
    assert (union / "big").read_bytes() == b"X" + big[1:]
    assert not (union / "gone").exists()
    for cpu in cpus:
        assert (union / f"new{cpu}/renamed").read_bytes() == b"0" * 100
        assert len(os.listdir(union / f"new{cpu}/sub")) == 199
    up = union["up"]
    assert wait_filled(up) == []
    assert (up / "d/lower").read_bytes() == want_lower
    assert (up / "big").read_bytes() == b"X" + big[1:]
    assert (up / ".wh.gone").exists()
    assert (up / f"new{cpus[0]}/sub/f7").read_bytes() == b"7" * 100
    union.remount()
    assert (union / "d/lower").read_bytes() == want_lower
    assert tree(low) == before


def test_forgets_come_through_dev_fuse_meanwhile(union, fuse_uring):
    """The kernel still sends FORGET through /dev/fuse: the daemon must take them while
    requests flow through the queues, or it would hold every inode ever looked up."""
    (union["low"] / "many").mkdir()
    for i in range(2000):
        (union["low"] / f"many/f{i}").write_text("x")
    union.mount("uring", debug=True)
    for i in range(2000):
        os.stat(union / f"many/f{i}")
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
    os.stat(union / "many")  # (a request: the queue reads what waits in /dev/fuse after it)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if union.requests().count("batch_forget") + union.requests().count("forget"):
            break
        time.sleep(0.1)
    assert union.requests().count("batch_forget") + union.requests().count("forget") > 0


def test_without_the_kernel_setting_it_serves_dev_fuse(union):
    """With enable_uring off the option says so once and the mount works as without it."""
    from unionfs.uring import enabled

    if enabled():
        pytest.skip("FUSE over io_uring is on for the whole machine")
    (union["low"] / "f").write_text("lower\n")
    union.expected_log.append("-o uring: the kernel offers no FUSE over io_uring")
    union.mount("uring")
    with open(union / "f", "a") as f:
        f.write("more\n")
    assert (union / "f").read_text() == "lower\nmore\n"
    assert "serving through /dev/fuse" in union.log.read_text()
    assert not _queue_threads(union.daemon_pid())
    assert (union["low"] / "f").read_text() == "lower\n"
    assert wait_filled(union["up"]) == []
    assert (union["up"] / "f").read_text() == "lower\nmore\n"


def test_a_kernel_that_refuses_rings_leaves_dev_fuse_serving(union, fuse_uring):
    """Where io_uring itself is turned off (kernel.io_uring_disabled), the mount says so and
    serves /dev/fuse as without the option."""
    knob = "/proc/sys/kernel/io_uring_disabled"
    if not os.path.exists(knob):
        pytest.skip("no kernel.io_uring_disabled here")
    (union["low"] / "f").write_text("lower\n")
    union.expected_log.append("-o uring: ")
    with open(knob) as f:
        old = f.read().strip()
    with open(knob, "w") as f:
        f.write("2\n")
    try:
        union.mount("uring")
    finally:
        with open(knob, "w") as f:
            f.write(f"{old}\n")
    assert "serving through /dev/fuse" in union.log.read_text()
    assert not _queue_threads(union.daemon_pid())
    for i in range(100):
        (union / f"new{i}").write_text(str(i))
    os.rename(union / "f", union / "g")
    assert sorted(os.listdir(union.mnt))[:3] == ["g", "new0", "new1"]
    assert (union["up"] / "new99").read_text() == "99"
    assert (union["low"] / "f").read_text() == "lower\n"
