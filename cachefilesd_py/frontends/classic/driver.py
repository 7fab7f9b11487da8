"""Classic mode (``bind``): keep an NFS/AFS/Ceph/9p fscache cache inside its limits.

The kernel fills the cache by itself; the daemon's job is to cull (shared/reference/
cachefilesd-classic.md §3):

- ``read()`` returns the state line; ``cull=1`` means free space or files went below
  *cull* and stays 1 until both are back above *run*. POLLIN signals a state change.
- to cull, the daemon finds old objects itself and writes ``cull <name>`` **relative to
  its working directory** (so it ``chdir``s into the object's directory first); EBUSY
  means the object is in use (never culled), ESTALE/ENOENT that it is gone already.
  The kernel moves culled objects into ``graveyard/``, which the daemon must empty.

Unlike cachefilesd C, which culls one object per loop pass and re-walks the tree for
every 4096 victims, each pass here scans once into a bounded heap of the oldest objects
and culls in a batch toward *run* plus a headroom, re-reading the state between
batches; when nothing is cullable it backs off instead of spinning.

The absolute caps (``cache_max_bytes``, ``cache_max_objects``, ``volume_max_bytes``;
``space/caps.py``), which the kernel knows nothing about, are checked by a scan every
``caps_period`` seconds; the oldest objects go (of the volumes over their caps, or of
any volume for the cache-wide caps) until they hold.

The tree is known incrementally (``space/tree_index.py``: inotify on every directory of
it, a full walk only at start and when the event queue overflows), so a pass ``stat``s
objects but lists no directory; if the tree cannot be watched, every pass walks it.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.frontends.classic.commands import parse_state
from cachefilesd_py.kernel.device import cull_one
from cachefilesd_py.space.caps import Caps, pinned, volume_name
from cachefilesd_py.space.graveyard import GraveyardWatch, reap
from cachefilesd_py.space.scan import Candidate, ScanResult, scan
from cachefilesd_py.space.tree_index import TreeIndex

log = structlog.get_logger("classic")

BATCH = 64
BACKOFF = 5.0


class ClassicDevice(Protocol):
    def fileno(self) -> int: ...
    def read_message(self) -> bytes: ...
    def write_command(self, cmd: bytes) -> None: ...


@dataclass
class ClassicStats:
    passes: int = 0
    cull_requests: int = 0
    culled: int = 0
    busy: int = 0
    gone: int = 0
    failed: int = 0
    pinned: int = 0
    reaped: int = 0
    strays_removed: int = 0
    cap_passes: int = 0
    culled_for_caps: int = 0
    index_rebuilds: int = 0
    index_events: int = 0


class ClassicDriver:
    def __init__(
        self,
        device: ClassicDevice,
        cache_dir: str,
        *,
        nocull: bool,
        table_size: int = 4096,
        caps: Caps | None = None,
        caps_period: float = 30.0,
        pins: tuple[str, ...] = (),
    ) -> None:
        self.device = device
        self.cache_dir = cache_dir
        self.nocull = nocull
        self.table_size = table_size
        self.caps = caps or Caps()
        self.caps_period = caps_period
        self.pins = pins
        self.stats = ClassicStats()
        self.index: TreeIndex | None = None
        self._culling = False

    def _pinned(self, cand: Candidate) -> bool:
        if not self.pins:
            return False
        rel = os.path.relpath(cand.directory, os.path.join(self.cache_dir, "cache"))
        return pinned(self.pins, volume_name(rel.split(os.sep, 1)[0]), cand.name)

    def _scan(self, top: str, limit: int) -> ScanResult:
        """The oldest objects under ``top`` (the cache or one volume of it)."""
        if self.index is not None:
            cache = os.path.join(self.cache_dir, "cache")
            return self.index.scan(limit, under=None if top == cache else top)
        return scan(top, limit)

    def open_index(self) -> None:
        try:
            self.index = TreeIndex(os.path.join(self.cache_dir, "cache"))
        except OSError as exc:
            log.warning("index.unavailable", error=str(exc), fallback="full walk per pass")
            self.index = None
            return
        log.info("index.ready", objects=self.index.known_objects(), watches=self.index.watches)

    def bind(self, commands: list[bytes]) -> None:
        for cmd in commands:
            self.device.write_command(cmd)
        self.device.write_command(b"bind")
        log.info("bound", mode="classic", cache_dir=self.cache_dir)

    def read_state(self) -> bool:
        """The kernel's ``cull`` flag: set when free blocks or files fall below *cull*,
        cleared only once both are back at *run* (each read re-evaluates it). Its
        changes are logged: ``kernel.cull_requested`` / ``kernel.cull_satisfied``."""
        state = parse_state(self.device.read_message())
        if state.malformed:
            log.warning("kernel.malformed_state", tokens=list(state.malformed))
        if state.cull != self._culling:
            self._culling = state.cull
            if state.cull:
                self.stats.cull_requests += 1
            log.info(
                "kernel.cull_requested" if state.cull else "kernel.cull_satisfied",
                **{k: state.values[k] for k in ("brun", "bcull", "bstop") if k in state.values},
            )
        return state.cull

    def cull_pass(self) -> int:
        """Cull the oldest objects in batches while the kernel still asks for it."""
        self.stats.passes += 1
        result = self._scan(os.path.join(self.cache_dir, "cache"), self.table_size)
        for stray in result.strays:
            try:
                os.unlink(stray)
                self.stats.strays_removed += 1
            except OSError:
                pass
        culled = 0
        for i, cand in enumerate(result.oldest):
            if i % BATCH == 0 and i and not self.read_state():
                break
            if self._pinned(cand):
                self.stats.pinned += 1
                continue
            outcome = cull_one(self.device, cand.directory, cand.name)
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            culled += outcome == "culled"
        for empty in result.empty_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(empty)
        log.info(
            "cull.pass",
            scanned=result.objects,
            candidates=len(result.oldest),
            culled=culled,
            busy=self.stats.busy,
            strays=len(result.strays),
        )
        return culled

    def cap_pass(self, max_rounds: int = 64) -> int:
        """Cull the oldest objects until the absolute caps hold; returns how many went.
        Each round scans into the bounded table and culls from it, so a pass takes as
        many rounds as the excess needs, and stops early when a round frees nothing."""
        self.stats.cap_passes += 1
        total = 0
        for _ in range(max_rounds):
            culled = self._cap_round()
            total += culled
            if culled == 0:
                break
        return total

    def _cap_round(self) -> int:
        """One scan and the culls it allows. A volume over its cap is rescanned on its
        own, so its oldest objects are found even when they are not among the oldest
        of the whole cache."""
        cache = os.path.join(self.cache_dir, "cache")
        result = self._scan(cache, self.table_size)
        volume_bytes = {v: b * 512 for v, b in result.volume_blocks.items()}
        needs = self.caps.needs(result.blocks * 512, result.objects, volume_bytes)
        if not needs.any:
            return 0
        culled, freed = 0, dict.fromkeys(needs.volumes, 0)
        if needs.bytes > 0 or needs.objects > 0:
            culled += self._cull_oldest(cache, result.oldest, needs.bytes, needs.objects, freed)
        for vdir, excess in needs.volumes.items():
            if excess - freed[vdir] > 0:
                vol = self._scan(os.path.join(cache, vdir), self.table_size)
                culled += self._cull_oldest(cache, vol.oldest, excess - freed[vdir], 0, freed)
        self.stats.culled_for_caps += culled
        log.info(
            "cull.caps",
            scanned=result.objects,
            need_bytes=needs.bytes,
            need_objects=needs.objects,
            volumes_over=len(needs.volumes),
            culled=culled,
        )
        return culled

    def _cull_oldest(
        self,
        cache: str,
        candidates: list[Candidate],
        need_bytes: int,
        need_objects: int,
        freed_by_volume: dict[str, int],
    ) -> int:
        culled = 0
        for cand in candidates:
            if need_bytes <= 0 and need_objects <= 0:
                break
            if self._pinned(cand):
                self.stats.pinned += 1
                continue
            outcome = cull_one(self.device, cand.directory, cand.name)
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            if outcome != "culled":
                continue
            culled += 1
            need_bytes -= cand.blocks * 512
            need_objects -= 1
            vdir = os.path.relpath(cand.directory, cache).split(os.sep, 1)[0]
            if vdir in freed_by_volume:
                freed_by_volume[vdir] += cand.blocks * 512
        return culled

    def serve(self, stop: threading.Event, poll_interval: float = 1.0) -> None:
        graveyard = os.path.join(self.cache_dir, "graveyard")
        self.stats.reaped += reap(graveyard)
        watch = GraveyardWatch(graveyard)
        if not self.nocull:
            self.open_index()
        poller = select.poll()
        poller.register(self.device.fileno(), select.POLLIN)
        poller.register(watch.fileno(), select.POLLIN)
        backoff_until = 0.0
        next_caps = 0.0 if self.caps.configured and not self.nocull else float("inf")
        try:
            while not stop.is_set():
                poller.poll(int(poll_interval * 1000))
                if watch.changed():
                    self.stats.reaped += reap(graveyard)
                if time.monotonic() >= next_caps:
                    next_caps = time.monotonic() + self.caps_period
                    if self.cap_pass():
                        self.stats.reaped += reap(graveyard)
                culling = self.read_state()
                if not culling or self.nocull or time.monotonic() < backoff_until:
                    continue
                if self.cull_pass() == 0:
                    log.info("cull.nothing_cullable", backoff=BACKOFF)
                    backoff_until = time.monotonic() + BACKOFF
                self.stats.reaped += reap(graveyard)
        finally:
            watch.close()
            if self.index is not None:
                self.stats.index_rebuilds = self.index.rebuilds
                self.stats.index_events = self.index.events
                self.index.close()


def run_classic(
    device: ClassicDevice,
    config: Config,
    stop: threading.Event,
    *,
    nocull: bool,
    commands: list[bytes] | None,
    on_ready: Callable[[], object] = lambda: None,
    report_stats: Callable[[Callable[[], dict[str, object]]], object] = lambda _collect: None,
) -> int:
    """Bind (unless ``commands`` is None: the device is bound already) and serve until
    ``stop``; ``report_stats`` is handed a function returning the driver's counters,
    for periodic and on-demand stats lines."""
    assert config.dir is not None
    driver = ClassicDriver(
        device,
        config.dir,
        nocull=nocull,
        table_size=1 << config.culltable,
        caps=Caps.from_config(config),
        pins=config.pins,
    )
    if commands is not None:
        driver.bind(commands)
    on_ready()
    report_stats(lambda: dict(vars(driver.stats)))
    try:
        driver.serve(stop)
    finally:
        log.info("stats", final=True, **vars(driver.stats))
    return 0
