"""Incremental knowledge of a cachefiles tree, kept up to date by inotify.

cachefilesd C reads every directory of the cache on every pass. Here the tree is walked
once; afterwards inotify watches on ``cache/`` and on every volume, fan-out and nested
index directory report what appears and what goes:

- the kernel links a new object into its fan-out directory when it commits it (a new
  object is an unlinked tmpfile until then): ``IN_CREATE``;
- the kernel buries directories into ``graveyard/`` by rename: ``IN_MOVED_FROM``;
  a watched directory that is removed reports ``IN_DELETE_SELF``;
- unlinked files (``IN_DELETE``) are **not** watched for: nearly all of them are the
  daemon's own culls, one event each to read and apply, in the middle of the pass that
  culls (and enough of them overflow the event queue: a full re-walk). The culler
  tells the index what it removed (:meth:`TreeIndex.forget`), and a file removed by
  anyone else is forgotten when the next pass's ``stat`` does not find it;
- new volume and fan-out directories: ``IN_CREATE`` with ``IN_ISDIR``, watched at once
  and then listed (watch first, list second, so nothing created in between is missed).

A pass then only ``stat``s the objects it knows, for their atime and size, and never
lists a directory. When the event queue overflows (``IN_Q_OVERFLOW``: the kernel dropped
events) or a watch cannot be added (``fs.inotify.max_user_watches``), the index is
rebuilt by a full walk, or the caller falls back to full walks. An object the index
names but ``stat`` cannot find is simply forgotten.

Memory: the names of all objects, packed per directory into one NUL-separated byte
string (:class:`PackedNames`: about the name's length per object, against ~140 bytes for
a set of ``str``), so a million objects cost tens of MiB, not hundreds.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

import structlog

from cachefilesd_py.kernel import inotify
from cachefilesd_py.space.scan import (
    INDEX_PREFIXES,
    OBJECT_PREFIXES,
    Candidate,
    ScanResult,
    keep_oldest,
)

log = structlog.get_logger("space.index")

_F = inotify.flags
WATCH_MASK = (
    _F.CREATE
    | _F.MOVED_FROM
    | _F.MOVED_TO
    | _F.DELETE_SELF
    | _F.MOVE_SELF
    | _F.ONLYDIR
    | _F.DONT_FOLLOW
)


class PackedNames:
    """A set of file names packed into one ``bytearray``: ``\0a\0b\0...``. Adding is an
    append, removing a search and a cut: linear in the directory's size, which the
    fan-out keeps to a few hundred or thousand names."""

    __slots__ = ("_buf", "_count")

    def __init__(self) -> None:
        self._buf = bytearray(b"\0")
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, name: str) -> bool:
        return self._find(name) >= 0

    def _find(self, name: str) -> int:
        return self._buf.find(b"\0" + os.fsencode(name) + b"\0")

    def add(self, name: str) -> None:
        if name not in self:
            self._buf += os.fsencode(name) + b"\0"
            self._count += 1

    def discard(self, name: str) -> None:
        at = self._find(name)
        if at >= 0:
            del self._buf[at + 1 : at + 2 + len(os.fsencode(name))]
            self._count -= 1

    def __iter__(self) -> Iterator[str]:
        return iter([os.fsdecode(n) for n in bytes(self._buf).split(b"\0") if n])


class IndexUnavailable(OSError):
    """The tree cannot be watched (too many directories for the inotify limits)."""


class TreeIndex:
    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir.rstrip("/") or "/"
        self._inotify = inotify.open_inotify()
        self._dir_of_wd: dict[int, str] = {}
        self._wd_of_dir: dict[str, int] = {}
        #: directory -> names of the objects in it
        self._objects: dict[str, PackedNames] = {}
        #: directory -> names of strays (not cachefiles objects) in it
        self._strays: dict[str, PackedNames] = {}
        self.rebuilds = 0
        self.events = 0
        self.rebuild()

    # -- life cycle --------------------------------------------------------------------

    def fileno(self) -> int:
        return int(self._inotify.fileno())

    def close(self) -> None:
        self._inotify.close()

    def rebuild(self) -> None:
        """Forget everything and walk the tree again, watching each directory."""
        for wd in list(self._dir_of_wd):
            with contextlib.suppress(OSError):  # already gone with its directory
                self._inotify.rm_watch(wd)
        self._dir_of_wd.clear()
        self._wd_of_dir.clear()
        self._objects.clear()
        self._strays.clear()
        self.rebuilds += 1
        self._add_tree(self.cache_dir)

    def _add_tree(self, top: str) -> None:
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                wd = self._inotify.add_watch(directory, WATCH_MASK)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:  # out of inotify watches
                    raise IndexUnavailable(exc.errno, f"inotify watch limit: {directory}") from exc
                continue  # gone meanwhile
            self._dir_of_wd[wd] = directory
            self._wd_of_dir[directory] = wd
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            if entry.name.startswith(INDEX_PREFIXES):
                                stack.append(entry.path)
                            else:
                                self._strays.setdefault(directory, PackedNames()).add(entry.name)
                        else:
                            self._add_file(directory, entry.name)
            except OSError:
                continue

    def _add_file(self, directory: str, name: str) -> None:
        if name.startswith(OBJECT_PREFIXES) and directory != self.cache_dir:
            self._objects.setdefault(directory, PackedNames()).add(name)
        else:
            self._strays.setdefault(directory, PackedNames()).add(name)

    def _forget_file(self, directory: str, name: str) -> None:
        for table in (self._objects, self._strays):
            names = table.get(directory)
            if names is not None:
                names.discard(name)
                if not names:
                    del table[directory]

    def forget(self, directory: str, name: str) -> None:
        """``directory/name`` was removed by this process (a cull, a stray unlinked)."""
        self._forget_file(directory, name)

    def _forget_tree(self, top: str) -> None:
        prefix = top + os.sep
        for directory in [d for d in self._wd_of_dir if d == top or d.startswith(prefix)]:
            wd = self._wd_of_dir.pop(directory)
            self._dir_of_wd.pop(wd, None)
        for table in (self._objects, self._strays):
            for directory in [d for d in table if d == top or d.startswith(prefix)]:
                del table[directory]

    # -- events --------------------------------------------------------------------------

    def refresh(self) -> int:
        """Apply pending events (never blocks); returns how many were read."""
        n = 0
        while True:
            try:
                events = self._inotify.read(timeout=0)
            except BlockingIOError:
                events = []
            if not events:
                break
            n += len(events)
            for ev in events:
                if ev.mask & _F.Q_OVERFLOW:
                    log.warning("index.overflow", action="rebuild")
                    self.rebuild()
                    self.events += n
                    return n
                self._apply(ev)
        self.events += n
        return n

    def _apply(self, ev: inotify.Event) -> None:
        directory = self._dir_of_wd.get(ev.wd)
        if directory is None:
            return
        if ev.mask & _F.IGNORED or ev.mask & (_F.DELETE_SELF | _F.MOVE_SELF):
            self._forget_tree(directory)
            return
        path = os.path.join(directory, ev.name)
        if ev.mask & _F.ISDIR:
            if ev.mask & (_F.CREATE | _F.MOVED_TO):
                if ev.name.startswith(INDEX_PREFIXES):
                    self._add_tree(path)
                else:
                    self._strays.setdefault(directory, PackedNames()).add(ev.name)
            elif ev.mask & (_F.DELETE | _F.MOVED_FROM):
                self._forget_tree(path)
                self._forget_file(directory, ev.name)
        elif ev.mask & (_F.CREATE | _F.MOVED_TO):
            self._add_file(directory, ev.name)
        elif ev.mask & (_F.DELETE | _F.MOVED_FROM):
            self._forget_file(directory, ev.name)

    # -- queries -------------------------------------------------------------------------

    @property
    def watches(self) -> int:
        return len(self._dir_of_wd)

    def known_objects(self) -> int:
        return sum(len(names) for names in self._objects.values())

    def _candidates(self, result: ScanResult, under: str | None) -> Iterator[Candidate]:
        top = self.cache_dir + os.sep
        inside = None if under is None else under.rstrip(os.sep) + os.sep
        for directory, names in list(self._objects.items()):
            if inside is not None and not (directory + os.sep).startswith(inside):
                continue
            volume = directory[len(top) :].split(os.sep, 1)[0]
            # stat by name relative to the directory's fd: no path walk from "/" per
            # object (a third of a stat's cost on a deep cache path)
            try:
                dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue  # gone: its IN_DELETE_SELF / IN_MOVE_SELF is on its way
            try:
                blocks = 0
                for name in names:
                    try:
                        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        names.discard(name)  # removed behind the index: forget it now
                        continue
                    except OSError:
                        continue
                    blocks += st.st_blocks
                    yield Candidate(st.st_atime_ns, st.st_blocks, directory, name)
                result.volume_blocks[volume] = result.volume_blocks.get(volume, 0) + blocks
            finally:
                os.close(dir_fd)

    def scan(self, limit: int, under: str | None = None) -> ScanResult:
        """What :func:`space.scan.scan` returns for the cache (or for the directory
        ``under`` in it), from the index: ``stat`` calls only."""
        self.refresh()
        result = ScanResult(oldest=[])
        result.strays = [
            os.path.join(d, n) for d, names in self._strays.items() for n in sorted(names)
        ]
        keep_oldest(self._candidates(result, under), limit, result)
        parents = {os.path.dirname(d) for d in self._wd_of_dir}
        result.empty_dirs = [
            d
            for d in self._wd_of_dir
            if os.path.basename(d).startswith("@")
            and not self._objects.get(d)
            and not self._strays.get(d)
            and d not in parents
        ]
        return result
