"""The pyfuse3 adapter: thin request handlers over the Union engine, lookup counting, error choke point.

Every handler goes through `_handler`: OSError becomes FUSEError(errno); any other exception
is logged and answered with EIO, so the mount keeps serving.
"""

import errno
import functools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable

import pyfuse3
import trio

from unionfs import syscalls
from unionfs.datafds import DataFds
from unionfs.filler import Filler
from unionfs.inodes import ROOT_INO, Node
from unionfs.merge import DT_DIR
from unionfs.union import DirHandle, Union
from unionfs.whiteout import CONTROL_XATTR

log = logging.getLogger(__name__)

# reads up to this size are done as asked, bigger ones (read-ahead: up to 1 MiB) are first
# cut to the file's size
SMALL_READ = 128 << 10
# listings kept when the kernel sends no OPENDIR (see _listing)
MAX_LISTINGS = 256
SELINUX_XATTR = b"security.selinux"
SELINUXFS = "/sys/fs/selinux"
# copy-ups of files at least this big run in a worker thread, so the mount keeps serving
THREAD_COPY_BYTES = 1 << 20
# an fsync runs in the loop when at most this much was written since the file's last one and
# recent fsyncs took less than this long; else in a worker thread (see fsync_job)
QUICK_FSYNC_BYTES = 1 << 20
QUICK_FSYNC_SECONDS = 0.002
PID_XATTR = b"pyunion.pid"
# setting this on the mount root raises an unexpected exception in the handler: lets the tests
# check that the daemon answers EIO and keeps serving
SELFTEST_XATTR = b"pyunion.selftest.fail"


def _shown(args: tuple) -> tuple:
    """Request arguments as the debug log shows them: no context, no bulk data."""
    return tuple(f"<{len(a)} bytes>" if isinstance(a, bytes) and len(a) > 64 else a
                 for a in args if not isinstance(a, pyfuse3.RequestContext))


def _handler(fn):
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        if self.debug:
            log.debug("%s%r", name, _shown(args))
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if self.debug:
                log.debug("%s -> %s", name, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("unexpected error in %s%r", name, _shown(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class UnionOperations(pyfuse3.Operations):
    """FUSE requests for a Union."""

    supports_dot_lookup = True
    # The kernel checks POSIX ACLs itself and caches them per inode (ls -l asks for them for
    # every file); they live in the branches as the usual system.posix_acl_* xattrs.
    enable_acl = True

    def __init__(self, union: Union, entry_timeout: float = 86400.0, attr_timeout: float = 86400.0,
                 negative_timeout: float = 86400.0, writeback: bool = False, debug: bool = False,
                 fill: bool = False):
        super().__init__()
        self.union = union
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.negative_timeout = negative_timeout
        self.enable_writeback_cache = writeback
        self.debug = debug
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_dir_fh = 1
        # set by the session when the kernel sends no OPENDIR: listings are kept per directory
        self.no_opendir = False
        self._listings: OrderedDict[int, DirHandle] = OrderedDict()
        self.data = DataFds(union)
        union.before_unlink = self.data.pin
        union.after_copy_up = self.data.copied
        union.own_file = self.data.current
        self._copy_locks: dict[int, trio.Lock] = {}
        self._blocking = trio.CapacityLimiter(2)  # heavy blocking work: big copy-ups, fsync
        # FILL: metadata-only copies in the writable branch get their data in the background
        # (its task, `filler.run`, and `filler.drain` before unmounting are the caller's)
        self.filler = None
        if fill and not union.readonly:
            self.filler = Filler(union, self._copy_locks, self.in_worker)
            union.after_metadata_only = self.filler.add
        self._fsync_seconds = 0.0  # how long recent fsyncs took (a moving average)
        # how the kernel is told to forget entries and inodes (see _refresh): set by a session
        # that speaks the protocol itself; pyfuse3's notifications otherwise
        self.invalidate = None
        # without SELinux on the host, an absent SELinux label answers "not supported"
        # (see absent_xattr_errno)
        self.labels_unsupported = not os.path.exists(SELINUXFS)
        # set as the kernel's INIT is answered: tasks waiting on it run once the mount is live
        self.initialized = trio.Event()

    def init(self) -> None:
        self.initialized.set()

    # ------------------------------------------------------------------ helpers

    def _node(self, ino: int) -> Node:
        try:
            return self.union.table.get(ino)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = st.st_mode
        e.st_nlink = self.union.attr_nlink(node, st)
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a new reference to NODE."""
        node.lookups += 1
        return self._attrs(node, st)

    async def _copy_up(self, node: Node, limit: int | None = None, meta: bool = False) -> None:
        """Copy NODE up before a change; big files are copied in a worker thread.

        LIMIT: the change truncates the file to that size, so no more needs copying.
        META: a change of metadata alone (see Union.prepare_copy_up).
        """
        union = self.union
        if not union.needs_copy_up(node, meta) and node.ino not in self._copy_locks:
            return
        # (a copy-up or fill under way: the change waits for it, see copy_up_at_once)
        lock = self._copy_locks.setdefault(node.ino, trio.Lock())
        try:
            async with lock:
                if not union.needs_copy_up(node, meta):
                    return
                job = union.prepare_copy_up(node, limit, meta)
                if job is None:
                    return
                if job.size >= THREAD_COPY_BYTES:
                    try:
                        await self.in_worker(job.copy_data)
                    except BaseException:
                        job.abort()
                        raise
                self._complete_copy_up(node, job, job.size < THREAD_COPY_BYTES)
        finally:
            if lock.statistics().tasks_waiting == 0 and not lock.locked():
                self._copy_locks.pop(node.ino, None)

    def copy_up_at_once(self, node: Node, limit: int | None = None, meta: bool = False) -> bool:
        """Copy NODE up for a change in the loop if that moves no data (see
        Union.copy_moves_no_data) and no copy-up or fill of it is under way (a change made
        while a fill copies would race the times and mode it puts back): True once it needs
        none; False if it must wait (as a task: see _copy_up)."""
        union = self.union
        if node.ino in self._copy_locks:
            return False
        if not union.needs_copy_up(node, meta):
            return True
        if not union.copy_moves_no_data(node, limit, meta):
            return False
        job = union.prepare_copy_up(node, limit, meta)
        if job is not None:
            self._complete_copy_up(node, job, True)
        return True

    def _complete_copy_up(self, node: Node, job, copy: bool) -> None:
        """Publish a prepared copy-up; COPY: its data is still to copy (quick)."""
        if copy:
            try:
                job.copy_data()
            except BaseException:
                job.abort()
                raise
        orphan = self.union.finish_copy_up(node, job)  # (readers now read the copy)
        if not self.union.sync:
            node.unsynced += job.size
        if orphan is not None:  # its name went meanwhile: the open file lives on
            self.data.pin_fd(node, orphan, True)

    # ------------------------------------------------------------------ lookups

    # The request handlers that never wait are written as plain functions (`do_*`): the
    # async handlers call them, and the session calls them directly, without pyfuse3's coroutine
    # round, which costs more than the work itself.

    def do_lookup(self, parent_inode: int, name: bytes) -> tuple[Node, os.stat_result] | None:
        """The node and attributes for NAME, or None when it does not exist (to cache)."""
        parent = self._node(parent_inode)
        try:
            return self.union.lookup(parent, name)
        except FileNotFoundError:
            if self.negative_timeout <= 0:
                raise
            return None

    def do_getattr(self, inode: int) -> tuple[Node, os.stat_result]:
        node = self._node(inode)
        fd = self.data.current(node)  # the file's open data answers without a path walk
        if fd is not None:
            return node, self.union.with_data_blocks(node, os.fstat(fd))
        return node, self.union.stat(node)

    def do_read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        fd = self.data.get(node, False)
        at = node.data_at
        if at is not None and at[0] >= 0:
            return self._read_metadata_only(node, fd, off, size)
        if size > SMALL_READ:  # pread allocates all it is asked for: no more than the file holds
            size = min(size, max(os.fstat(fd).st_size - off, 0))
        return os.pread(fd, size, off)

    def _read_metadata_only(self, node: Node, fd: int, off: int, size: int) -> bytes:
        """Read NODE, a metadata-only copy: the data of its lower file (open as FD), then the
        bytes its own file holds past that (its tail, see metacopy)."""
        held = os.fstat(fd).st_size
        end = off + size
        if end > held:
            own = self.data.own(node)
            end = min(end, os.fstat(own).st_size)
            if end > held:
                head = os.pread(fd, held - off, off) if off < held else b""
                if len(head) < held - off:  # (the lower file shrank meanwhile)
                    return head
                start = max(off, held)
                return head + os.pread(own, end - start, start)
        return os.pread(fd, max(min(end, held) - off, 0), off)

    def do_lseek(self, ino: int, off: int, whence: int) -> int:
        """SEEK_DATA or SEEK_HOLE in file INO."""
        node = self._node(ino)
        fd = self.data.get(node, False)
        at = node.data_at
        if at is None or at[0] < 0:
            return os.lseek(fd, off, whence)
        held = os.fstat(fd).st_size  # a metadata-only copy: is there a tail past that?
        own = self.data.own(node)
        if os.fstat(own).st_size <= held:
            return os.lseek(fd, off, whence)
        if off >= held:
            return os.lseek(own, off, whence)
        try:
            pos = os.lseek(fd, off, whence)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return os.lseek(own, held, whence)  # (no data left below: the tail's, if any)
        if whence == os.SEEK_HOLE and pos >= held:  # (the lower file's end: the tail goes on)
            return os.lseek(own, held, whence)
        return pos

    def absent_xattr_errno(self, name: bytes) -> int:
        """The error for a query of attribute NAME that the file does not have: ENODATA, but
        EOPNOTSUPP for an SELinux label on a host without SELinux. `ls -l` asks every file
        for its label, and stops asking a filesystem that does not support labels (on each
        pass, a round trip per file saved); a file that does carry one still returns it."""
        if name == SELINUX_XATTR and self.labels_unsupported:
            return errno.EOPNOTSUPP
        return errno.ENODATA

    def do_getxattr(self, inode: int, name: bytes) -> bytes | None:
        """The value of attribute NAME, or None if there is none."""
        if name == PID_XATTR and inode == ROOT_INO:
            return str(os.getpid()).encode()
        node = self._node(inode)
        return self.union.getxattr(node, name, self.data.current(node))

    @_handler
    async def lookup(self, parent_inode, name, ctx=None):
        found = self.do_lookup(parent_inode, name)
        if found is None:
            e = pyfuse3.EntryAttributes()  # a negative entry the kernel may cache
            e.st_ino = 0
            e.entry_timeout = self.negative_timeout
            return e
        return self._entry(*found)

    async def forget(self, inode_list):
        self.do_forget(inode_list)

    def do_forget(self, inode_list) -> None:
        table = self.union.table
        for ino, count in inode_list:
            try:
                node = table.by_ino.get(ino)
                if node is not None:
                    table.unref(node, count)
                    if table.by_ino.get(ino) is not node:
                        self.data.drop(node)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, count)

    @_handler
    async def getattr(self, inode, ctx=None):
        return self._attrs(*self.do_getattr(inode))

    def do_setattr(self, node: Node, **changes) -> os.stat_result:
        """Apply attribute CHANGES (see Union.setattr) to a node that needs no copy-up."""
        return self.union.setattr(node, self.data.writable(node), **changes)

    def do_write(self, node: Node, off: int, buf: bytes) -> int:
        """Write to a node that needs no copy-up."""
        count = os.pwrite(self.data.get(node, True), buf, off)
        node.unsynced += count
        return count

    def kill_suidgid(self, node: Node, st: os.stat_result | None = None) -> os.stat_result:
        """Drop NODE's set-user-ID bit, and its set-group-ID bit if group-executable, as the
        kernel does for local files written, truncated or chowned by a caller without
        CAP_FSETID (with HANDLE_KILLPRIV_V2 it leaves that to us). ST: its attributes if known;
        returns them as they are afterwards."""
        if st is None:
            st = self.do_getattr(node.ino)[1]
        mode = st.st_mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if not stat.S_ISREG(mode) or not mode & kill:
            return st
        return self.do_setattr(node, mode=mode & ~kill)

    async def change_attrs(self, node: Node, changes: dict) -> os.stat_result:
        """Apply attribute CHANGES (see Union.setattr), copying the node up first if due."""
        if changes["mode"] is None and changes["uid"] is None and changes["gid"] is None \
                and changes["size"] is None:
            st = self.union.times_of_nameless(node, changes["atime_ns"], changes["mtime_ns"])
            if st is not None:
                return st
        if changes["size"] is not None and self.resize_past_data(node, changes["size"]):
            changes = dict(changes, size=None)
        await self._copy_up(node, changes["size"], meta=changes["size"] is None)
        return self.do_setattr(node, **changes)

    @_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        st = await self.change_attrs(node, {
            "mode": attr.st_mode if fields.update_mode else None,
            "uid": attr.st_uid if fields.update_uid else None,
            "gid": attr.st_gid if fields.update_gid else None,
            "size": attr.st_size if fields.update_size else None,
            "atime_ns": attr.st_atime_ns if fields.update_atime else None,
            "mtime_ns": attr.st_mtime_ns if fields.update_mtime else None,
        })
        if fields.update_size:  # (see write)
            st = self.kill_suidgid(node, st)
        return self._attrs(node, st)

    @_handler
    async def readlink(self, inode, ctx):
        return self.do_readlink(inode)

    def do_readlink(self, inode: int) -> bytes:
        return self.union.readlink(self._node(inode))

    # ------------------------------------------------------------------ namespace changes

    @_handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(*self.do_mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    def do_mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, uid: int, gid: int):
        return self.union.mknod(self._node(parent_inode), name, mode, rdev, uid, gid)

    @_handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(*self.do_mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    def do_mkdir(self, parent_inode: int, name: bytes, mode: int, uid: int, gid: int):
        return self.union.mkdir(self._node(parent_inode), name, mode, uid, gid)

    @_handler
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(*self.do_symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    def do_symlink(self, parent_inode: int, name: bytes, target: bytes, uid: int, gid: int):
        return self.union.symlink(self._node(parent_inode), name, target, uid, gid)

    @_handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(*await self.do_link(inode, new_parent_inode, new_name))

    async def do_link(self, inode: int, new_parent_inode: int, new_name: bytes):
        node = self._node(inode)
        await self._copy_up(node, meta=True)
        return self.union.link(node, self._node(new_parent_inode), new_name, self.data.current(node))

    @_handler
    async def unlink(self, parent_inode, name, ctx):
        self.do_unlink(parent_inode, name)

    def do_unlink(self, parent_inode: int, name: bytes) -> None:
        self.union.unlink(self._node(parent_inode), name)  # (pins the data: see DataFds.pin)

    @_handler
    async def rmdir(self, parent_inode, name, ctx):
        self.do_rmdir(parent_inode, name)

    def do_rmdir(self, parent_inode: int, name: bytes) -> None:
        self.union.rmdir(self._node(parent_inode), name)

    @_handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.do_rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    async def do_rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                        name_new: bytes, flags: int) -> None:
        node = self.rename_copy_due(parent_inode_old, name_old)
        if node is not None:  # copy a big file up outside the event loop first
            await self._copy_up(node, meta=True)
        self.rename_now(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    def rename_copy_due(self, parent_inode_old: int, name_old: bytes) -> Node | None:
        """The file that renaming NAME_OLD must first copy up with its data (do_rename), or
        None: then the rename is all metadata (a copy-up that moves none is done here) and
        rename_now can do it at once."""
        try:
            node, _ = self.union.lookup(self._node(parent_inode_old), name_old)
        except FileNotFoundError:
            return None  # (rename_now says so)
        if node.is_dir or self.copy_up_at_once(node, meta=True):
            return None
        return node

    def rename_now(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                   name_new: bytes, flags: int) -> None:
        self.union.rename(self._node(parent_inode_old), name_old, self._node(parent_inode_new),
                          name_new, flags)

    # ------------------------------------------------------------------ files

    # A file handle is the file's inode number: data fds are per file (see DataFds), and with
    # our own session the kernel sends no OPEN at all (handle 0 is then the inode too).

    @_handler
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=await self.do_open(inode, flags), keep_cache=True)

    async def do_open(self, inode: int, flags: int) -> int:
        """Prepare NODE for an open with FLAGS (copy-up, truncation); returns the handle."""
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.union.require_writable()
            # (without O_TRUNC, the data waits for the first write that needs it: an append
            # does not, see write_past_data)
            trunc = bool(flags & os.O_TRUNC)
            await self._copy_up(node, 0 if trunc else None, meta=not trunc)
            if flags & os.O_TRUNC:
                os.ftruncate(self.data.get(node, True), 0)
        else:
            self.data.get(node, False)  # fail now if it cannot be opened
        return node.ino

    @_handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        node, st = self.do_create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=node.ino, keep_cache=True), self._entry(node, st)

    def do_create(self, parent_inode: int, name: bytes, mode: int, flags: int, uid: int, gid: int):
        fd, node, st = self.union.create(self._node(parent_inode), name, mode, flags, uid, gid)
        self.data.put(node, fd, True)
        return node, st

    def do_tmpfile(self, parent_inode: int, mode: int, flags: int, uid: int, gid: int):
        """An open file with no name (O_TMPFILE): its fd is all that holds it, so it is pinned."""
        fd, node, st = self.union.tmpfile(self._node(parent_inode), mode, flags, uid, gid)
        self.data.pin_fd(node, fd, True)
        return node, st

    @_handler
    async def read(self, fh, off, size):
        return self.do_read(fh, off, size)

    @_handler
    async def write(self, fh, off, buf):
        node = self._node(fh)
        count = self.write_past_data(node, off, buf)
        if count is None:
            count = await self.write_copying(node, off, buf)
        # libfuse asks for HANDLE_KILLPRIV on pyfuse3's behalf: set-id bits are ours to drop
        self.kill_suidgid(node)
        return count

    async def write_copying(self, node: Node, off: int, buf: bytes) -> int:
        """Write to NODE, copying it up first if due."""
        await self._copy_up(node)
        return self.do_write(node, off, buf)

    def write_past_data(self, node: Node, off: int, buf) -> int | None:
        """Write BUF at OFF to NODE, a file due for a copy-up, without copying its data, if OFF
        is at or past the end of that data (an append), or BUF only repeats the bytes it has
        before that end: the write goes into a metadata-only copy, whose lower file keeps
        supplying the data before it (its tail, see metacopy; a lower file gets such a copy at
        once, where the union makes them); None if the write must wait for the data (see
        write_copying)."""
        if not self._copy_up_past_data(node, off, buf):
            return None
        if not self.union.needs_copy_up(node):  # (a copy that holds its data: an empty file)
            return self.do_write(node, off, buf)
        count = os.pwrite(self.data.own(node), buf, off)
        node.unsynced += count
        return count

    def resize_past_data(self, node: Node, size: int) -> bool:
        """Truncate NODE, a file due for a copy-up, to SIZE without copying its data if SIZE is
        at or past the end of that data (growing it, say): the size is a metadata-only copy's,
        the bytes past the lower data its tail (see write_past_data); False if the
        truncation must wait for the data, or needs no copy-up."""
        if not self._copy_up_past_data(node, size):
            return False
        if not self.union.needs_copy_up(node):  # (an empty file, copied whole)
            return False
        os.ftruncate(self.data.own(node), size)
        return True

    def _copy_up_past_data(self, node: Node, off: int, buf=b"") -> bool:
        """Whether a change of NODE's data at OFF and past it (a write of BUF) needs none of
        the data it has now, and NODE then has the copy to take it: a metadata-only copy of a
        lower file (if the union makes them), or a copy already made (see copy_up_at_once).
        False for a node due for no copy-up."""
        if not self.union.needs_copy_up(node) or node.ino in self._copy_locks:
            return False
        fd = self.data.get(node, False)
        end = os.fstat(fd).st_size
        if off < end and not _repeats_data(fd, end, off, buf):
            return False
        return self.copy_up_at_once(node, meta=True)

    async def flush(self, fh):
        # Nothing to do on close(): answering ENOSYS makes the kernel stop sending FLUSH,
        # which saves a round trip on every close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_handler
    async def fsync(self, fh, datasync):
        await self.do_fsync(fh, datasync)

    async def do_fsync(self, fh: int, datasync: bool) -> None:
        """Flush a file's data to disk: in the loop if that is quick (see fsync_job), else in
        a worker thread, the mount serving meanwhile."""
        job = self.fsync_job(fh, datasync)
        if job is None:
            return
        sync, quick = job
        if quick:
            sync()
        else:
            await self.in_worker(sync)

    def fsync_job(self, fh: int, datasync: bool) -> tuple[Callable[[], None], bool] | None:
        """What fsync of file FH does, and whether it is likely quick enough for the loop;
        None if there is nothing to flush.

        Handing an fsync to a worker thread costs the caller about 180 µs here (the thread's
        CPU must be woken), more than a small file's fsync takes (dpkg fsyncs every file it
        unpacks). An fsync is likely quick when little was written to the file since its last
        one and recent fsyncs were quick; a big or slow one goes to a worker, so that it never
        holds other requests up for long. It syncs a duplicate of the file's data fd: the
        table may close its own meanwhile."""
        node = self._node(fh)
        fd = self.data.writable(node)
        if fd is None:
            return None
        fd = os.dup(fd)
        written, node.unsynced = node.unsynced, 0

        def sync():
            start = time.perf_counter()
            try:
                (os.fdatasync if datasync else os.fsync)(fd)
            finally:
                os.close(fd)
                self._fsync_seconds += (time.perf_counter() - start - self._fsync_seconds) / 4

        return sync, written <= QUICK_FSYNC_BYTES and self._fsync_seconds < QUICK_FSYNC_SECONDS

    async def in_worker(self, fn):
        """FN() in a worker thread, two at most at a time (big copy-ups, fsync)."""
        return await trio.to_thread.run_sync(fn, limiter=self._blocking)

    @_handler
    async def release(self, fh):
        pass

    def fd_for(self, ino: int, write: bool) -> int:
        """The data fd of inode INO, for the session's fallocate (a file to write to was
        copied up first: see fallocate_copying)."""
        return self.data.get(self._node(ino), write)

    async def fallocate_copying(self, node: Node, mode: int, offset: int, size: int) -> None:
        await self._copy_up(node)
        syscalls.fallocate(self.data.get(node, True), mode, offset, size)

    # ------------------------------------------------------------------ directories

    @_handler
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self.union.layers(node)
        handle = DirHandle(node)
        if node.handles is None:
            node.handles = []
        node.handles.append(handle)
        node.opens += 1
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_handles[fh] = handle
        return fh

    def _listing(self, ino: int, start_id: int) -> tuple[DirHandle, int, int]:
        """Without OPENDIR (see session), listings are kept per directory, recently used ones
        first, and every offset carries its listing's serial: (listing, serial, index)."""
        serial, index = start_id >> 32, start_id & 0xFFFFFFFF
        handle = self._listings.get(serial) if start_id else None
        if handle is None:  # a new listing (or one forgotten long ago: start it afresh)
            node = self._node(ino)
            if not node.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            handle = DirHandle(node)
            if node.handles is None:
                node.handles = []
            node.handles.append(handle)
            serial = self._next_dir_fh
            self._next_dir_fh += 1
            self._listings[serial] = handle
            while len(self._listings) > MAX_LISTINGS:
                old = self._listings.popitem(last=False)[1]
                old.node.handles.remove(old)
        self._listings.move_to_end(serial)
        return handle, serial, index

    @_handler
    async def readdir(self, fh, start_id, token):
        def emit(name, node, st, next_id):
            return pyfuse3.readdir_reply(token, name, self._attrs(node, st), next_id)

        self.do_readdir(fh, start_id, emit)

    def do_readdir(self, fh: int, start_id: int, emit) -> None:
        """List directory FH (its inode without OPENDIR) from START_ID on, with attributes.

        EMIT(name, node, attributes, next_id) answers whether the entry still fitted; each one
        that did, but "." and "..", is a new reference of the kernel's.
        """
        handle, base, start = self._listing_at(fh, start_id)
        node = handle.node
        union = self.union
        entries = handle.entries
        removed = handle.removed
        dir_fds: dict[int, int | None] = {}  # branch -> the directory's fd there
        for i in range(start, len(entries) + 2):
            if i < 2:  # "." and "..": the kernel takes no reference for these
                dot = node if i == 0 else (node.parent or node)
                if not emit(b"." if i == 0 else b"..", dot, union.stat(dot), base + i + 1):
                    return
                continue
            name, b, _, _ = entries[i - 2]
            if removed and name in removed:
                continue
            if b not in dir_fds:
                dir_fds[b] = union.dirs.lookup(b, node.path)
            found = union.entry_attrs(node, name, b, dir_fds[b])
            if found is None:
                continue
            child, st = found
            if not emit(name, child, st, base + i + 1):
                union.table.drop_if_unused(child)
                return
            child.lookups += 1
        handle.done = True

    def do_readdir_names(self, fh: int, start_id: int, emit) -> None:
        """List directory FH from START_ID on, names only (no attributes, no references).

        EMIT(name, ino, d_type, next_id) answers whether the entry still fitted.
        """
        handle, base, start = self._listing_at(fh, start_id)
        node = handle.node
        entries = handle.entries
        listed_ino = self.union.listed_ino
        for i in range(start, len(entries) + 2):
            if i < 2:
                dot = node if i == 0 else (node.parent or node)
                if not emit(b"." if i == 0 else b"..", dot.ino, DT_DIR, base + i + 1):
                    return
                continue
            name, _, key, kind = entries[i - 2]
            if name in handle.removed:
                continue
            if not emit(name, listed_ino(key), kind, base + i + 1):
                return
        handle.done = True

    def _listing_at(self, fh: int, start_id: int) -> tuple[DirHandle, int, int]:
        """The listing FH reads from START_ID, taken afresh when it starts again from the top:
        (listing, base of its offsets, index of the first entry)."""
        if self.no_opendir:  # fh is the directory's inode
            handle, serial, start = self._listing(fh, start_id)
        else:
            handle, serial, start = self._dir_handles[fh], 0, start_id
        if handle.entries is None or (start == 0 and handle.done):
            handle.entries = self.union.listdir(handle.node)
            handle.removed.clear()
            handle.done = False
        return handle, serial << 32, start

    @_handler
    async def releasedir(self, fh):
        handle = self._dir_handles.pop(fh)
        node = handle.node
        node.handles.remove(handle)
        node.opens -= 1
        self.union.table.drop_if_unused(node)

    @_handler
    async def fsyncdir(self, fh, datasync):
        self.do_fsyncdir(fh)

    def do_fsyncdir(self, fh: int) -> None:
        node = self._node(fh) if self.no_opendir else self._dir_handles[fh].node
        self.union.fsyncdir(node)

    # ------------------------------------------------------------------ the rest

    @_handler
    async def statfs(self, ctx):
        sv = self.union.statfs()
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail"):
            setattr(out, attr, getattr(sv, attr))
        out.f_namemax = self.union.namemax
        return out

    @_handler
    async def getxattr(self, inode, name, ctx):
        value = self.do_getxattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(self.absent_xattr_errno(name))
        return value

    @_handler
    async def listxattr(self, inode, ctx):
        return self.do_listxattr(inode)

    def do_listxattr(self, inode: int) -> list[bytes]:
        node = self._node(inode)
        return self.union.listxattr(node, self.data.current(node))

    @_handler
    async def setxattr(self, inode, name, value, ctx):
        if inode == ROOT_INO and name == CONTROL_XATTR:
            self._refresh()
            return
        if inode == ROOT_INO and name == SELFTEST_XATTR:
            raise RuntimeError("self-test failure requested through " + name.decode())
        node = self._node(inode)
        await self._copy_up(node, meta=True)
        self.union.setxattr(node, name, value, self.data.current(node))

    @_handler
    async def removexattr(self, inode, name, ctx):
        node = self._node(inode)
        await self._copy_up(node, meta=True)
        self.union.removexattr(node, name, self.data.current(node))

    @_handler
    async def access(self, inode, mode, ctx):
        node = self._node(inode)
        if mode & os.W_OK and self.union.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        st = self.union.stat(node)
        if ctx.uid == 0:
            if mode & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise pyfuse3.FUSEError(errno.EACCES)
            return True
        if st.st_uid == ctx.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == ctx.gid or st.st_gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if mode & ~bits & 7:
            raise pyfuse3.FUSEError(errno.EACCES)
        return True

    def _refresh(self) -> None:
        """Drop every cache after branches were edited directly (`pyunion refresh`)."""
        nodes = self.union.refresh()
        self.data.clear()
        log.info("refresh: dropping cached state of %d inodes", len(nodes))
        names: set[tuple[int, bytes]] = set()
        for node in nodes:
            if node.ino != ROOT_INO and node.parent is not None:
                names.add((node.parent.ino, node.name))
            if node.is_dir:  # names the kernel may hold as absent: everything the branches hold now
                names.update((node.ino, n) for n in self.union.branch_names(node))
        inos = [n.ino for n in nodes]
        if self.invalidate is not None:
            self.invalidate(sorted(names), inos)
            return
        for parent_ino, name in names:
            pyfuse3.invalidate_entry_async(parent_ino, name, ignore_enoent=True)
        trio.lowlevel.spawn_system_task(self._invalidate_inodes, inos)

    async def _invalidate_inodes(self, inos: list[int]) -> None:
        def run():
            for ino in inos:
                try:
                    pyfuse3.invalidate_inode(ino, attr_only=False)
                except OSError:
                    pass

        await trio.to_thread.run_sync(run)


def _repeats_data(fd: int, end: int, off: int, buf) -> bool:
    """Whether BUF, to be written at OFF, reaches past END, the end of the data of file FD,
    and repeats what FD holds before it. (The writeback cache writes back whole pages: an
    append to a file whose size is not a multiple of the page size writes the start of its
    last page again.)"""
    return off + len(buf) > end and os.pread(fd, end - off, off) == buf[:end - off]
