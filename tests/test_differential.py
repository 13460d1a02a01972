"""Differential test: random operations on pyunion and on kernel overlayfs over the same layers
must give the same merged view, contents and error numbers."""

import contextlib
import ctypes
import errno
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import zlib

import pytest

from conftest import force_unmount, is_mounted, marked
from unionfs.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE

_libc = ctypes.CDLL(None, use_errno=True)

NAMES = ["a", "b", "c", "d1", "d2", "sub", "L" * 254]  # (too long a name for a .wh. whiteout)


def _build_layers(l1, l2, rnd):
    for layer in (l2, l1):
        for _ in range(25):
            depth = rnd.randint(0, 2)
            parts = [rnd.choice(NAMES) for _ in range(depth + 1)]
            p = layer.joinpath(*parts)
            try:
                if rnd.random() < 0.4:
                    p.mkdir(parents=True, exist_ok=True)
                else:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    if not p.is_dir():
                        p.write_text(f"{layer.name}:{'/'.join(parts)}")
            except (FileExistsError, NotADirectoryError):
                pass
    # whiteouts and opaque directories in the form both understand
    for p in list(l1.rglob("*"))[:3]:
        if p.is_file():
            p.unlink()
            os.mknod(p, stat.S_IFCHR | 0o600, 0)
    for p in l1.rglob("*"):
        if p.is_dir():
            os.setxattr(p, "trusted.overlay.opaque", b"y")
            break
    os.symlink("a", l2 / "lnk")
    os.mkfifo(l2 / "fifo", 0o600)
    # hard links of lower files (overlayfs with index=on and pyunion keep them through copy-up)
    files = [p for p in sorted(l2.rglob("*")) if p.is_file() and not p.is_symlink()]
    for i, p in enumerate(files[:2]):
        os.link(p, l2 / f"hl{i}")


def _existing(root):
    out = [""]
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in sorted(dirnames + filenames)]
    return sorted(out)


def _path(rnd, existing):
    """Mostly an existing entry, else a new name in an existing directory (or a missing one)."""
    base = rnd.choice(existing)
    if rnd.random() < 0.6 and base:
        return base
    return os.path.join(base, rnd.choice(NAMES + ["new", "x"]))


def _op(rnd, existing):
    kind = rnd.choice(["write", "append", "read", "unlink", "mkdir", "rmdir", "rename", "rename",
                       "chmod", "symlink", "link", "truncate", "listdir", "stat",
                       "setxattr", "getxattr", "removexattr", "listxattr", "exchange",
                       "noreplace", "utime", "chown", "hold", "fdwrite", "fdread", "fdstat",
                       "fdtruncate", "mkfifo", "fallocate", "copyrange", "tmpfile", "mmapwrite",
                       "rmtree", "scanremove"])
    return kind, _path(rnd, existing), _path(rnd, existing), rnd.randint(0, 9999)


HELD: dict[str, dict[int, int]] = {}  # root -> slot -> an fd held open across operations


def _close_held(root) -> None:
    for fd in HELD.pop(str(root), {}).values():
        os.close(fd)


def _apply_held(root, kind, a, n):
    """Files held open across other operations: opened for writing (the kernel sends no
    OPEN, so pyunion copies up at the first write where overlayfs does at open), then
    written, read and fstat-ed through the open file whatever happened to its name."""
    held, slot = HELD.setdefault(str(root), {}), n % 4
    if kind == "hold":
        fd = os.open(a, os.O_RDWR | os.O_NONBLOCK)
        if slot in held:
            os.close(held.pop(slot))
        held[slot] = fd
        return ("ok",)
    if slot not in held:
        return ("no fd",)
    fd = held[slot]
    if kind == "fdwrite":
        os.pwrite(fd, b"<%d>" % n, n % 20)
    elif kind == "fdread":
        return ("ok", os.pread(fd, 200, 0))
    elif kind == "fdtruncate":
        os.ftruncate(fd, n % 5 if n % 2 else 15 + n % 20)
    st = os.fstat(fd)
    return ("ok", st.st_size, stat.S_IMODE(st.st_mode))


OPENS = ("write", "append", "read", "truncate", "hold", "fallocate", "copyrange", "mmapwrite",
         "rmtree")
# (fd ops use what "hold" opened)


def _apply(root, op):
    kind, p, q, n = op
    a, b = os.path.join(root, p), os.path.join(root, q)
    try:
        if kind in OPENS and stat.S_ISFIFO(os.stat(a).st_mode):  # (through symlinks too)
            return ("fifo",)  # opening it would wait for the other end
    except OSError:
        pass
    try:
        if kind in ("hold", "fdwrite", "fdread", "fdstat", "fdtruncate"):
            return _apply_held(root, kind, a, n)
        if kind == "write":
            with open(a, "w") as f:
                f.write(f"w{n}")
        elif kind == "append":
            with open(a, "a") as f:
                f.write(f"+{n}")
        elif kind == "read":
            with open(a) as f:
                return ("ok", f.read())
        elif kind == "unlink":
            os.unlink(a)
        elif kind == "mkdir":
            os.mkdir(a)
        elif kind == "mkfifo":
            os.mkfifo(a, 0o640)
        elif kind == "tmpfile":  # made in directory A, then named B by linkat
            fd = os.open(a, os.O_TMPFILE | os.O_RDWR, 0o640)
            try:
                os.write(fd, b"t%d" % n)
                dfd = os.open(os.path.dirname(b), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.link(f"/proc/self/fd/{fd}", os.path.basename(b), dst_dir_fd=dfd,
                            follow_symlinks=True)
                finally:
                    os.close(dfd)
            finally:
                os.close(fd)
        elif kind == "rmtree":
            shutil.rmtree(a)
        elif kind == "scanremove":  # remove about half the files while reading the listing
            seen = []
            with os.scandir(a) as it:
                for e in it:  # (in each system's own order: which ones go must not depend on it)
                    seen.append(e.name)
                    if zlib.crc32(e.name.encode()) % 2 == n % 2 and not e.is_dir(follow_symlinks=False):
                        os.unlink(e.path)
            return ("ok", sorted(seen), sorted(os.listdir(a)))
        elif kind == "mmapwrite":  # (written back by the kernel, not by a write call)
            fd = os.open(a, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    return ("empty",)
                with mmap.mmap(fd, size) as m:
                    m[n % size] = ord("M")
                    m.flush()
                return ("ok", os.pread(fd, 200, 0))
            finally:
                os.close(fd)
        elif kind == "fallocate":
            fd = os.open(a, os.O_WRONLY)
            try:
                os.posix_fallocate(fd, n % 50, 1 + n % 30)
                return ("ok", os.fstat(fd).st_size)
            finally:
                os.close(fd)
        elif kind == "copyrange":  # (the kernel copies between the mount's files itself)
            if stat.S_ISFIFO(os.stat(b).st_mode):
                return ("fifo",)
            src = os.open(a, os.O_RDONLY)
            try:
                dst = os.open(b, os.O_WRONLY)
                try:
                    done = os.copy_file_range(src, dst, 1 + n % 40, n % 5, n % 7)
                    return ("ok", done, os.fstat(dst).st_size)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
        elif kind == "rmdir":
            os.rmdir(a)
        elif kind == "rename":
            os.rename(a, b)
        elif kind == "chmod":
            os.chmod(a, 0o700 | (n & 0o77))
        elif kind == "symlink":
            os.symlink(q, a)
        elif kind == "link":
            os.link(a, b)
        elif kind == "truncate":  # (shrinking a lower file, or growing it: see metacopy)
            os.truncate(a, n % 7 if n % 3 else 12 + n % 30)
        elif kind == "listdir":
            return ("ok", sorted(os.listdir(a)))
        elif kind in ("exchange", "noreplace"):
            flags = RENAME_EXCHANGE if kind == "exchange" else RENAME_NOREPLACE
            if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), ctypes.c_uint(flags)):
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        elif kind == "utime":
            os.utime(a, ns=(n * 10**9 + 1, n * 10**9 + 2), follow_symlinks=False)
            st = os.lstat(a)
            return ("ok", st.st_atime_ns, st.st_mtime_ns)
        elif kind == "chown":
            os.chown(a, n % 5, n % 7, follow_symlinks=False)
            st = os.lstat(a)
            return ("ok", st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        elif kind == "setxattr":
            os.setxattr(a, f"user.k{n % 3}", b"v%d" % n, follow_symlinks=False)
        elif kind == "getxattr":
            return ("ok", os.getxattr(a, f"user.k{n % 3}", follow_symlinks=False))
        elif kind == "removexattr":
            os.removexattr(a, f"user.k{n % 3}", follow_symlinks=False)
        elif kind == "listxattr":
            return ("ok", _user_xattrs(a))
        elif kind == "stat":
            st = os.lstat(a)
            return ("ok", stat.S_IFMT(st.st_mode), st.st_size if not stat.S_ISDIR(st.st_mode) else 0)
        return ("ok",)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


class Hung(Exception):
    """An operation did not return (not an OSError, which _apply would record)."""


@contextlib.contextmanager
def _time_limit(seconds, what):
    """Fail, rather than hang the suite, if an operation blocks (as opening a FIFO would)."""
    def expire(signum, frame):
        raise Hung(f"{what}: no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _user_xattrs(path):
    return sorted((k, os.getxattr(path, k, follow_symlinks=False))
                  for k in os.listxattr(path, follow_symlinks=False) if k.startswith("user."))


def _snapshot(root):
    out = {}
    names_of = {}  # inode number -> the names of non-directories with it
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if not stat.S_ISDIR(st.st_mode):
                names_of.setdefault(st.st_ino, []).append(rel)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), _user_xattrs(p))
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", stat.S_IMODE(st.st_mode), _user_xattrs(p))
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), f.read(), _user_xattrs(p))
    # hard links: which names are one file (overlayfs keeps them so with index=on)
    out["(links)"] = sorted(sorted(names) for names in names_of.values() if len(names) > 1)
    return out


REDIRECT_MAX = "/sys/module/overlay/parameters/redirect_max"


@pytest.fixture
def long_redirects():
    """Let overlayfs record directory renames whose new path is long (NAMES has a 254-byte
    name): past its default of 256 bytes it refuses them with EXDEV, which pyunion never does."""
    try:
        with open(REDIRECT_MAX) as f:
            old = f.read().strip()
        with open(REDIRECT_MAX, "w") as f:
            f.write("4096")
    except OSError:
        old = None
    yield
    if old is not None:
        with open(REDIRECT_MAX, "w") as f:
            f.write(old)


# (seeds 7-9 run with the kernel's writeback cache, where the kernel keeps sizes and times
# itself and sends them later; 10-12 make metadata-only copy-ups)
@pytest.mark.parametrize("seed,options", [(s, ()) for s in range(1, 7)]
                         + [(s, ("writeback",)) for s in range(7, 10)]
                         + [(s, ("metacopy",)) for s in range(10, 13)]
                         + [(s, ("uring",)) for s in range(13, 16)])
def test_same_behaviour_as_overlayfs(make_union, tmp_path, seed, options, long_redirects, request):
    if "uring" in options:
        request.getfixturevalue("fuse_uring")
    rnd = random.Random(seed)
    u = make_union(("up", "rw"), ("l1", "ro+wh"), ("l2", "ro+wh"), name=f"u{seed}")
    _build_layers(u["l1"], u["l2"], rnd)
    ovl = tmp_path / f"ovl{seed}"
    for d in ("up", "work", "mnt"):
        (ovl / d).mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={u['l1']}:{u['l2']},upperdir={ovl}/up,workdir={ovl}/work,redirect_dir=on,index=on",
                        ovl / "mnt"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"kernel overlayfs unavailable: {r.stderr.strip()}")
    try:
        u.mount(*options)
        assert _snapshot(u.mnt) == _snapshot(ovl / "mnt")
        outcomes = {"ok": 0, "err": 0}
        for i in range(400):
            op = _op(rnd, _existing(u.mnt))
            with _time_limit(60, f"step {i}: {op}"):
                ours, theirs = _apply(u.mnt, op), _apply(ovl / "mnt", op)
            assert ours == theirs, f"step {i}: {op}: pyunion {ours} != overlayfs {theirs}"
            outcomes[ours[0]] = outcomes.get(ours[0], 0) + 1
            if i % 25 == 0:
                assert _snapshot(u.mnt) == _snapshot(ovl / "mnt"), f"after step {i}: {op}"
        assert _snapshot(u.mnt) == _snapshot(ovl / "mnt")
        assert outcomes["ok"] > 50 and outcomes["err"] > 20, outcomes  # both paths exercised
        _close_held(u.mnt)
        _close_held(ovl / "mnt")
        u.umount()
        if "metacopy" not in options:  # (copies are whole once the daemon exits: see filler)
            assert marked(u["up"]) == []
        u.mount(*options)
        assert _snapshot(u.mnt) == _snapshot(ovl / "mnt"), "differs after remount"
    finally:
        _close_held(u.mnt)
        _close_held(ovl / "mnt")
        subprocess.run(["umount", ovl / "mnt"], capture_output=True)
        if is_mounted(ovl / "mnt"):
            force_unmount(ovl / "mnt")
