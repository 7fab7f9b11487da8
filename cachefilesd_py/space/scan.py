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

import heapq
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

OBJECT_PREFIXES = ("D", "S", "T", "E")
INDEX_PREFIXES = ("I", "J", "K", "@")


@dataclass(frozen=True, order=True)
class Candidate:
    atime_ns: int
    blocks: int = field(compare=False)
    directory: str = field(compare=False)
    name: str = field(compare=False)

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
    docs/benchmarks.md, "Classic mode vs cachefilesd C")."""
    stack: list[tuple[str, str]] = [(cache_dir, "")]
    while stack:
        directory, volume = stack.pop()
        entries = 0
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
                                result.strays.append(os.path.join(directory, name))
                            continue
                        if not name.startswith(OBJECT_PREFIXES) or directory == cache_dir:
                            result.strays.append(os.path.join(directory, name))
                            continue
                        st = entry.stat(follow_symlinks=False)  # fstatat(dir_fd, name)
                    except OSError:
                        continue
                    result.volume_blocks[volume] = (
                        result.volume_blocks.get(volume, 0) + st.st_blocks
                    )
                    yield Candidate(st.st_atime_ns, st.st_blocks, directory, name)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
        if entries == 0 and os.path.basename(directory).startswith("@"):
            result.empty_dirs.append(directory)


def keep_oldest(candidates: Iterable[Candidate], limit: int, result: ScanResult) -> None:
    """Count every candidate into ``result`` and keep the ``limit`` oldest by atime."""
    heap: list[tuple[int, int, Candidate]] = []  # max-heap on atime via negation
    for n, cand in enumerate(candidates):
        result.objects += 1
        result.blocks += cand.blocks
        item = (-cand.atime_ns, n, cand)
        if len(heap) < limit:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    result.oldest = sorted(c for _, _, c in heap)


def scan(cache_dir: str, limit: int) -> ScanResult:
    """One pass over ``cache_dir``; keeps the ``limit`` least recently used objects."""
    result = ScanResult(oldest=[])
    keep_oldest(walk_objects(cache_dir, result), limit, result)
    return result
