"""A big copy-up neither stalls the mount nor, when the daemon is killed, leaves a half copy."""

import os
import subprocess
import sys
import time

from conftest import is_mounted, kill_while_writing, wait_filled, work_leftovers

SIZE = 1 << 30


def _write_big(path):
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        for _ in range(SIZE // len(chunk)):
            f.write(chunk)
    return chunk


def _wait_for_partial_copy(work, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for name in os.listdir(work):
                size = os.lstat(work / name).st_size
                if 0 < size < SIZE:
                    return work / name
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise AssertionError("never saw the copy-up in progress")


def test_kill_during_large_copy_up_leaves_old_content(union):
    chunk = _write_big(union["low"] / "big")
    (union["low"] / "other").write_text("served meanwhile")
    union.mount()

    def meanwhile():
        tmp = _wait_for_partial_copy(union["up"] / ".wh..wh.pyunion")
        # the mount keeps serving while the copy runs in a worker thread
        assert (union / "other").read_text() == "served meanwhile"
        assert sorted(os.listdir(union.mnt)) == ["big", "other"]
        assert 0 < os.lstat(tmp).st_size < SIZE, "the copy-up finished before the other requests"

    kill_while_writing(union, "big", meanwhile)
    assert not is_mounted(union.mnt)
    assert not (union["up"] / "big").exists(), "a half-made copy was published"
    union.mount()  # a new daemon cleans the work area
    assert os.listdir(union["up"] / ".wh..wh.pyunion") == [], "the work area was not cleaned"
    assert os.path.getsize(union / "big") == SIZE
    with open(union / "big", "rb") as f:
        assert f.read(len(chunk)) == chunk
        f.seek(SIZE - len(chunk))
        assert f.read() == chunk
    assert os.path.getsize(union["low"] / "big") == SIZE


def test_full_disk_during_copy_up_publishes_nothing(make_union, tmp_path):
    import errno

    import pytest

    u = make_union(("up", "rw"), ("low", "ro+wh"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", u["up"]], check=True)
    try:
        data = os.urandom(3 << 20)
        (u["low"] / "big").write_bytes(data)
        (u["low"] / "small").write_text("fits")
        u.mount()
        with pytest.raises(OSError) as e:
            with open(u / "big", "r+b") as f:  # (an append would copy no data)
                f.write(b"x")
        assert e.value.errno == errno.ENOSPC
        assert (u / "big").read_bytes() == data  # still the lower file, whole
        assert not (u["up"] / "big").exists()
        assert work_leftovers(u["up"] / ".wh..wh.pyunion") == []  # the partial copy was removed
        with open(u / "small", "a") as f:  # the mount still works
            f.write("+")
        assert (u / "small").read_text() == "fits+"
        assert wait_filled(u["up"]) == [] and (u["up"] / "small").read_text() == "fits+"
        u.umount()
    finally:
        subprocess.run(["umount", "-l", u["up"]], capture_output=True)
    assert (u["low"] / "big").read_bytes() == data


def test_removal_during_a_copy_up_wins(union):
    """Removing a file while its copy-up runs: the file ends removed, with no copy left."""
    _write_big(union["low"] / "big")
    union.mount()
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(union / 'big')!r}, 'r+b').write(b'NEW')"],
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for_partial_copy(union["up"] / ".wh..wh.pyunion")
        os.unlink(union / "big")  # (the kernel holds it until the write's copy-up is done)
        writer.wait(60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert not (union / "big").exists()
    assert not (union["up"] / "big").exists(), "the finished copy brought a removed file back"
    assert work_leftovers(union["up"] / ".wh..wh.pyunion") == []
    assert os.path.getsize(union["low"] / "big") == SIZE
