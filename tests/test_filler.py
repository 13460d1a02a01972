"""Metadata-only copies filled in the background (the default, `-o metacopy=fill`): a change
of a lower file's metadata copies no data at once; the copy gets its data soon after, and
before an unmount completes. A kill before that leaves copies that read their lower data."""

import os
import signal
import stat
import subprocess
import time

import pytest

from conftest import force_unmount, marked, pyunion, tree, wait_filled

BIG = 3 << 20  # copied in a worker thread (see unionfs.fs.THREAD_COPY_BYTES)
MTIME = 2_000_000_000


def _lower_files(union, count=150):
    """COUNT small files in two directories, one big file and an empty one; their data."""
    files = {}
    for i in range(count):
        files[f"d{i % 2}/f{i}"] = os.urandom(1 + i * 97)
    files["big"] = os.urandom(BIG)
    files["empty"] = b""
    for rel, data in files.items():
        p = union["low"] / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, ns=(1_000_000_000, MTIME))
    return files


def _check_whole(union, files, uid):
    """Every file is a whole, unmarked copy in the writable branch with the new owner and
    the lower file's data and times."""
    up = union["up"]
    assert marked(up) == []
    for rel, data in files.items():
        st = os.lstat(up / rel)
        assert (up / rel).read_bytes() == data, rel
        assert st.st_uid == uid and st.st_mtime_ns == MTIME, rel
        assert st.st_blocks * 512 >= min(len(data), 4096) or not data, rel  # (not sparse)


def test_copies_are_filled_once_changes_pause(union):
    files = _lower_files(union)
    before = tree(union["low"])
    union.mount()
    for rel in files:
        os.chown(union / rel, 1234, 1234)
    for rel, data in files.items():  # right away, whatever the branch holds yet
        assert (union / rel).read_bytes() == data
        assert os.stat(union / rel).st_uid == 1234
    assert wait_filled(union["up"]) == []
    _check_whole(union, files, 1234)
    for rel, data in files.items():  # the mount reads the copies now
        assert (union / rel).read_bytes() == data
    union.remount()
    for rel, data in files.items():
        assert (union / rel).read_bytes() == data
    assert tree(union["low"]) == before


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["fusermount", "sigterm", "noextras"])
def test_an_unmount_completes_the_fills(union, how):
    """However the mount ends, its copies are whole once its daemon has exited (which
    `pyunion umount` waits for)."""
    files = _lower_files(union)
    before = tree(union["low"])
    union.mount(*(["noextras"] if how == "noextras" else []))
    pid = union.daemon_pid()
    for rel in files:
        os.chown(union / rel, 4321, 4321)
    if how == "fusermount":
        subprocess.run(["fusermount3", "-u", union.mnt], check=True)
    elif how == "sigterm":
        os.kill(pid, signal.SIGTERM)
    else:
        assert pyunion("umount", union.mnt).returncode == 0
        assert _exited(pid)
        assert marked(union["up"]) == []
    deadline = time.monotonic() + 20
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _exited(pid)
    _check_whole(union, files, 4321)
    assert tree(union["low"]) == before


@pytest.mark.parametrize("option", ["metacopy=fill", "metacopy=off"])
def test_copies_left_by_a_kill_read_their_lower_data_and_are_filled_later(union, option):
    files = _lower_files(union)
    before = tree(union["low"])
    union.mount()
    for rel in files:
        os.chmod(union / rel, 0o600)
    os.kill(union.daemon_pid(), signal.SIGKILL)  # (well before the fills start)
    force_unmount(union.mnt)
    left = marked(union["up"])
    assert left  # (some at least: the kill came first)
    for rel, data in files.items():  # marked, or whole: never a half-filled copy unmarked
        if rel not in left:
            assert (union["up"] / rel).read_bytes() == data, rel
    union.mount(option)
    for rel, data in files.items():  # each read finds its copy marked, and queues it
        assert (union / rel).read_bytes() == data
        assert stat.S_IMODE(os.stat(union / rel).st_mode) == 0o600
    assert wait_filled(union["up"]) == []
    union.umount()
    for rel, data in files.items():
        assert (union["up"] / rel).read_bytes() == data
        assert os.lstat(union["up"] / rel).st_mtime_ns == MTIME
    assert tree(union["low"]) == before


def test_metacopy_on_keeps_copies_left_by_a_kill(union):
    files = _lower_files(union, 10)
    union.mount()
    for rel in files:
        os.chmod(union / rel, 0o600)
    os.kill(union.daemon_pid(), signal.SIGKILL)
    force_unmount(union.mnt)
    left = marked(union["up"])
    assert left  # (the kill came before the fills)
    union.mount("metacopy")
    for rel, data in files.items():
        assert (union / rel).read_bytes() == data
    time.sleep(0.3)
    assert marked(union["up"]) == left


def test_writes_during_the_fills_are_kept(union):
    """Writes and truncations of copies while they are filled: each one waits for its
    file's fill or comes after it, and no fill overwrites what it wrote."""
    files = _lower_files(union)
    before = tree(union["low"])
    union.mount()
    for rel in files:
        os.chown(union / rel, 77, 77)
    expected = {}
    for i, (rel, data) in enumerate(sorted(files.items())):
        if i % 3 == 0:
            with open(union / rel, "ab") as f:
                f.write(b"+more")
            expected[rel] = data + b"+more"
        elif i % 3 == 1:
            os.truncate(union / rel, len(data) // 2)
            expected[rel] = data[:len(data) // 2]
        else:
            expected[rel] = data
        time.sleep(0.001 * (i % 7))  # (some before the fills start, some during them)
    assert wait_filled(union["up"]) == []
    for rel, data in expected.items():
        assert (union / rel).read_bytes() == data, rel
        assert (union["up"] / rel).read_bytes() == data, rel
        assert os.stat(union / rel).st_uid == 77
    union.remount()
    for rel, data in expected.items():
        assert (union / rel).read_bytes() == data, rel
    assert tree(union["low"]) == before


def test_fills_keep_times_modes_and_later_changes(union):
    """A fill writes the file: it puts back the times and set-id bits that writing changed,
    and keeps the times set through the mount before it (see also
    test_changes_during_a_fill_wait_for_it)."""
    _lower_files(union, 0)
    for name, data in (("setuid", b"#!/bin/sh\n"), ("touched", b"some data")):
        p = union["low"] / name
        p.write_bytes(data)
        os.chmod(p, 0o755)
        os.utime(p, ns=(1_000_000_000, MTIME))
    union.mount()
    os.chmod(union / "setuid", 0o4755)
    os.chmod(union / "touched", 0o700)
    os.utime(union / "touched", ns=(5_000_000_000, 6_000_000_000))
    assert wait_filled(union["up"]) == []
    for where in (union["up"], union.mnt):
        st = os.lstat(where / "setuid")
        assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_mtime_ns == MTIME
        st = os.lstat(where / "touched")
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_mtime_ns == 6_000_000_000
    assert (union["up"] / "touched").read_bytes() == b"some data"


def test_removed_and_renamed_copies(union):
    """A copy removed before its fill is not filled (and leaves nothing behind); one renamed,
    or given a second name, is filled where it is now."""
    files = _lower_files(union, 6)
    union.mount()
    for rel in files:
        os.chmod(union / rel, 0o640)
    os.unlink(union / "d0/f0")
    os.rename(union / "d1/f1", union / "renamed")
    os.rename(union / "d0", union / "moved")
    os.link(union / "big", union / "big2")
    assert wait_filled(union["up"]) == []
    assert not (union / "d0").exists() and not (union["up"] / "d0/f0").exists()
    assert (union["up"] / "renamed").read_bytes() == files["d1/f1"]
    assert (union["up"] / "moved/f2").read_bytes() == files["d0/f2"]
    assert (union["up"] / "big2").read_bytes() == files["big"]
    assert os.lstat(union["up"] / "big").st_ino == os.lstat(union["up"] / "big2").st_ino
    union.umount()
    assert sorted(os.listdir(union["up"])) == [".wh.d0", "big", "big2", "d1", "empty", "moved",
                                               "renamed"]


def test_a_fill_whose_data_went_leaves_the_copy_marked(union):
    """Someone removed the lower file behind the mount's back: the copy cannot be filled;
    it stays a metadata-only copy (reading it answers EIO, as with metacopy=on) and the
    daemon says why."""
    _lower_files(union, 0)
    (union["low"] / "f").write_bytes(b"data")
    union.mount()
    os.chmod(union / "f", 0o600)
    os.unlink(union["low"] / "f")
    union.expected_log.append("cannot fill the metadata-only copy of b'f'")
    deadline = time.monotonic() + 10
    while "cannot fill" not in union.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marked(union["up"]) == ["f"]
    union.umount()
    assert marked(union["up"]) == ["f"]


def test_changes_during_a_fill_wait_for_it(union):
    """A chmod, utimes or chown sent while a big copy is being filled waits for the fill, so
    the times and mode the fill puts back (its writes change them) are not the old ones."""
    size = 256 << 20
    p = union["low"] / "huge"
    with open(p, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    os.utime(p, ns=(1_000_000_000, MTIME))
    union.mount()
    os.chmod(union / "huge", 0o600)
    up = union["up"] / "huge"
    deadline = time.monotonic() + 20
    while os.lstat(up).st_blocks == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert marked(union["up"]) == ["huge"]  # (being filled: a few tenths of a second)
    os.chmod(union / "huge", 0o640)
    os.utime(union / "huge", ns=(5_000_000_000, 6_000_000_000))
    os.chown(union / "huge", 42, 43)
    assert wait_filled(union["up"]) == []
    for where in (up, union / "huge"):
        st = os.lstat(where)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 6_000_000_000, where
        assert (st.st_uid, st.st_gid) == (42, 43)
    with open(p, "rb") as a, open(up, "rb") as b:
        while chunk := a.read(1 << 20):
            assert b.read(1 << 20) == chunk


def test_copies_made_without_pause_are_filled_within_a_second(union):
    files = _lower_files(union, 80)
    union.mount()
    start = time.monotonic()
    for rel in files:  # one every 20 ms: never the pause the filler waits for
        os.chmod(union / rel, 0o600)
        time.sleep(0.02)
    assert time.monotonic() - start > 1.5
    left = marked(union["up"])
    assert len(left) < len(files) / 2, left  # the first ones were filled meanwhile
    assert wait_filled(union["up"]) == []


def test_a_full_disk_leaves_the_copies_reading_their_lower_data(make_union):
    """Fills that do not fit: each one that fails is emptied again and keeps its mark, so it
    reads its lower file; the daemon says so, serves on and exits cleanly."""
    u = make_union(("up", "rw"), ("low", "ro+wh"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", u["up"]], check=True)
    try:
        files = {f"f{i}": os.urandom(700_000) for i in range(4)}
        for name, data in files.items():
            (u["low"] / name).write_bytes(data)
        before = tree(u["low"])
        u.expected_log.append("cannot fill a metadata-only copy (No space left on device)")
        u.mount()
        for name in files:
            os.chmod(u / name, 0o600)
        deadline = time.monotonic() + 10
        while "No space left" not in u.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        for name, data in files.items():
            assert (u / name).read_bytes() == data
        u.umount()
        left = marked(u["up"])
        assert 1 <= len(left) < len(files)  # (two fit in 2 MiB)
        for name, data in files.items():  # whole, or marked and empty: never half-filled
            st = os.lstat(u["up"] / name)
            if name in left:
                assert st.st_blocks == 0, name
            else:
                assert (u["up"] / name).read_bytes() == data, name
            assert stat.S_IMODE(st.st_mode) == 0o600
        u.mount()
        for name, data in files.items():
            assert (u / name).read_bytes() == data
        u.umount()
        assert tree(u["low"]) == before
    finally:
        subprocess.run(["umount", "-l", u["up"]], capture_output=True)
