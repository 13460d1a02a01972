"""Concurrent clients: random operations from several threads, big copy-ups among them, and
the requests answered at once beside them (fsyncs, links, xattr changes of upper files).

Nothing may fail with EIO (an unexpected error in the daemon), the daemon must log no error,
and afterwards the merged view must be self-consistent and the lower branch untouched; with
metadata-only copy-ups too (chmods, links, renames and xattr changes make them, writes fill
them, removals pin them).
"""

import errno
import os
import random
import threading

import pytest

from conftest import marked, tree, work_leftovers

EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.EINVAL,
            errno.EXDEV}


@pytest.mark.parametrize("options", [(), ("metacopy",), ("metacopy=off",), ("uring",)],
                         ids=["fill", "metacopy", "copies", "uring"])
def test_concurrent_random_operations(union, options, request):
    if "uring" in options:  # (the clients' requests come through every CPU's queue)
        request.getfixturevalue("fuse_uring")
    low = union["low"]
    for d in ("a", "b", "a/x"):
        (low / d).mkdir()
    for i in range(20):
        (low / ("a" if i % 2 else "b") / f"f{i}").write_text(f"lower {i}")
    (low / "a" / "big").write_bytes(os.urandom(8 << 20))  # copy-ups of this go to a thread
    before = tree(low)
    union.mount(*options)
    failures = []
    done = []

    def client(seed):
        rnd = random.Random(seed)
        names = ["a", "b", "a/x", "c"]
        for _ in range(600):
            d = rnd.choice(names)
            p = union / d / rnd.choice([f"f{rnd.randrange(20)}", "big", "new", "sub"])
            q = union / rnd.choice(names) / rnd.choice(["moved", "new", f"f{rnd.randrange(20)}"])
            op = rnd.randrange(11)
            try:
                if op == 0:
                    with open(p, "ab") as f:
                        f.write(b"+")
                elif op == 1:
                    p.read_bytes()
                elif op == 2:
                    os.unlink(p)
                elif op == 3:
                    os.rename(p, q)
                elif op == 4:
                    os.mkdir(p)
                elif op == 5:
                    os.listdir(p.parent)
                elif op == 6:
                    os.rmdir(p)
                elif op == 7:
                    os.chmod(p, 0o640)
                elif op == 8:
                    with open(p, "ab") as f:
                        f.write(b"s" * rnd.choice([10, 2 << 20]))  # a quick fsync, or a big one
                        os.fsync(f.fileno())
                elif op == 9:
                    os.link(p, q)
                else:
                    os.setxattr(p, "user.stress", b"%d" % seed)
                done.append(op)
            except OSError as e:
                if op == 9 and e.errno == errno.EPERM:  # (a directory)
                    continue
                if e.errno not in EXPECTED:
                    failures.append((seed, op, str(p), e))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(done) > 400 and {0, 1, 2, 3, 4, 8, 9, 10} <= set(done)  # they really ran
    # the merged view agrees with itself: every listed name can be looked up
    for dirpath, dirnames, filenames in os.walk(union.mnt):
        for n in dirnames + filenames:
            os.lstat(os.path.join(dirpath, n))
    union.umount()
    if options != ("metacopy",):  # (whole files once the daemon exits: see unionfs.filler)
        assert marked(union["up"]) == []
    union.mount(*options)
    for dirpath, dirnames, filenames in os.walk(union.mnt):
        for n in dirnames + filenames:
            os.lstat(os.path.join(dirpath, n))
    assert tree(low) == before
    assert work_leftovers(union["up"] / ".wh..wh.pyunion") == []
