"""Streaming scan of a cachefiles tree for cull candidates, in bounded memory.

Layout (Linux ≥ 5.17): ``<dir>/cache/I<volume>/@<xx>/<object>`` where object names start
with ``D``, ``S``, ``T`` or ``E`` (data files) and fan-out directories are ``@00``..``@ff``.
Older NFS trees nest index directories (``J``/``K`` names), which the scan walks too.

cachefilesd C keeps two sorted arrays of 2^culltable entries and re-walks the whole tree
for every table's worth of victims. Here a fixed-size heap keeps the ``limit`` oldest
objects by atime in one pass (``O(n log limit)`` time, ``O(limit)`` memory), and the
caller asks for as many as it needs to free the space it must; strays (names that are
not cachefiles objects) are reported so they can be removed as cachefilesd does.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

OBJECT_PREFIXES = ("D", "S", "T", "E")
INDEX_PREFIXES = ("I", "J", "K", "@")


class Candidate(NamedTuple):
    """One object and what ranking and culling it needs. A tuple, so making one costs
    a fraction of a frozen dataclass's ``__init__`` and sorting compares in C: a pass
    makes one per object, up to millions (docs/benchmarks.md, "Classic mode vs
    cachefilesd C"). Ordered by atime first."""

    atime_ns: int
    blocks: int
    directory: str
    name: str

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)


@dataclass
class ScanResult:
    oldest: list[Candidate]
    objects: int = 0
    blocks: int = 0
    strays: list[str] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)
    #: 512-byte blocks per volume directory (``I...``) under ``cache/``
    volume_blocks: dict[str, int] = field(default_factory=dict)


def walk_objects(cache_dir: str, result: ScanResult) -> Iterator[Candidate]:
    """Every object under ``cache_dir``, with its ``stat``.

    Each directory is opened once and listed through its fd, so every ``stat`` is an
    ``fstatat`` relative to that fd (as cachefilesd C does): no walk of the object's
    whole path from ``/`` per object, which is the dominant cost of a pass when the
    path crosses a slow or revalidating filesystem (the test guest's root is 9p;
    docs/benchmarks.md, "Classic mode vs cachefilesd C"). The per-object work is kept
    to the ``fstatat`` and one tuple: a volume's blocks are summed per directory."""
    stack: list[tuple[str, str]] = [(cache_dir, "")]
    strays = result.strays
    while stack:
        directory, volume = stack.pop()
        entries = 0
        blocks = 0
        at_top = directory == cache_dir
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            with os.scandir(dir_fd) as it:
                for entry in it:
                    entries += 1
                    name = entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if name.startswith(INDEX_PREFIXES):
                                stack.append((os.path.join(directory, name), volume or name))
                            else:
                                strays.append(os.path.join(directory, name))
                            continue
                        if at_top or not name.startswith(OBJECT_PREFIXES):
                            strays.append(os.path.join(directory, name))
                            continue
                        st = entry.stat(follow_symlinks=False)  # fstatat(dir_fd, name)
                    except OSError:
                        continue
                    blocks += st.st_blocks
                    yield Candidate(st.st_atime_ns, st.st_blocks, directory, name)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
            if blocks:
                result.volume_blocks[volume] = result.volume_blocks.get(volume, 0) + blocks
        if entries == 0 and os.path.basename(directory).startswith("@"):
            result.empty_dirs.append(directory)


def keep_oldest(candidates: Iterable[Candidate], limit: int, result: ScanResult) -> None:
    """Count every candidate into ``result`` and keep the ``limit`` oldest by atime.

    Candidates are appended to a buffer that is cut back to the ``limit`` oldest
    whenever it reaches twice that (``O(n log limit)`` time, at most ``2 * limit``
    held): per candidate that is one ``append``, where a heap costs a push or a
    compare-and-replace in Python for each. Ties in atime keep walk order."""
    limit = max(0, limit)
    buffer: list[Candidate] = []
    objects = 0
    blocks = 0
    high = 2 * limit if limit else 0
    append = buffer.append
    for cand in candidates:
        objects += 1
        blocks += cand.blocks
        if not limit:
            continue
        append(cand)
        if len(buffer) >= high:
            buffer.sort(key=_by_atime)
            del buffer[limit:]
    buffer.sort(key=_by_atime)
    del buffer[limit:]
    result.objects += objects
    result.blocks += blocks
    result.oldest = buffer


#: the sort key of a candidate: its atime (a C-level getter, no Python call per item)
_by_atime = operator.itemgetter(0)


def scan(cache_dir: str, limit: int) -> ScanResult:
    """One pass over ``cache_dir``; keeps the ``limit`` least recently used objects."""
    result = ScanResult(oldest=[])
    keep_oldest(walk_objects(cache_dir, result), limit, result)
    return result


def walk_volume_files(tree: str, result: ScanResult) -> Iterator[Candidate]:
    """Files of a two-level tree ``<tree>/<volume>/<name>`` (the fanotify frontend's
    cache files): every regular file is a candidate, its volume counted under
    ``I<volume>`` like a cachefiles volume directory, so caps name volumes the same
    way in every mode. Anything else (a directory below a volume, a file at the top)
    is a stray."""
    try:
        volumes = list(os.scandir(tree))
    except OSError:
        return
    for vol in volumes:
        try:
            if not vol.is_dir(follow_symlinks=False):
                result.strays.append(vol.path)
                continue
            it = os.scandir(vol.path)
        except OSError:
            continue
        key = "I" + vol.name
        with it:
            for entry in it:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        result.strays.append(entry.path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                result.volume_blocks[key] = result.volume_blocks.get(key, 0) + st.st_blocks
                yield Candidate(st.st_atime_ns, st.st_blocks, vol.path, entry.name)


def scan_volume_files(tree: str, limit: int) -> ScanResult:
    """:func:`scan` for a ``<tree>/<volume>/<name>`` tree (:func:`walk_volume_files`)."""
    result = ScanResult(oldest=[])
    keep_oldest(walk_volume_files(tree, result), limit, result)
    return result
