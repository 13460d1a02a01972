"""The merged view: precedence, directory merging, whiteouts, opaque directories, listings."""

import os
import stat
import subprocess
import threading

import pytest


def test_top_branch_wins_and_lower_shows_through(union):
    (union["up"] / "both").write_text("up")
    (union["low"] / "both").write_text("low")
    (union["low"] / "only-low").write_text("L")
    union.mount()
    assert (union / "both").read_text() == "up"
    assert (union / "only-low").read_text() == "L"
    assert sorted(os.listdir(union.mnt)) == ["both", "only-low"]


def test_non_directory_hides_directory_below(union):
    (union["up"] / "x").write_text("file")
    (union["low"] / "x").mkdir()
    (union["low"] / "x" / "inner").write_text("hidden")
    union.mount()
    assert (union / "x").is_file() and (union / "x").read_text() == "file"


def test_directories_merge(make_union):
    u = make_union(("a", "rw"), ("b", "ro+wh"), ("c", "ro+wh"))
    for n in "abc":
        (u[n] / "d").mkdir()
        (u[n] / "d" / n).write_text(n)
    u.mount()
    assert sorted(os.listdir(u / "d")) == ["a", "b", "c"]
    assert (u / "d" / "c").read_text() == "c"


def test_whiteout_hides_only_below(make_union):
    u = make_union(("a", "rw"), ("b", "ro+wh"), ("c", "ro+wh"))
    (u["b"] / "keep").write_text("b")  # same branch as the whiteout: stays
    (u["b"] / ".wh.keep").write_text("")
    (u["c"] / "keep").write_text("c")
    (u["c"] / "gone").write_text("c")
    (u["b"] / ".wh.gone").write_text("")
    u.mount()
    assert (u / "keep").read_text() == "b"
    assert not (u / "gone").exists()
    assert sorted(os.listdir(u.mnt)) == ["keep"]


def test_opaque_marker_hides_lower_content(union):
    (union["up"] / "d").mkdir()
    (union["up"] / "d" / ".wh..wh..opq").write_text("")
    (union["up"] / "d" / "new").write_text("n")
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "old").write_text("o")
    union.mount()
    assert os.listdir(union / "d") == ["new"]
    assert not (union / "d" / "old").exists()


@pytest.mark.parametrize("xattr", ["trusted.overlay.opaque", "user.overlay.opaque"])
def test_overlayfs_opaque_xattr_in_lower(make_union, xattr):
    u = make_union(("up", "rw"), ("mid", "ro+wh"), ("low", "ro+wh"))
    (u["mid"] / "d").mkdir()
    (u["mid"] / "d" / "mine").write_text("m")
    os.setxattr(u["mid"] / "d", xattr, b"y")
    (u["low"] / "d").mkdir()
    (u["low"] / "d" / "old").write_text("o")
    u.mount()
    assert os.listdir(u / "d") == ["mine"]
    assert xattr not in os.listxattr(u / "d")


def test_overlayfs_char_device_whiteout_in_lower(make_union):
    u = make_union(("up", "rw"), ("mid", "ro+wh"), ("low", "ro+wh"))
    os.mknod(u["mid"] / "gone", stat.S_IFCHR | 0o600, 0)
    (u["low"] / "gone").write_text("x")
    (u["low"] / "stays").write_text("y")
    u.mount()
    assert os.listdir(u.mnt) == ["stays"]
    assert not os.path.lexists(u / "gone")


def test_ro_branch_ignores_whiteouts(make_union):
    u = make_union(("up", "rw"), ("mid", "ro"), ("low", "ro+wh"))
    (u["mid"] / ".wh.f").write_text("")
    (u["low"] / "f").write_text("still here")
    u.mount()
    assert (u / "f").read_text() == "still here"
    assert os.listdir(u.mnt) == ["f"]


def test_internal_names_never_visible(union):
    (union["up"] / ".wh.x").write_text("")
    (union["up"] / ".wh..wh..opq").write_text("")
    union.mount()
    names = os.listdir(union.mnt)
    assert names == [] and not (union / ".wh.x").exists()
    assert not (union / ".wh..wh.pyunion").exists()


@pytest.mark.parametrize("make", [
    lambda p: open(p, "w").close(),
    lambda p: os.mkdir(p),
    lambda p: os.symlink("t", p),
    lambda p: os.mknod(p, stat.S_IFIFO | 0o600),
])
def test_cannot_create_whiteout_names(union, make):
    union.mount()
    with pytest.raises(OSError):
        make(union / ".wh.sneaky")
    assert not os.path.lexists(union["up"] / ".wh.sneaky")


def test_readdir_dot_entries_and_types(union):
    (union["up"] / "f").write_text("x")
    (union["low"] / "d").mkdir()
    os.symlink("f", union["low"] / "l")
    os.mknod(union["low"] / "p", stat.S_IFIFO | 0o644)
    union.mount()
    out = subprocess.run(["ls", "-fa", union.mnt], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(out) == [".", "..", "d", "f", "l", "p"]
    kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(), e.is_file(follow_symlinks=False))
             for e in os.scandir(union.mnt)}
    assert kinds == {"d": (True, False, False), "f": (False, False, True),
                     "l": (False, True, False), "p": (False, False, False)}
    assert stat.S_ISFIFO(os.lstat(union / "p").st_mode)


def test_readdir_consistent_under_concurrent_changes(union):
    for i in range(300):
        (union["low" if i % 2 else "up"] / f"keep{i:03}").write_text("k")
        (union["low"] / f"victim{i:03}").write_text("v")
    union.mount()
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            p = union / f"victim{i % 300:03}"
            try:
                os.unlink(p)
            except FileNotFoundError:
                p.write_text("again")
            (union / f"new{i}").write_text("n")
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(5):
            names = []
            with os.scandir(union.mnt) as it:
                for e in it:
                    names.append(e.name)
            assert len(names) == len(set(names)), "a name was listed twice"
            keeps = {n for n in names if n.startswith("keep")}
            assert keeps == {f"keep{i:03}" for i in range(300)}, "a survivor was skipped"
    finally:
        stop.set()
        t.join()


def test_lower_branches_never_modified(union):
    (union["low"] / "d").mkdir()
    (union["low"] / "d" / "f").write_text("orig")
    from conftest import tree
    before = tree(union["low"])
    union.mount()
    (union / "d" / "f").write_text("changed")
    os.chmod(union / "d", 0o700)
    os.unlink(union / "d" / "f")
    os.rename(union / "d", union / "e")
    union.umount()
    assert tree(union["low"]) == before


def test_names_only_listings(make_union):
    """readdirplus=auto: long listings go out as plain READDIR (names, types, inode numbers),
    merged exactly like the full ones, with the inode numbers stat() gives."""
    u = make_union(("up", "rw"), ("mid", "ro+wh"), ("low", "ro+wh"), options=["readdirplus=auto"])
    d = "d"
    for n in ("up", "mid", "low"):
        (u[n] / d).mkdir()
    expected = set()
    for i in range(1500):  # several listing requests' worth, spread over the three branches
        (u[("up", "mid", "low")[i % 3]] / d / f"file-{i:04}").write_text(str(i))
        expected.add(f"file-{i:04}")
    for i in range(0, 1500, 7):  # every branch also holds names that upper ones hide
        (u["low"] / d / f"file-{i:04}").write_text("hidden by an upper copy")
    (u["mid"] / d / ".wh.gone").write_text("")
    (u["low"] / d / "gone").write_text("whited out")
    os.mknod(u["mid"] / d / "gone-too", stat.S_IFCHR | 0o600, 0)
    (u["low"] / d / "gone-too").write_text("whited out by an overlayfs whiteout")
    (u["low"] / d / "sub").mkdir()
    os.symlink("file-0000", u["mid"] / d / "link")
    os.mknod(u["low"] / d / "fifo", stat.S_IFIFO | 0o600)
    expected |= {"sub", "link", "fifo"}
    before = {n: os.listdir(u[n] / d) for n in ("mid", "low")}
    u.mount(debug=True)
    (u / d / "file-0001").write_text("copied up")  # a lower file, now in the top branch

    def check():
        entries = list(os.scandir(u / d))
        assert sorted(e.name for e in entries) == sorted(expected)
        for e in entries:
            st = os.lstat(e.path)
            assert e.inode() == st.st_ino, e.name
            assert (e.is_dir(follow_symlinks=False), e.is_symlink(), e.is_file(follow_symlinks=False)) \
                == (stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode), stat.S_ISREG(st.st_mode)), e.name

    check()
    with open("/proc/sys/vm/drop_caches", "w") as f:  # list again, from the daemon
        f.write("2")
    check()
    assert u.requests().count("readdir") >= 2, "the plain listing was not used"
    assert (u / d / "file-0001").read_text() == "copied up"
    assert (u["up"] / d / "file-0001").read_text() == "copied up"
    assert {n: os.listdir(u[n] / d) for n in ("mid", "low")} == before


def test_interleaved_listings_of_one_directory(union):
    for i in range(3000):
        (union["low" if i % 2 else "up"] / f"entry-with-a-long-name-{i:05}").write_text("")
    union.mount()
    a, b = os.scandir(union.mnt), os.scandir(union.mnt)
    seen_a, seen_b = [], []
    try:
        for step in range(10_000):
            for it, seen in ((a, seen_a), (b, seen_b)):
                entry = next(it, None)
                if entry is not None:
                    seen.append(entry.name)
            if step % 500 == 0:  # a change between reads drops the kernel's cached listing
                (union / f"new-{step}").write_text("")
            if len(seen_a) >= 3000 and len(seen_b) >= 3000 and step > 3100:
                break
    finally:
        a.close()
        b.close()
    expected = {f"entry-with-a-long-name-{i:05}" for i in range(3000)}
    for seen in (seen_a, seen_b):
        assert len(seen) == len(set(seen)), "a name was listed twice"
        assert expected <= set(seen), "a survivor was skipped"
