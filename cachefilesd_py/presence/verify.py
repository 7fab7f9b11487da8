"""Check a presence bitmap against the cache file and the source.

For every chunk: a bit set means the cache file's bytes must equal the source's (an
error otherwise), and SEEK_DATA must not call it a hole (an error); data where the
bit is clear is *lagging*: allowed (a bit may lag its data), reported for information.
SEEK_DATA is used only here, to report, never for the daemon's own decisions.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cachefilesd_py.presence.store import BlobPresence


@dataclass
class VerifyReport:
    chunks: int = 0
    present: int = 0
    lagging: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _has_data(fd: int, start: int, length: int) -> bool:
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < start + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise


def verify(
    presence: BlobPresence, cache_file: Path, read_source: Callable[[int, int], bytes]
) -> VerifyReport:
    geom = presence.geometry
    report = VerifyReport(chunks=geom.nchunks)
    fd = os.open(cache_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for i in range(geom.nchunks):
            start, length = geom.chunk_range(i)
            has_data = _has_data(fd, start, length)
            if presence.is_present(i):
                report.present += 1
                if not has_data:
                    report.errors.append(f"chunk {i}: bit set but SEEK_DATA finds a hole")
                elif os.pread(fd, length, start) != read_source(start, length):
                    report.errors.append(f"chunk {i}: bytes differ from the source")
            elif has_data:
                report.lagging += 1
    finally:
        os.close(fd)
    return report
