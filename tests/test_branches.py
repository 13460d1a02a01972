"""Unit tests without a mount: branch specs, whiteout names, inode numbers, branch directory fds."""

import os

import pytest

from unionfs.branches import BranchSpec, format_branches, parse_branches, split_spec
from unionfs.errors import UsageError
from unionfs.mountcmd import overlay_branches, parse_options
from unionfs.whiteout import is_internal_xattr, is_reserved, whited_out, whiteout_name


def test_default_modes_first_rw_rest_ro_wh():
    assert parse_branches("/a:/b:/c") == [
        BranchSpec("/a", "rw"), BranchSpec("/b", "ro+wh"), BranchSpec("/c", "ro+wh")]


def test_explicit_modes():
    assert parse_branches("/a=ro:/b=rw:/c=ro+wh") == [
        BranchSpec("/a", "ro"), BranchSpec("/b", "rw"), BranchSpec("/c", "ro+wh")]


def test_escaped_colon_and_backslash():
    assert split_spec(r"/a\:b:/c\\d") == ["/a:b", "/c\\d"]
    assert parse_branches(r"/x\:y=ro") == [BranchSpec("/x:y", "ro")]


def test_format_round_trip():
    specs = [BranchSpec("/we:ird", "rw"), BranchSpec("/b\\", "ro")]
    assert parse_branches(format_branches(specs)) == specs


@pytest.mark.parametrize("spec", ["", "/a::/b", "/a=bogus", "=rw"])
def test_bad_specs(spec):
    with pytest.raises(UsageError):
        parse_branches(spec)


def test_whiteout_names():
    assert whiteout_name(b"x") == b".wh.x"
    assert whited_out(b".wh.x") == b"x"
    assert whited_out(b".wh..wh..opq") is None
    assert whited_out(b"plain") is None
    assert is_reserved(b".wh.anything") and not is_reserved(b"wh.x")
    assert is_internal_xattr(b"trusted.overlay.opaque") and not is_internal_xattr(b"user.mime")


def test_overlay_options_map_to_branches():
    o = parse_options(["lowerdir=/l1:/l2,upperdir=/u,workdir=/w,nodev,bogus"])
    assert o.unknown == ["bogus"] and o.kernel_flags == ["nodev"]
    assert overlay_branches(o.lowerdir, o.upperdir, o.workdir) == [
        BranchSpec("/u", "rw"), BranchSpec("/l1", "ro+wh"), BranchSpec("/l2", "ro+wh")]
    with pytest.raises(UsageError):
        overlay_branches("/l", "/u", None)


def test_timeouts_parse():
    o = parse_options(["timeout=2.5", "attr_timeout=1"])
    assert (o.entry_timeout, o.attr_timeout, o.negative_timeout) == (2.5, 1.0, 2.5)
    with pytest.raises(UsageError):
        parse_options(["timeout=soon"])


def test_inode_numbers_stable_and_collision_free():
    from unionfs.inodes import ROOT_INO, InodeTable, Node

    table = InodeTable(Node(ROOT_INO, (1, 1), b"", 0, True))
    a, b = (7, 100), (7, 101)
    ino_a = table.ino_for(a)
    assert ino_a == table.ino_for(a) and ino_a not in (0, ROOT_INO)
    # another entry already holds a's number: a gets a different one, and keeps it
    squatter = Node(ino_a, b, b"x", 0, False)
    table.add(squatter)
    other = table.ino_for(a)
    assert other != ino_a
    table.add(Node(other, a, b"y", 0, False))
    table.unref(squatter, 0)
    assert table.ino_for(a) == other


def test_inode_numbers_not_reused_while_the_kernel_holds_them():
    """A filesystem reuses the inode number of a removed file for a new one, and the kernel may
    still hold the old file (open, or its FORGET still queued behind newer requests): the new
    file's node must not get the old node's number, or the kernel mixes the two up."""
    from unionfs.inodes import ROOT_INO, InodeTable, Node

    table = InodeTable(Node(ROOT_INO, (1, 1), b"", 0, True))
    key = (7, 100)
    old = Node(table.ino_for(key), key, b"removed", 0, False)
    table.add(old)
    old.lookups = 2
    del table.by_key[key]  # the old file is gone: lookups by key no longer find it
    new = table.ino_for(key)
    assert new != old.ino
    table.add(Node(new, key, b"created", 0, False))
    assert table.get(old.ino) is old  # the kernel's FORGET for the old one still finds it
    table.unref(old, 2)
    assert old.ino not in table.by_ino


def test_dir_fd_cache_forgets_a_directory_and_all_below_it_only(tmp_path):
    """forget(PATH) closes the fds of PATH and of everything below it, in every branch, and
    of nothing else: not of siblings whose names sort between PATH and PATH/ ("a b", "a.b"),
    nor of a directory whose name merely starts with PATH's ("ab"); eviction keeps this true."""
    from unionfs.branches import BranchSpec
    from unionfs.layers import Branch, DirFdCache

    names = [b"a", b"a/b", b"a/b/c", b"a b", b"a b/x", b"a.b", b"ab", b"ab/a", b"z"]
    branches = []
    for i in range(2):
        root = tmp_path / str(i)
        for n in names:
            (root / n.decode()).mkdir(parents=True)
        for n in ("y1", "y2", "y3"):
            (root / n).mkdir()
        branches.append(Branch(i, BranchSpec(str(root), "ro")))
    cache = DirFdCache(branches, size=len(names) * 2)
    held = {(b, n): cache.get(b, n) for b in range(2) for n in names}

    def is_open(fd):
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False

    cache.forget(b"a")
    gone = {(b, n) for b in range(2) for n in (b"a", b"a/b", b"a/b/c")}
    for key, fd in held.items():
        assert is_open(fd) == (key not in gone), key
        assert (cache.cached(*key) is not None) == (key not in gone), key
    # full again, then three more: the three oldest go; forget still finds exactly the rest
    for key in [(1, b"a"), (1, b"a/b"), (0, b"a/b/c"), (0, b"a"), (1, b"a/b/c"), (0, b"a/b")]:
        cache.get(*key)
    for n in (b"y1", b"y2", b"y3"):
        cache.get(0, n)
    assert [cache.cached(0, n) for n in (b"a b", b"a b/x", b"a.b")] == [None] * 3
    cache.forget(b"a b")
    assert cache.cached(1, b"a b") is None and cache.cached(1, b"a b/x") is None
    assert cache.cached(1, b"a.b") is not None and cache.cached(0, b"ab/a") is not None
    cache.forget(b"a/b")
    assert [cache.cached(b, n) for b in range(2) for n in (b"a/b", b"a/b/c")] == [None] * 4
    assert cache.cached(0, b"a") is not None and cache.cached(1, b"a") is not None
    cache.clear()
    for b in branches:
        b.close()


def test_whiteout_links_move_to_a_new_shared_file_at_the_link_limit(tmp_path):
    """When the shared empty file has as many links as the filesystem allows, the next
    whiteout links a fresh one; every whiteout is made, none is lost."""
    from unionfs.branches import BranchSpec
    from unionfs.layers import Branch

    limit = os.pathconf(tmp_path, "PC_LINK_MAX")
    if limit > 70000:
        pytest.skip(f"this filesystem allows {limit} links (ext4 allows 65,000)")
    (tmp_path / "up").mkdir()
    branch = Branch(0, BranchSpec(str(tmp_path / "up"), "rw"))
    try:
        branch.lock()
        d = os.open(tmp_path / "up", os.O_RDONLY | os.O_DIRECTORY)
        for i in range(limit + 1):  # the shared file's own name is one of its links
            branch.add_empty_file(d, b".wh.%d" % i)
        with pytest.raises(FileExistsError):
            branch.add_empty_file(d, b".wh.0")
        first, last = (os.stat(b".wh.%d" % i, dir_fd=d) for i in (0, limit))
        assert first.st_nlink == limit - 1 and last.st_nlink == 3
        assert first.st_ino != last.st_ino
        assert len(os.listdir(d)) == limit + 2  # the whiteouts and the work area
        os.close(d)
    finally:
        branch.close()
