"""The writable union: copy-up, whiteouts, creation, removal, rename, the hard-link index.

Operations take and return Nodes and raise OSError(errno) where a check fails. Writes go to
the top writable branch (or in place on a writable branch); read-only branches are never
modified. Copies are built in the work area and published with one rename (see copyup);
with `metacopy`, a change of metadata alone publishes a copy without data, filled in place
by the first write (see unionfs.metacopy).
"""

import errno
import logging
import os
import stat

from unionfs import syscalls
from unionfs.branches import BranchSpec
from unionfs.copyup import CopyJob, FillJob, temp_name
from unionfs.inodes import ROOT_INO, UNCHECKED, Key, Node, join
from unionfs.layers import remove_tree_at
from unionfs.merge import DT_DIR, DirHandle, MergedView, Probe, oserror
from unionfs.whiteout import OPAQUE, fits_whiteout, is_internal_xattr, whiteout_name

log = logging.getLogger(__name__)

NS = 1_000_000_000

__all__ = ["DirHandle", "Union"]


class Union(MergedView):
    """A union of branch directories, top first, with its writes."""

    def __init__(self, specs: list[BranchSpec], workdir: str | None = None, readonly: bool = False,
                 sync: bool = True, metacopy: bool = False):
        super().__init__(specs, workdir, readonly)
        self.sync = sync  # fsync copied-up data before publishing it
        # copy only metadata up for a change of metadata (see unionfs.metacopy)
        self.metacopy = metacopy
        # copies of hard-linked lower files, linked from the work area's index so that every
        # name of the file finds the copy, after a remount too: origin key -> index name
        self.index: dict[Key, bytes] = {}
        # (dev, ino) of each copy -> how many names its lower file had (see attr_nlink)
        self.indexed: dict[Key, int] = {}
        # called with a file's node just before its name goes from a writable branch (unlink,
        # or a rename over it) while the kernel still holds it (it may read on: the adapter
        # keeps the data open)
        self.before_unlink = None
        # called with every node copied up: fds the adapter holds of its lower data are stale
        self.after_copy_up = None
        # called with a file's node: an fd the adapter holds of its own file, whose name may
        # have gone (see before_unlink), or None
        self.own_file = None
        if self.top_rw is not None:
            for iname, ist in self.branches[self.top_rw].index_entries():
                try:
                    ident, _, links = iname.partition(b".")
                    key = tuple(int(x, 16) for x in ident.split(b"-"))
                    self.indexed[(ist.st_dev, ist.st_ino)] = int(links)
                except ValueError:
                    continue
                self.index[key] = iname
                self.origin[(ist.st_dev, ist.st_ino)] = key

    # ----------------------------------------------------------------- the hard-link index

    def _has_copy_elsewhere(self, b: int, st: os.stat_result) -> bool:
        """Whether a lower hard-linked file was copied up under another name (see _index)."""
        return (bool(self.index) and st.st_nlink > 1 and stat.S_ISREG(st.st_mode)
                and not self.branches[b].writable and (st.st_dev, st.st_ino) in self.index
                and not self.readonly)

    def _resolve_copy(self, parent: Node, name: bytes, p: Probe) -> Probe:
        """Link this name to the indexed copy of its file, so it shows the copy's data."""
        b, st = p.entries[0]
        if not self._has_copy_elsewhere(b, st):
            return p
        t = self.top_rw
        pfd = self.ensure_dir(t, parent)
        os.link(self.index[(st.st_dev, st.st_ino)], name, src_dir_fd=self.branches[t].index_fd,
                dst_dir_fd=pfd, follow_symlinks=False)
        return self.probe(parent, name)

    def _index(self, t: int, pfd: int, name: bytes, key: Key, st: os.stat_result, links: int) -> None:
        """Record the copy of a hard-linked lower file (LINKS names there) in the index."""
        iname = index_name(key, links)
        try:
            os.link(name, iname, src_dir_fd=pfd, dst_dir_fd=self.branches[t].index_fd,
                    follow_symlinks=False)
        except FileExistsError:
            return
        self.index[key] = iname
        self.indexed[(st.st_dev, st.st_ino)] = links

    def _index_only(self, t: int, node: Node, job: CopyJob) -> int | None:
        """Publish the copy of a hard-linked lower file whose name went into the index alone:
        the file's other names, when looked up, link to it and show what was written (as on
        overlayfs, which copies up at open). Its read-write fd; None if the index has one."""
        links = job.st.st_nlink
        iname = index_name(node.key, links)
        index_fd = self.branches[t].index_fd
        try:
            job.publish(index_fd, iname)
        except FileExistsError:
            return None
        fd = os.open(iname, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=index_fd)
        new = os.fstat(fd)
        self.index[node.key] = iname
        self.indexed[(new.st_dev, new.st_ino)] = links
        self.origin[(new.st_dev, new.st_ino)] = node.key
        return fd

    def attr_nlink(self, node: Node, st: os.stat_result) -> int:
        if self.indexed and (st.st_dev, st.st_ino) in self.indexed:
            # not counting the index's own link; names of the lower file that were not linked
            # to the copy yet still count (approximate after some of them are removed)
            return max(st.st_nlink - 1, self.indexed[(st.st_dev, st.st_ino)])
        return super().attr_nlink(node, st)

    # ----------------------------------------------------------------- writing helpers

    def require_writable(self) -> int:
        if self.top_rw is None:
            raise oserror(errno.EROFS)
        return self.top_rw

    def _target(self, parent: Node) -> int:
        """The branch where a new entry of directory PARENT goes."""
        t = self.require_writable()
        self.layers(parent)
        if t > parent.stop:
            raise oserror(errno.EROFS, parent.path)  # it would be hidden by a branch above
        return t

    def ensure_dir(self, t: int, node: Node) -> int:
        """Make directory NODE exist in branch T (copying up its ancestors); its fd there."""
        fd = self.dirs.lookup(t, node.path)
        if fd is not None:
            return fd
        layers = self.layers(node)
        if not layers:  # (it shows nothing: see _keep_in_place)
            raise oserror(errno.ENOENT, node.path)
        if t > node.stop:
            raise oserror(errno.EROFS, node.path)
        pfd = self.ensure_dir(t, node.parent)
        src_fd = self.dirs.get(layers[0], node.parent.path)
        st = syscalls.lstat_at(src_fd, node.name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise oserror(errno.ENOENT, node.path)
        job = CopyJob(src_fd, node.name, st, self.branches[t].work_fd)
        try:
            job.prepare()
            job.finish()
            self._publish(job, pfd, node.name)
        except BaseException:
            job.abort()
            raise
        fd = self.dirs.get(t, node.path)
        new = os.fstat(fd)
        self.origin[(new.st_dev, new.st_ino)] = node.key
        node.layers = tuple(sorted({*layers, t}))
        node.branch = node.layers[0]
        return fd

    def _whiteout(self, t: int, dfd: int, name: bytes) -> None:
        """Hide NAME below directory DFD of branch T: a `.wh.NAME` file, or where that name
        would be too long, overlayfs' form, a 0/0 character device named NAME. The device is
        made in the work area and renamed into place: over a file of that name in T, it
        replaces it at once (callers remove a directory of that name first)."""
        if fits_whiteout(name):
            try:
                self.branches[t].add_empty_file(dfd, whiteout_name(name))
            except FileExistsError:
                pass
            return
        work, tmp = self.branches[t].work_fd, temp_name()
        os.mknod(tmp, stat.S_IFCHR, 0, dir_fd=work)  # (no CAP_MKNOD needed for 0/0, Linux 5.8+)
        try:
            syscalls.renameat2(work, tmp, dfd, name)
        except BaseException:
            os.unlink(tmp, dir_fd=work)
            raise

    def _clear_whiteout(self, dfd: int, name: bytes) -> bool:
        """Remove a whiteout of NAME in directory DFD of a writable branch; whether one was there."""
        found = False
        if fits_whiteout(name):
            try:
                os.unlink(whiteout_name(name), dir_fd=dfd)
                found = True
            except FileNotFoundError:
                pass
        st = syscalls.lstat_at(dfd, name)
        if st is not None and syscalls.is_overlay_whiteout(st):
            os.unlink(name, dir_fd=dfd)
            found = True
        return found

    def _has_whiteout(self, dfd: int, name: bytes) -> bool:
        if fits_whiteout(name) and syscalls.exists_at(dfd, whiteout_name(name)):
            return True
        st = syscalls.lstat_at(dfd, name)
        return st is not None and syscalls.is_overlay_whiteout(st)

    def _owner(self, parent_fd: int, uid: int, gid: int) -> tuple[int, int, bool]:
        """Owner of a new entry: the caller, with the group of a setgid directory."""
        pst = os.fstat(parent_fd)
        if pst.st_mode & stat.S_ISGID:
            return uid, pst.st_gid, True
        return uid, gid, False

    # ----------------------------------------------------------------- copy-up

    def needs_copy_up(self, node: Node, meta: bool = False) -> bool:
        """Whether NODE must be copied up before a change (META: of its metadata alone): it
        is in a lower branch, or the change is to its data and it is a metadata-only copy."""
        if node.ino == ROOT_INO:
            return False
        if not self.branches[node.branch].writable:
            return True
        return not meta and node.data_at is not None and self.data_of(node) is not None

    def prepare_copy_up(self, node: Node, limit: int | None = None,
                        meta: bool = False) -> CopyJob | FillJob | None:
        """Start copying NODE up to the top writable branch; None if nothing is to copy.

        LIMIT: the change that follows truncates the file to that size, so copy no more.
        META: the change is one of metadata alone; a regular file may then get a
        metadata-only copy, if the union makes them.
        """
        if not self.needs_copy_up(node, meta):
            return None
        t = self.require_writable()
        if self.branches[node.branch].writable:  # a metadata-only copy, to fill
            return self._prepare_fill(node, limit)
        if t > node.branch:
            raise oserror(errno.EROFS, node.path)
        if node.is_dir:
            self.ensure_dir(t, node)
            return None
        pfd = self._ensure_parent(t, node)
        src = self.dirs.get(node.branch, node.parent.path)
        st = syscalls.lstat_at(src, node.name)
        if st is None:
            raise oserror(errno.ENOENT, node.path)
        up = syscalls.lstat_at(pfd, node.name) if pfd is not None else None
        if up is not None and self._key(up) == node.key:
            raise oserror(errno.EEXIST, node.path)  # (copied up meanwhile)
        # (another file there: its name was taken while the kernel held it, and the copy
        # stays nameless, see finish_copy_up)
        origin = node.path if self._metadata_only(st, limit, meta) \
            and not self._has_tail(node, st) else None
        job = CopyJob(src, node.name, st, self.branches[t].work_fd, limit, self.sync, origin)
        try:
            job.prepare()
            if stat.S_ISREG(st.st_mode):
                at = self.data_of(node, job.source_fd)
                if at is not None:  # itself a metadata-only copy
                    job.read_data_from(*self.data_location(at))
        except BaseException:
            job.abort()
            raise
        if origin is not None and job.origin is None:
            self.metacopy = False
            log.warning("branch %s keeps no user xattrs: copy-ups copy data", self.branches[t].path)
        return job

    def _metadata_only(self, st: os.stat_result, limit: int | None, meta: bool) -> bool:
        """Whether a lower file of attributes ST gets a metadata-only copy for a change (see
        prepare_copy_up): one name (a hard-linked file's copy goes to the index), some data."""
        return (meta and self.metacopy and limit is None and st.st_size > 0 and st.st_nlink == 1
                and stat.S_ISREG(st.st_mode))

    def copy_moves_no_data(self, node: Node, limit: int | None = None, meta: bool = False) -> bool:
        """Whether copying NODE up for a change (see prepare_copy_up) moves no data, so it is
        quick: a directory, symlink or device; an empty file; a metadata-only copy of a file
        whose name still shows it (else it gets its data: see finish_copy_up)."""
        if node.is_dir:
            return True
        if self.branches[node.branch].writable:  # a metadata-only copy, to fill
            return False
        try:
            st = syscalls.lstat_at(self.dirs.get(node.branch, node.parent.path), node.name)
        except OSError:
            return False
        if st is None:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or limit == 0:
            return True
        return self._metadata_only(st, limit, meta) and self._shows(node, st) \
            and not self._has_tail(node, st)

    def _has_tail(self, node: Node, st: os.stat_result) -> bool:
        """Whether lower file NODE, of attributes ST, is a metadata-only copy holding bytes past
        its lower data (see metacopy: no metadata-only copy may be made of it)."""
        at = self.data_of(node)
        if at is None or at[0] < 0:
            return False
        data = syscalls.lstat_at(*self.data_location(at))
        return data is not None and st.st_size > data.st_size

    def _prepare_fill(self, node: Node, limit: int | None) -> FillJob:
        own = self.own_file(node) if self.own_file is not None else None
        if own is not None:  # (its name may be gone, or name another file by now)
            dfd, name = own, None
        else:
            dfd, name = self._location(node)
        data_dirfd, data_name = self.data_location(node.data_at)
        job = FillJob(data_dirfd, data_name, dfd, name, limit, self.sync)
        try:
            job.prepare()
        except BaseException:
            job.abort()
            raise
        return job

    def finish_copy_up(self, node: Node, job: CopyJob) -> int | None:
        """Publish a prepared copy: metadata, then one rename into the writable branch.

        If the name no longer shows the file copied (removed or replaced meanwhile, while the
        kernel still has it open), the copy stays an unlinked file: its read-write fd is returned.
        """
        if isinstance(job, FillJob):
            try:
                job.finish()
            except BaseException:
                job.abort()
                raise
            self.filled(node)
            return None
        try:
            t = self.require_writable()
            if not self.needs_copy_up(node, meta=True):  # copied meanwhile (a directory rename did it)
                job.abort()
                return None
            # the name must still show the entry we copied: not removed, not replaced (a
            # hard-linked file continues under another known name that still shows it)
            shows = self._shows(node, job.st) or self._take_alias(node)
            pfd = self._ensure_parent(t, node) if shows else None
            if pfd is None:
                if not stat.S_ISREG(job.st.st_mode):
                    raise oserror(errno.ESTALE, node.path)
                job.with_data()  # (no name left to find its lower file by)
                job.finish()
                fd = self._index_only(t, node, job) if job.st.st_nlink > 1 else None
                if fd is None:  # a nameless copy, which stands for no other name
                    fd = job.detach()
                    self.table.rekey(node, (-1, node.ino))
                node.data_at = None
                self._copied(node, t)
                return fd
            job.finish()
            self._publish(job, pfd, node.name)
        except BaseException:
            job.abort()
            raise
        new = syscalls.lstat_at(pfd, node.name)
        self.origin[(new.st_dev, new.st_ino)] = node.key
        if job.origin is not None:  # (the lower file, or where its data is)
            node.data_at = node.data_at or (node.branch, job.origin)
        else:
            node.data_at = None
        self._copied(node, t)
        if job.origin is not None and self.after_metadata_only is not None:
            self.after_metadata_only(node)
        if job.st.st_nlink > 1 and stat.S_ISREG(job.st.st_mode):
            self._index(t, pfd, node.name, node.key, new, job.st.st_nlink)
        self._link_aliases(node, t, pfd)
        return None

    def filled(self, node: Node) -> None:
        """NODE, a metadata-only copy, holds its data now."""
        node.data_at = None
        self._copied(node, node.branch)

    def _ensure_parent(self, t: int, node: Node) -> int | None:
        """The fd of NODE's directory in branch T, copied up if need be; None if that
        directory went from the merged view (a file removed with its directory while the
        kernel held it open: its copy will have no name)."""
        try:
            return self.ensure_dir(t, node.parent)
        except FileNotFoundError:
            return None

    def _take_alias(self, node: Node) -> bool:
        """NODE's name no longer shows it: continue under another known name that does."""
        for path, parent in list((node.aliases or {}).items()):
            del node.aliases[path]
            if self._shows_at(parent, path, node):
                node.path, node.parent = path, parent
                return True
        return False

    def _shows(self, node: Node, st: os.stat_result) -> bool:
        """Whether NODE's name still shows the entry of NODE's branch that ST describes."""
        try:
            p = self.probe(node.parent, node.name)
        except FileNotFoundError:
            return False
        if not p.entries:
            return False
        b, now = p.entries[0]
        return b == node.branch and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    def times_of_nameless(self, node: Node, atime_ns: int | None,
                          mtime_ns: int | None) -> os.stat_result | None:
        """Attributes of a lower file whose name went, with new times, without a copy-up.

        Nothing can show the times of a file that has no name left once the kernel drops it,
        and under the writeback cache the kernel sends them for every removed file it drops:
        copying each one up to set them cost a copy of its data. (An fd still open on such
        a file sees the new times while the kernel caches them.) None if NODE is not a lower
        file whose name went.
        """
        if node.is_dir or node.parent is None or not self.needs_copy_up(node, meta=True):
            return None
        try:
            st = syscalls.lstat_at(self.dirs.get(node.branch, node.parent.path), node.name)
        except OSError:
            return None  # (its directory went too: the copy-up path says what is wrong)
        if st is None or not stat.S_ISREG(st.st_mode) or self._shows(node, st):
            return None
        a = st.st_atime_ns if atime_ns is None else atime_ns
        m = st.st_mtime_ns if mtime_ns is None else mtime_ns
        return os.stat_result(
            (st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
             a // NS, m // NS, int(st.st_ctime)),
            {"st_atime": a / NS, "st_mtime": m / NS, "st_ctime": st.st_ctime, "st_atime_ns": a,
             "st_mtime_ns": m, "st_ctime_ns": st.st_ctime_ns, "st_blksize": st.st_blksize,
             "st_blocks": st.st_blocks, "st_rdev": st.st_rdev})

    def _copied(self, node: Node, t: int) -> None:
        """NODE's data now lives in branch T: forget what was known of the lower copy."""
        node.branch = t
        node.xattrs = None
        if self.after_copy_up is not None:
            self.after_copy_up(node)

    def _link_aliases(self, node: Node, t: int, pfd: int) -> None:
        """Other known names of a copied-up hard-linked file become links to the copy (pseudo-links)."""
        for path, parent in list((node.aliases or {}).items()):
            name = path.rpartition(b"/")[2]
            try:
                afd = self.ensure_dir(t, parent)
                if not syscalls.exists_at(afd, name):
                    os.link(node.name, name, src_dir_fd=pfd, dst_dir_fd=afd, follow_symlinks=False)
            except OSError as e:
                log.warning("cannot link %r to its copied-up hard link: %s", path, e)
                del node.aliases[path]

    def _publish(self, job: CopyJob, pfd: int, name: bytes) -> None:
        """Rename a finished copy into place; the parent keeps its times, as a copy is no change."""
        pst = os.fstat(pfd)
        job.publish(pfd, name)
        os.utime(syscalls.proc_path(pfd), ns=(pst.st_atime_ns, pst.st_mtime_ns))

    def copy_up(self, node: Node, meta: bool = False) -> None:
        job = self.prepare_copy_up(node, meta=meta)
        if job is not None:
            job.copy_data()
            fd = self.finish_copy_up(node, job)
            if fd is not None:  # (callers reach files the kernel holds by their names)
                os.close(fd)

    def _copy_up_name(self, parent: Node, name: bytes, p: Probe, t: int) -> Node:
        """Make the winner of a probed name exist in branch T; its node."""
        node, _ = self._node_from(parent, name, p)
        b = p.entries[0][0]
        if b == t:
            return node
        if node.is_dir:
            self.ensure_dir(t, node)
            return node
        if node.branch == t:
            # another name of this file was copied up already: link to it (a pseudo-link)
            pfd = self.ensure_dir(t, parent)
            sfd, sname = self._location(node)
            os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
            if node.aliases is not None:
                node.aliases.pop(join(parent.path, name), None)
            return node
        path = join(parent.path, name)
        if node.path != path or node.parent is not parent:
            old_path, old_parent = node.path, node.parent
            node.path, node.parent = path, parent
            if node.aliases:
                node.aliases.pop(path, None)
            if old_parent is not None and self._shows_at(old_parent, old_path, node):
                # another name of this hard-linked file: the copy-up links it too
                node.aliases = node.aliases or {}
                node.aliases[old_path] = old_parent
        if node.branch != b:
            node.branch, node.data_at = b, UNCHECKED
        self.copy_up(node, meta=True)
        return node

    def _shows_at(self, parent: Node, path: bytes, node: Node) -> bool:
        """Whether merged PATH (in directory PARENT) still names NODE's file."""
        p = self.probe(parent, path.rpartition(b"/")[2])
        return bool(p.entries) and self._key(p.entries[0][1]) == node.key

    def _copy_up_tree(self, node: Node, t: int, top: bool = True) -> None:
        """Copy a whole merged directory into branch T, so it can move as one directory."""
        self.ensure_dir(t, node)
        for name, b, _, kind in self.listdir(node):
            if b == t and kind != DT_DIR:
                continue
            p = self.probe(node, name)
            if not p.entries:
                continue
            child = self._copy_up_name(node, name, p, t)
            if child.is_dir:
                self._copy_up_tree(child, t, top=False)
            self.table.drop_if_unused(child)
        if top:
            self._make_opaque(self.dirs.get(t, node.path))
        node.layers, node.stop, node.branch = (t,), t, t

    def _make_opaque(self, dfd: int) -> None:
        try:
            os.close(os.open(OPAQUE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd))
        except FileExistsError:
            pass

    # ----------------------------------------------------------------- creating

    def _prepare_new(self, parent: Node, name: bytes) -> tuple[int, int, bool]:
        """Checks for a new entry: (branch, its directory fd there, whether a whiteout stood there)."""
        self.check_name(name)
        t = self._target(parent)
        p = self.probe(parent, name)
        if p.entries:
            raise oserror(errno.EEXIST, name)
        if p.stop < t:
            raise oserror(errno.EROFS, name)
        pfd = self.ensure_dir(t, parent)
        wh = self._has_whiteout(pfd, name)
        if wh:
            st = syscalls.lstat_at(pfd, name)
            if st is not None and syscalls.is_overlay_whiteout(st):
                # a device whiteout holds the very name: it goes first (a crash before the
                # new entry is made shows the lower entry again, never a half-made one)
                os.unlink(name, dir_fd=pfd)
        return t, pfd, wh

    def _new_node(self, parent: Node, name: bytes, pfd: int) -> tuple[Node, os.stat_result]:
        st = syscalls.lstat_at(pfd, name)
        for h in parent.handles or ():
            h.removed.discard(name)
        return self._add_new(parent, join(parent.path, name), st), st

    def _add_new(self, parent: Node, path: bytes, st: os.stat_result) -> Node:
        """The node of a file just made in the top writable branch, at PATH in PARENT."""
        key = (st.st_dev, st.st_ino)
        # a new file: whatever was known of an earlier file with its inode number is stale
        self.origin.pop(key, None)
        old = self.table.by_key.get(key)
        if old is not None:  # a stale node whose inode number the filesystem reused
            self.table.rekey(old, (-1, old.ino))
        node = Node(self.table.ino_for(key), key, path, self.top_rw, stat.S_ISDIR(st.st_mode))
        node.parent = parent
        node.data_at = None
        if node.is_dir:
            node.layers, node.stop = (self.top_rw,), self.top_rw
        self.table.add(node)
        return node

    def create(self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int):
        """Create and open a regular file; returns (fd, node, attrs)."""
        _, pfd, wh = self._prepare_new(parent, name)
        uid, gid, _ = self._owner(pfd, uid, gid)
        # read-write whatever the caller asked: the fd serves every open of the file
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        fd = os.open(name, _open_flags(flags) | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode), dir_fd=pfd)
        try:
            os.fchown(fd, uid, gid)
            if wh:
                self._clear_whiteout(pfd, name)
            node, st = self._new_node(parent, name, pfd)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=pfd)
            raise
        return fd, node, st

    def tmpfile(self, parent: Node, mode: int, flags: int, uid: int, gid: int):
        """Create an open file with no name in directory PARENT (O_TMPFILE): made in PARENT's
        directory of the writable branch, copied up first if need be, as overlayfs does; it
        gets a name if the kernel links it (see link). Returns (fd, node, attrs)."""
        t = self._target(parent)
        pfd = self.ensure_dir(t, parent)
        uid, gid, _ = self._owner(pfd, uid, gid)
        flags = (flags & ~(os.O_ACCMODE | os.O_TMPFILE)) | os.O_RDWR
        fd = os.open(b".", _open_flags(flags) | os.O_TMPFILE, stat.S_IMODE(mode), dir_fd=pfd)
        try:
            os.fchown(fd, uid, gid)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        # (no name: its path, PARENT/, names nothing, so only its fd reaches it)
        return fd, self._add_new(parent, parent.path + b"/", st), st

    def _make(self, parent: Node, name: bytes, uid: int, gid: int, build) -> tuple[Node, os.stat_result]:
        """Create a non-directory with BUILD(dirfd, name) and give it to the caller."""
        _, pfd, wh = self._prepare_new(parent, name)
        uid, gid, _ = self._owner(pfd, uid, gid)
        build(pfd, name)
        try:
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            if wh:
                self._clear_whiteout(pfd, name)
        except BaseException:
            os.unlink(name, dir_fd=pfd)
            raise
        return self._new_node(parent, name, pfd)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int):
        if stat.S_ISCHR(mode) and rdev == 0:
            raise oserror(errno.EPERM, name)  # that is how overlayfs spells a whiteout
        return self._make(parent, name, uid, gid, lambda fd, n: os.mknod(n, mode, rdev, dir_fd=fd))

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int):
        return self._make(parent, name, uid, gid, lambda fd, n: os.symlink(target, n, dir_fd=fd))

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int):
        t, pfd, wh = self._prepare_new(parent, name)
        uid, gid, setgid = self._owner(pfd, uid, gid)
        mode = stat.S_IMODE(mode) | (stat.S_ISGID if setgid else 0)
        if not wh:
            os.mkdir(name, 0o700, dir_fd=pfd)
            try:
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
                os.chmod(name, mode, dir_fd=pfd)
            except BaseException:
                os.rmdir(name, dir_fd=pfd)
                raise
        else:
            # where a whiteout stood: build an opaque directory aside, publish it, then drop
            # the whiteout, so old lower content can never show through
            work = self.branches[t].work_fd
            tmp = temp_name()
            os.mkdir(tmp, 0o700, dir_fd=work)
            try:
                dfd = syscalls.open_beneath(work, tmp)
                try:
                    self._make_opaque(dfd)
                finally:
                    os.close(dfd)
                os.chown(tmp, uid, gid, dir_fd=work, follow_symlinks=False)
                os.chmod(tmp, mode, dir_fd=work)
                syscalls.renameat2(work, tmp, pfd, name, syscalls.RENAME_NOREPLACE)
            except BaseException:
                remove_tree_at(work, tmp)
                raise
            self._clear_whiteout(pfd, name)
        return self._new_node(parent, name, pfd)

    def link(self, node: Node, parent: Node, name: bytes, fd: int | None = None) -> tuple[Node, os.stat_result]:
        """Give NODE the new name NAME in PARENT; FD: its open data, by which a file with no
        name yet (O_TMPFILE) is linked."""
        if node.is_dir:
            raise oserror(errno.EPERM, name)
        _, pfd, wh = self._prepare_new(parent, name)
        self.copy_up(node, meta=True)
        if node.branch != self.top_rw:
            raise oserror(errno.EXDEV, name)
        if not node.name and fd is not None:  # (the kernel links only such a nameless file)
            os.link(syscalls.proc_path(fd), name, dst_dir_fd=pfd, follow_symlinks=True)
        else:
            sfd, sname = self._location(node)
            os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
        if wh:
            self._clear_whiteout(pfd, name)
        if not node.name:
            node.path, node.parent = join(parent.path, name), parent
        else:
            if node.aliases is None:
                node.aliases = {}
            node.aliases[join(parent.path, name)] = parent
        for h in parent.handles or ():
            h.removed.discard(name)
        return node, self.stat(node)

    # ----------------------------------------------------------------- removing

    def _forget_name(self, parent: Node, name: bytes, node: Node | None) -> None:
        for h in parent.handles or ():
            h.removed.add(name)
        if node is None:
            return
        path = join(parent.path, name)
        if node.aliases and path in node.aliases:
            del node.aliases[path]
        elif node.path == path and node.aliases:
            self._stat_alias(node)

    def _remove(self, parent: Node, name: bytes, want_dir: bool) -> None:
        self.require_writable()
        p = self.probe(parent, name, full=True)
        if not p.entries:
            raise oserror(errno.ENOENT, name)
        b, st = p.entries[0]
        is_dir = stat.S_ISDIR(st.st_mode)
        if want_dir and not is_dir:
            raise oserror(errno.ENOTDIR, name)
        if not want_dir and is_dir:
            raise oserror(errno.EISDIR, name)
        node = self.table.by_key.get(self._key(st))
        if is_dir:
            dnode = node or Node(0, (0, 0), join(parent.path, name), b, True)
            if node is None:
                dnode.parent, dnode.layers, dnode.stop = parent, tuple(p.layers), p.stop
            if self.listdir(dnode):
                raise oserror(errno.ENOTEMPTY, name)
        if is_dir:
            self.dirs.forget(join(parent.path, name))  # its fds, and those of what was below it
        if self.branches[b].writable:
            dfd = self.dirs.get(b, parent.path)
            hide = p.below(b)
            # the whiteout first: a crash leaves the entry, never lower data; a device
            # whiteout (see _whiteout) takes the entry's own name, so it comes after
            if hide and fits_whiteout(name):
                self._whiteout(b, dfd, name)
            if is_dir:
                remove_tree_at(dfd, name)  # only whiteouts and markers are left in it
            elif node is not None and node.lookups > 0 and self.before_unlink is not None:
                self.before_unlink(node)
            if hide and not fits_whiteout(name):
                self._whiteout(b, dfd, name)  # (over a file: replaces it at once)
            elif not is_dir:
                os.unlink(name, dir_fd=dfd)
            if not is_dir and st.st_nlink <= 1:
                self.origin.pop((st.st_dev, st.st_ino), None)
                if node is not None and not node.aliases:
                    self.table.rekey(node, (-1, node.ino))
        else:
            t = self._target(parent)
            self._whiteout(t, self.ensure_dir(t, parent), name)
        self._forget_name(parent, name, node)

    def unlink(self, parent: Node, name: bytes) -> None:
        self._remove(parent, name, want_dir=False)

    def rmdir(self, parent: Node, name: bytes) -> None:
        self._remove(parent, name, want_dir=True)

    # ----------------------------------------------------------------- rename

    def rename(self, old_parent: Node, old: bytes, new_parent: Node, new: bytes, flags: int = 0) -> None:
        t = self.require_writable()
        self.check_name(new)
        src = self.probe(old_parent, old, full=True)
        if not src.entries:
            raise oserror(errno.ENOENT, old)
        dst = self.probe(new_parent, new, full=True)
        src_dir = stat.S_ISDIR(src.entries[0][1].st_mode)
        if dst.entries:
            if flags & syscalls.RENAME_NOREPLACE:
                raise oserror(errno.EEXIST, new)
            dst_dir = stat.S_ISDIR(dst.entries[0][1].st_mode)
            if not flags & syscalls.RENAME_EXCHANGE:
                if src_dir and not dst_dir:
                    raise oserror(errno.ENOTDIR, new)
                if dst_dir and not src_dir:
                    raise oserror(errno.EISDIR, new)
                if self._key(src.entries[0][1]) == self._key(dst.entries[0][1]):
                    return  # two names of one file: nothing to do
                if dst_dir:
                    dnode, _ = self._node_from(new_parent, new, dst)
                    if self.listdir(dnode):
                        raise oserror(errno.ENOTEMPTY, new)
        elif flags & syscalls.RENAME_EXCHANGE:
            raise oserror(errno.ENOENT, new)
        if new_parent.path == join(old_parent.path, old) or new_parent.path.startswith(join(old_parent.path, old) + b"/"):
            raise oserror(errno.EINVAL, new)
        if t > old_parent.stop or t > new_parent.stop:
            raise oserror(errno.EROFS)

        # everything involved must live in the top writable branch; an entry on another
        # writable branch is not moved across branches (mv copies on EXDEV)
        for p in (src, dst):
            if p.entries and p.entries[0][0] != t and self.branches[p.entries[0][0]].writable:
                raise oserror(errno.EXDEV, new)
        node = self._copy_up_name(old_parent, old, src, t)
        if node.is_dir and (len(self.layers(node)) > 1 or node.branch != t):
            self._copy_up_tree(node, t)
        other = None
        if flags & syscalls.RENAME_EXCHANGE:
            # (copying the source up may have linked this name already: a hard link of a
            # file inside it)
            dst = self.probe(new_parent, new, full=True)
            other = self._copy_up_name(new_parent, new, dst, t)
            if other.is_dir and (len(self.layers(other)) > 1 or other.branch != t):
                self._copy_up_tree(other, t)
        ofd = self.ensure_dir(t, old_parent)
        nfd = self.ensure_dir(t, new_parent)

        old_path, new_path = join(old_parent.path, old), join(new_parent.path, new)
        if flags & syscalls.RENAME_EXCHANGE:
            # each directory now stands where the other's lower content may be
            if node.is_dir and dst.below(t):
                self._make_opaque(self.dirs.get(t, old_path))
            if other.is_dir and src.below(t):
                self._make_opaque(self.dirs.get(t, new_path))
            syscalls.renameat2(ofd, old, nfd, new, syscalls.RENAME_EXCHANGE)
            self.dirs.forget(old_path)
            self.dirs.forget(new_path)
            # one subtree at a time, through a path no entry can have: moved straight across,
            # NODE's descendants would be moved back with OTHER's
            parking = b"\0exchange"
            self._move_node(node, old_path, parking, new_parent)
            self._move_node(other, new_path, old_path, old_parent)
            self._move_node(node, parking, new_path, new_parent)
            return

        replaced = None
        if dst.entries:
            replaced = self.table.by_key.get(self._key(dst.entries[0][1]))
        new_wh = self._has_whiteout(nfd, new)
        if node.is_dir and (dst.below(t) or new_wh):
            self._make_opaque(self.dirs.get(t, old_path))
        dst_st = syscalls.lstat_at(nfd, new)
        if dst_st is not None and stat.S_ISDIR(dst_st.st_mode):
            self._empty_dir(nfd, new)
        elif dst_st is not None and node.is_dir and syscalls.is_overlay_whiteout(dst_st):
            os.unlink(new, dir_fd=nfd)  # (a directory cannot be renamed over a device whiteout)
        # the whiteout before the move: a crash leaves both names, never lower data (a device
        # whiteout takes the moved entry's own name: after it)
        if src.below(t) and fits_whiteout(old):
            self._whiteout(t, ofd, old)
        if replaced is not None and replaced is not node and not replaced.is_dir \
                and replaced.lookups > 0 and dst.entries[0][0] == t and self.before_unlink is not None:
            self.before_unlink(replaced)  # the name it loses may have been its last
        syscalls.renameat2(ofd, old, nfd, new)
        if src.below(t) and not fits_whiteout(old):
            self._whiteout(t, ofd, old)
        if new_wh:
            self._clear_whiteout(nfd, new)
        self.dirs.forget(old_path)
        self.dirs.forget(new_path)
        for h in old_parent.handles or ():
            h.removed.add(old)
        for h in new_parent.handles or ():
            h.removed.discard(new)
        if replaced is not None and replaced is not node:
            if dst_st is not None and dst_st.st_nlink <= 1 and not replaced.aliases:
                self.origin.pop((dst_st.st_dev, dst_st.st_ino), None)
                self.table.rekey(replaced, (-1, replaced.ino))
            elif replaced.aliases:
                self._forget_name(new_parent, new, replaced)
        self._move_node(node, old_path, new_path, new_parent)

    def _empty_dir(self, dfd: int, name: bytes) -> None:
        """Remove the markers left in an (empty in the merged view) directory about to be replaced."""
        fd = syscalls.open_beneath(dfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = [os.fsencode(n) for n in os.listdir(fd)]
            for n in names:
                remove_tree_at(fd, n)
        finally:
            os.close(fd)

    def _move_node(self, node: Node, old_path: bytes, new_path: bytes, new_parent: Node) -> None:
        if node.aliases and old_path in node.aliases:
            del node.aliases[old_path]
            node.aliases[new_path] = new_parent
        else:
            node.path, node.parent = new_path, new_parent
        if node.is_dir:
            prefix = old_path + b"/"
            ghosts: dict[bytes, Node] = {}
            for n in self.table.under(old_path):
                if not n.is_dir and not self.branches[n.branch].writable:
                    self._keep_in_place(n, ghosts)
                    continue
                n.path = new_path + n.path[len(old_path):]
            for n in self.table.by_ino.values():
                if n.aliases:
                    n.aliases = {
                        (new_path + p[len(old_path):] if p.startswith(prefix) else p): par
                        for p, par in n.aliases.items()
                    }

    def _keep_in_place(self, node: Node, ghosts: dict[bytes, Node]) -> None:
        """A lower file left below a directory that moves: every one still shown was copied
        up with it, so this one's name went while the kernel held it (it may still read or
        write it). It keeps its lower path, under a directory node that shows nothing (so a
        copy-up makes a copy with no name), whatever the merged tree puts there now."""
        directory = node.path.rpartition(b"/")[0]
        ghost = ghosts.get(directory)
        if ghost is None:
            ghost = ghosts[directory] = Node(0, (-1, 0), directory, node.branch, True)
            ghost.layers = ()
        node.parent = ghost

    # ----------------------------------------------------------------- data and attributes

    def open_own(self, node: Node, flags: int) -> int:
        """Open NODE's own file in its branch, as it is (no copy-up, no metadata-only copy's
        lower file)."""
        dfd, name = self._location(node)
        return os.open(name, _open_flags(flags), dir_fd=dfd)

    def open(self, node: Node, flags: int) -> int:
        """Open NODE's data; copied up first when opened for writing (the data of a
        metadata-only copy is its lower file's, until then)."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.require_writable()
            self.copy_up(node)
        fd = self.open_own(node, flags)
        if node.data_at is not None:
            try:
                at = self.data_of(node, fd)
                if at is not None:
                    dfd, name = self.data_location(at)
                    data_fd = os.open(name, _open_flags(flags), dir_fd=dfd)
                    os.close(fd)
                    fd = data_fd
            except BaseException:
                os.close(fd)
                raise
        return fd

    def setattr(self, node: Node, fd: int | None, mode=None, uid=None, gid=None, size=None,
                atime_ns=None, mtime_ns=None) -> os.stat_result:
        """Change NODE's attributes; FD: its writable data fd if open (then every change goes
        through it: fewer lookups, and it works on a file whose name went while open)."""
        self.require_writable()
        self.copy_up(node, meta=size is None)
        if fd is not None:
            where: dict = {}
            target: int | bytes = fd
        else:
            if node.ino == ROOT_INO:
                dfd, target = self.branches[self.layers(node)[0]].fd, b"."
                if not self.branches[self.layers(node)[0]].writable:
                    raise oserror(errno.EROFS)
            else:
                dfd, target = self._location(node)
            where = {"dir_fd": dfd, "follow_symlinks": False}
        if size is not None:
            if fd is not None:
                os.ftruncate(fd, size)
            else:
                tfd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    os.ftruncate(tfd, size)
                finally:
                    os.close(tfd)
        if uid is not None or gid is not None:
            node.xattrs = None  # a chown drops file capabilities
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid, **where)
        if mode is not None and (fd is not None or not stat.S_ISLNK(os.stat(target, **where).st_mode)):
            os.chmod(target, stat.S_IMODE(mode), dir_fd=where.get("dir_fd"))
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                st = os.stat(target, **where)
                atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
            os.utime(target, ns=(atime_ns, mtime_ns), **where)
        return self.with_data_blocks(node, os.fstat(fd)) if fd is not None else self.stat(node)

    def setxattr(self, node: Node, name: bytes, value: bytes, fd: int | None = None) -> None:
        """Set NODE's attribute NAME; FD: an open fd of its own file, whose name may be gone."""
        if is_internal_xattr(name):
            raise oserror(errno.EPERM)
        target, follow = self._xattrs_to_change(node, fd)
        os.setxattr(target, name, value, follow_symlinks=follow)

    def removexattr(self, node: Node, name: bytes, fd: int | None = None) -> None:
        if is_internal_xattr(name):
            raise oserror(errno.ENODATA)
        target, follow = self._xattrs_to_change(node, fd)
        os.removexattr(target, name, follow_symlinks=follow)

    def _xattrs_to_change(self, node: Node, fd: int | None) -> tuple[bytes | int, bool]:
        """NODE copied up for an xattr change, its remembered names dropped: where to change."""
        self.require_writable()
        self.copy_up(node, meta=True)
        if node.ino == ROOT_INO and not self.branches[self.layers(node)[0]].writable:
            raise oserror(errno.EROFS)
        node.xattrs = None
        return (fd, True) if fd is not None else self._xattr_path(node)

    def fsyncdir(self, node: Node) -> None:
        if node.branch is None or not self.branches[node.branch].writable:
            return
        dfd = self.dirs.lookup(node.branch, node.path)
        if dfd is not None:
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
def _open_flags(flags: int) -> int:
    """Flags to open a branch file with, for a kernel open request."""
    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)
    return flags | os.O_NOFOLLOW | os.O_CLOEXEC


def index_name(key: Key, links: int) -> bytes:
    """The index's name for the copy of lower file KEY, which had LINKS names (see Union.index)."""
    return b"%x-%x.%d" % (*key, links)
