"""Pins made through ``cachefilesctl pin``: the persistent set, and the cap on its total.

A pin keeps a blob whole: the culler never removes nor trims it (``engine/cull.py``),
exactly as a config ``pin`` glob does; the two are a union. Config pins live in the
configuration; the pins an operator makes at run time live in a small state file in
the daemon's directory of the cache (``<dir>/cachefilesd-py/pins.json``), so they
survive a restart and a failover:

    {"version": 1, "pins": {"erofs,img/img": {"size": 1000123, "at": 1764150000.0}}}

Each pin is named as the control API names blobs (``<volume key>/<cookie key>``,
``blobs`` lists them so). The file is replaced whole with the project's one
durable-write primitive (``kernel/durable.py`` ``save_file_atomically``): after a
crash it holds the old set or the new one, never a mix. A file that does not parse
(truncated by hand, another version, wrong types) is one clear log line and an empty
set: the daemon serves on, and the next pin rewrites it.

**The cap.** The pinned total may be at most ``pin_max_share`` percent of the cache's
size (``cache_max_bytes`` when set, else the cache filesystem's size): pinned bytes
can never be given back, so without a cap pins could leave the culler nothing to
free. A pin that would go over is refused (nothing changes); a pin that brings the
total to 90 % of the cap or more is taken with a warning. The total counts the pins
made here, by blob size; config globs are the admin's own and are not counted.

The state (:class:`PinSet`) and the cap arithmetic (:func:`check_cap`) are pure;
:class:`PinStore` does the file I/O under a leaf lock.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cachefilesd_py.kernel.durable import remove_stale_temps, save_file_atomically

log = structlog.get_logger("space")

PIN_FILE_NAME = "pins.json"
PIN_FILE_VERSION = 1
#: a pin that brings the pinned total to this share of the cap or more is warned about
WARN_FRACTION = 0.9
#: the longest blob name the file may hold (a volume and a cookie key, 255 bytes each)
MAX_NAME_CHARS = 2 * 255 + 1
#: pins a state file may hold (a bound, so a hostile file cannot eat memory)
MAX_PINS = 1 << 20


class PinFileCorrupt(ValueError):
    """The state file is not a pin set this daemon wrote."""


@dataclass(frozen=True)
class Pin:
    blob: str
    size: int
    at: float


@dataclass(frozen=True)
class PinSet:
    """The pins, by blob name (immutable: each change makes a new set)."""

    pins: tuple[Pin, ...] = ()

    def names(self) -> frozenset[str]:
        return frozenset(p.blob for p in self.pins)

    def get(self, blob: str) -> Pin | None:
        return next((p for p in self.pins if p.blob == blob), None)

    @property
    def total(self) -> int:
        return sum(p.size for p in self.pins)

    def with_pin(self, pin: Pin) -> PinSet:
        return PinSet((*(p for p in self.pins if p.blob != pin.blob), pin))

    def without(self, blob: str) -> PinSet:
        return PinSet(tuple(p for p in self.pins if p.blob != blob))

    def encode(self) -> bytes:
        doc = {
            "version": PIN_FILE_VERSION,
            "pins": {p.blob: {"size": p.size, "at": p.at} for p in self.pins},
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> PinSet:
        """The set ``data`` holds; anything else raises :class:`PinFileCorrupt`."""
        try:
            doc: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PinFileCorrupt(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != PIN_FILE_VERSION:
            raise PinFileCorrupt(f"not a version {PIN_FILE_VERSION} pin file")
        pins = doc.get("pins")
        if not isinstance(pins, dict) or len(pins) > MAX_PINS:
            raise PinFileCorrupt(f"'pins' must be an object of at most {MAX_PINS} entries")
        out = []
        for name, entry in pins.items():
            if not 0 < len(name) <= MAX_NAME_CHARS or "/" not in name or "\0" in name:
                raise PinFileCorrupt(f"{name[:80]!r} is not <volume key>/<cookie key>")
            if not isinstance(entry, dict):
                raise PinFileCorrupt(f"{name!r}: entry must be an object")
            size, at = entry.get("size"), entry.get("at")
            if type(size) is not int or not 0 <= size < 1 << 63:
                raise PinFileCorrupt(f"{name!r}: size must be a byte count")
            if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
                raise PinFileCorrupt(f"{name!r}: 'at' must be a time")
            out.append(Pin(name, size, float(at)))
        return cls(tuple(out))


@dataclass(frozen=True)
class CapVerdict:
    allowed: bool
    warn: bool
    cap: int
    total_after: int
    message: str


def check_cap(total: int, already: int, size: int, cache_bytes: int, share_pct: int) -> CapVerdict:
    """May a pin of ``size`` bytes join pins totalling ``total`` (of which ``already``
    is this blob's own earlier pin, replaced), with the cap at ``share_pct`` % of
    ``cache_bytes``?"""
    cap = cache_bytes * share_pct // 100
    after = total - already + size
    if after > cap:
        return CapVerdict(
            False,
            False,
            cap,
            after,
            f"pinning {size} bytes would bring the pinned total to {after} bytes, over the "
            f"cap of {cap} bytes (pin_max_share {share_pct}% of {cache_bytes}); unpin "
            "something or raise pin_max_share",
        )
    warn = after >= WARN_FRACTION * cap
    note = (
        f"the pinned total is {after} bytes, {100 * after / cap:.0f}% of the cap ({cap} bytes)"
        if cap
        else "the cap is 0 bytes"
    )
    return CapVerdict(True, warn, cap, after, note)


class PinStore:
    """The pin set of one cache, kept in ``<state dir>/pins.json``.

    Lock order: ``_lock`` is a leaf; it is held across the (small) file save so two
    pins never race to write the file."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PIN_FILE_NAME
        self._lock = threading.Lock()
        if state_dir.is_dir():  # the leftovers of a save a crash cut short
            remove_stale_temps(state_dir)
        self._set = self._load()

    def _load(self) -> PinSet:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return PinSet()
        except OSError as exc:
            log.error("pins.unreadable", file=str(self.path), error=str(exc), pins=0)
            return PinSet()
        try:
            pins = PinSet.decode(data)
        except PinFileCorrupt as exc:
            log.error(
                "pins.corrupt",
                file=str(self.path),
                error=str(exc),
                note="starting with no pins; the next pin rewrites the file",
            )
            return PinSet()
        log.info("pins.loaded", file=str(self.path), pins=len(pins.pins), bytes=pins.total)
        return pins

    def snapshot(self) -> PinSet:
        with self._lock:
            return self._set

    def is_pinned(self, blob: str) -> bool:
        return blob in self.snapshot().names()

    def pin(self, blob: str, size: int, cache_bytes: int, share_pct: int) -> CapVerdict:
        """Add (or re-size) ``blob``'s pin unless the cap refuses it; durable on return."""
        return self.pin_all({blob: size}, cache_bytes, share_pct)

    def pin_all(self, sizes: dict[str, int], cache_bytes: int, share_pct: int) -> CapVerdict:
        """Pin every blob of ``sizes`` (an image's blobs), all or none: the cap judges
        their sum. Durable on return."""
        with self._lock:
            already = sum(p.size for p in self._set.pins if p.blob in sizes)
            verdict = check_cap(
                self._set.total, already, sum(sizes.values()), cache_bytes, share_pct
            )
            if verdict.allowed:
                new = self._set
                now = time.time()
                for blob, size in sizes.items():
                    new = new.with_pin(Pin(blob, size, now))
                self._save(new)
                self._set = new
        return verdict

    def unpin(self, blob: str) -> bool:
        """Drop ``blob``'s pin; False if it had none."""
        with self._lock:
            if self._set.get(blob) is None:
                return False
            new = self._set.without(blob)
            self._save(new)
            self._set = new
            return True

    def _save(self, pins: PinSet) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file_atomically(self.path, pins.encode())
