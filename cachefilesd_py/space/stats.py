"""Space figures of the cache filesystem and the kernel's thresholds in absolute terms.

The kernel turns the ``b*``/``f*`` percentages into absolute counts once, at ``bind``:
``(f_blocks / 100) * pct`` blocks and ``(f_files / 100) * pct`` files, compared with the
free counts ``f_bavail`` and ``f_ffree``. Culling starts below *cull* and stops at *run*
(hysteresis); below *stop* the kernel refuses new data (ENOBUFS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SpaceSnapshot:
    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int

    @classmethod
    def of(cls, path: str) -> SpaceSnapshot:
        st = os.statvfs(path)
        return cls(st.f_frsize, st.f_blocks, st.f_bavail, st.f_files, st.f_ffree)


@dataclass(frozen=True)
class Limits:
    """Absolute free-block and free-file counts for run/cull/stop."""

    brun: int
    bcull: int
    bstop: int
    frun: int
    fcull: int
    fstop: int

    @classmethod
    def from_percent(cls, snap: SpaceSnapshot, pct: dict[str, int]) -> Limits:
        b, f = snap.blocks // 100, snap.files // 100
        return cls(
            b * pct["brun"],
            b * pct["bcull"],
            b * pct["bstop"],
            f * pct["frun"],
            f * pct["fcull"],
            f * pct["fstop"],
        )


def cull_needed(snap: SpaceSnapshot, lim: Limits, culling: bool) -> bool:
    """The kernel's hysteresis: start below cull, keep going until both reach run."""
    if snap.blocks_free < lim.bcull or snap.files_free < lim.fcull:
        return True
    if culling:
        return snap.blocks_free < lim.brun or snap.files_free < lim.frun
    return False


def bytes_to_free(snap: SpaceSnapshot, lim: Limits, headroom_pct: int = 2) -> int:
    """Bytes to free to reach *run* plus a small headroom (so that culling does not
    restart at once when the next file arrives)."""
    target = lim.brun + snap.blocks * headroom_pct // 100
    return max(0, target - snap.blocks_free) * snap.block_size
