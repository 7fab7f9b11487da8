"""Classic mode (``bind``): keep an NFS/AFS/Ceph/9p fscache cache inside its limits.

The kernel fills the cache by itself; the daemon's job is to cull
(``docs/protocol-classic.md`` §2–§3):

- ``read()`` returns the state line; ``cull=1`` means free space or files went below
  *cull* and stays 1 until both are back above *run*. POLLIN signals a state change.
- to cull, the daemon finds old objects itself and writes ``cull <name>`` **relative to
  its working directory** (so it ``chdir``s into the object's directory first); EBUSY
  means the object is in use (never culled), ESTALE/ENOENT that it is gone already.
  The kernel moves culled objects into ``graveyard/``, which the daemon must empty.

Unlike cachefilesd C, which culls one object per loop pass and re-walks the tree for
every 4096 victims, each pass here scans once into a bounded heap of the oldest objects
and culls from it in LRU order until the kernel's ``cull`` flag clears. How fast that
is, and why (``docs/benchmarks.md``, "Classic mode vs cachefilesd C"):

- the heap is as large as the pass needs (:func:`table_for`): what the kernel still
  wants freed (its *run* limits in the state line against ``statvfs``) over the mean
  object size, doubled, at least ``culltable`` and at most :data:`MAX_TABLE` entries,
  so one scan is one pass and the tree is not ``stat``-ed again for each 4096 victims;
- the state line is read only once the culls so far may have freed what was missing
  (:class:`KernelGate`), then before every object, so the pass stops at *run* like C
  does, without reading the state 5,000 times on the way nor overshooting by a batch;
- each object costs one ``fchdir`` to a directory fd kept for the pass and the
  ``cull`` write (``kernel.device.CullCursor``);
- the daemon's own culls do not come back to the index as inotify events to apply
  (``space/tree_index.py`` does not ask for IN_DELETE; the driver tells it what went);
- a pass that ran out of candidates while the kernel still asks is followed by the
  next at once, not after the poll timeout; and when the kernel already asks at start,
  the first pass walks the tree itself before the index is built.

When nothing is cullable it backs off instead of spinning. What to cull is decided by
the cull plan both frontends share (``space/plan.py``: pins, needs) and carried out by
the shared loop (``space/culler.py``), one outcome per object.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.frontends.classic.commands import parse_state
from cachefilesd_py.kernel import commands
from cachefilesd_py.kernel.device import CullCursor
from cachefilesd_py.space.caps import CullRules, volume_name
from cachefilesd_py.space.culler import run_plan
from cachefilesd_py.space.graveyard import GraveyardWatch, reap
from cachefilesd_py.space.plan import CullPlan, Needs, Outcome, Tally
from cachefilesd_py.space.scan import Candidate, ScanResult, scan
from cachefilesd_py.space.tree_index import TreeIndex

log = structlog.get_logger("classic")

BACKOFF = 5.0
#: the most candidates one pass keeps (a candidate costs ~200 bytes: ~26 MiB)
MAX_TABLE = 1 << 17
#: the state line is read at least this often, whatever the estimate says (space may be
#: freed by others meanwhile)
STATE_EVERY = 64
_CULLED = Outcome.CULLED
_WENT = frozenset((Outcome.CULLED, Outcome.GONE))


def table_for(need_bytes: int, need_files: int, mean_object_bytes: int, floor: int) -> int:
    """How many of the oldest objects a kernel-driven pass should keep: twice what
    freeing ``need_bytes`` and ``need_files`` takes at the mean object size (objects
    differ in size, some are busy or pinned), at least ``floor`` (the ``culltable``),
    at most :data:`MAX_TABLE`. Pure."""
    by_bytes = -(-need_bytes // max(1, mean_object_bytes))
    return max(floor, min(MAX_TABLE, 2 * max(by_bytes, need_files)))


class KernelGate:
    """``keep_going`` for a kernel-driven pass. The kernel clears its ``cull`` flag once
    free blocks and free files are both back at *run*; until the objects culled so far
    can have freed ``need_bytes`` and ``need_files`` (measured at the pass's start),
    asking it is pointless, except every :data:`STATE_EVERY` objects in case others
    freed space. From there on the state is read before every object, so the pass
    stops where C stops. Needs of 0 (unknown) mean: read every time."""

    def __init__(self, read_state: Callable[[], bool], need_bytes: int, need_files: int) -> None:
        self._read_state = read_state
        self.need_bytes = need_bytes
        self.need_files = need_files
        self.tally: Tally | None = None
        self.reads = 0
        self._since = 0

    def __call__(self) -> bool:
        tally = self.tally
        self._since += 1
        if (
            tally is not None
            and self._since < STATE_EVERY
            and (tally.freed_bytes < self.need_bytes or tally.culled < self.need_files)
        ):
            return True
        self._since = 0
        self.reads += 1
        return self._read_state()


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
        rules: CullRules | None = None,
        caps_period: float = 30.0,
    ) -> None:
        self.device = device
        self.cache_dir = cache_dir
        self._cache = os.path.join(cache_dir, "cache")
        self.nocull = nocull
        self.table_size = table_size
        self.rules = rules or CullRules()
        self.caps_period = caps_period
        self.stats = ClassicStats()
        self.index: TreeIndex | None = None
        self._culling = False
        self._limits: dict[str, int] = {}
        self._cursor: CullCursor | None = None

    # -- what the shared cull plan needs to know of a classic object ----------------

    def _volume_of(self, cand: Candidate) -> str:
        """The volume directory (``I...``) an object lies in, however deep."""
        return cand.directory[len(self._cache) + 1 :].split(os.sep, 1)[0]

    def _pinned(self, cand: Candidate) -> bool:
        """Pins match ``<volume>/<file name>``: classic cookies are binary, so the
        object's name in the cache is what an admin can see and write."""
        return bool(self.rules.pins) and self.rules.pinned(
            volume_name(self._volume_of(cand)), cand.name
        )

    def cull(self, cand: Candidate) -> Outcome:
        """The :class:`~cachefilesd_py.space.culler.Remover` side: the kernel's ``cull``,
        through the pass's cursor. What went is forgotten by the index at once (it
        does not watch for deletions)."""
        assert self._cursor is not None, "cull() outside a pass"
        err = self._cursor.cull(cand.directory, cand.name)
        outcome = _CULLED if err == 0 else Outcome.of_cull(err)
        if self.index is not None and outcome in _WENT:
            self.index.forget(cand.directory, cand.name)
        return outcome

    def trim(self, cand: Candidate, nbytes: int) -> tuple[Outcome, int]:
        """Classic objects are never trimmed (the kernel's files, not ours)."""
        return Outcome.UNTRIMMABLE, 0

    def _run(
        self,
        needs: Needs,
        candidates: Iterable[Candidate],
        gate: KernelGate | None = None,
    ) -> Tally:
        plan = CullPlan(
            needs, volume_of=self._volume_of, pinned=self._pinned if self.rules.pins else None
        )
        if gate is not None:
            gate.tally = plan.tally
        with CullCursor(self.device) as self._cursor:
            try:
                tally = run_plan(
                    plan, candidates, self, describe=_path, keep_going=gate, check_every=1
                )
            finally:
                self._cursor = None
        stats = self.stats
        stats.culled += tally[Outcome.CULLED]
        stats.busy += tally[Outcome.BUSY]
        stats.gone += tally[Outcome.GONE]
        stats.failed += tally[Outcome.FAILED]
        stats.pinned += tally[Outcome.PINNED]
        return tally

    def _scan(self, top: str, limit: int) -> ScanResult:
        """The oldest objects under ``top`` (the cache or one volume of it)."""
        if self.index is not None:
            return self.index.scan(limit, under=None if top == self._cache else top)
        return scan(top, limit)

    def open_index(self) -> None:
        try:
            self.index = TreeIndex(os.path.join(self.cache_dir, "cache"))
        except OSError as exc:
            log.warning("index.unavailable", error=str(exc), fallback="full walk per pass")
            self.index = None
            return
        log.info("index.ready", objects=self.index.known_objects(), watches=self.index.watches)

    def bind(self, setup: list[bytes]) -> None:
        for cmd in setup:
            self.device.write_command(cmd)
        self.device.write_command(commands.encode_bind(ondemand=False))
        log.info("bound", mode="classic", cache_dir=self.cache_dir)

    def read_state(self) -> bool:
        """The kernel's ``cull`` flag: set when free blocks or files fall below *cull*,
        cleared only once both are back at *run* (each read re-evaluates it). Its
        changes are logged: ``kernel.cull_requested`` / ``kernel.cull_satisfied``."""
        state = parse_state(self.device.read_message())
        self._limits = state.values
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

    def _needs(self) -> tuple[int, int, int]:
        """(bytes, files, mean object bytes): what the kernel still wants freed before
        it clears its ``cull`` flag, from its *run* limits (last state line; blocks and
        files as ``statfs`` counts them) and ``statvfs`` of the cache now; zeros when
        unknown."""
        brun, frun = self._limits.get("brun"), self._limits.get("frun")
        if brun is None or frun is None:
            return 0, 0, 0
        try:
            st = os.statvfs(self._cache)
        except OSError:
            return 0, 0, 0
        # objects and their directories hold the used inodes (a slight overcount of
        # objects: a slightly small mean, a slightly larger table)
        inodes = st.f_files - st.f_ffree
        mean = (st.f_blocks - st.f_bfree) * st.f_frsize // inodes if inodes > 0 else 0
        return (
            max(0, brun - st.f_bavail) * st.f_frsize,
            max(0, frun - st.f_ffree),
            mean,
        )

    def cull_pass(self) -> int:
        """Cull the oldest objects while the kernel still asks for it (its ``cull``
        flag, read when the culls may have freed what it misses: :class:`KernelGate`)."""
        self.stats.passes += 1
        need_bytes, need_files, mean = self._needs()
        table = self.table_size
        if mean:
            table = table_for(need_bytes, need_files, mean, self.table_size)
        result = self._scan(self._cache, table)
        for stray in result.strays:
            try:
                os.unlink(stray)
                self.stats.strays_removed += 1
            except FileNotFoundError:
                pass
            except OSError:
                continue
            if self.index is not None:
                self.index.forget(*os.path.split(stray))
        gate = KernelGate(self.read_state, need_bytes, need_files)
        tally = self._run(Needs(until_stopped=True), result.oldest, gate=gate)
        for empty in result.empty_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(empty)
        log.info(
            "cull.pass",
            mode="classic",
            scanned=result.objects,
            candidates=len(result.oldest),
            strays=len(result.strays),
            state_reads=gate.reads,
            **tally.as_fields(),
        )
        return tally.culled

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
        result = self._scan(self._cache, self.table_size)
        volume_bytes = {v: b * 512 for v, b in result.volume_blocks.items()}
        needs = self.rules.caps.needs(result.blocks * 512, result.objects, volume_bytes)
        if not needs.any:
            return 0
        done = Tally()
        if needs.bytes > 0 or needs.objects > 0:
            done.add(self._run(Needs(needs.bytes, needs.objects), result.oldest))
        for vdir, excess in needs.volumes.items():
            still = excess - done.freed_by_volume.get(vdir, 0)
            if still > 0:
                vol = self._scan(os.path.join(self._cache, vdir), self.table_size)
                done.add(self._run(Needs(volumes={vdir: still}), vol.oldest))
        self.stats.culled_for_caps += done.culled
        log.info(
            "cull.caps",
            scanned=result.objects,
            need_bytes=needs.bytes,
            need_objects=needs.objects,
            volumes_over=len(needs.volumes),
            **done.as_fields(),
        )
        return done.culled

    def serve(
        self,
        stop: threading.Event,
        poll_interval: float = 1.0,
        started: Callable[[], object] = lambda: None,
    ) -> None:
        """Cull while the kernel asks, until ``stop``. ``started`` is called once the
        first pass is done, when the kernel asks already at start (before, otherwise)."""
        graveyard = os.path.join(self.cache_dir, "graveyard")
        self.stats.reaped += reap(graveyard)
        watch = GraveyardWatch(graveyard)
        if not self.nocull and self.read_state():
            # the kernel asks already: the first pass walks the tree itself (a walk
            # with stat is what the pass costs anyway); the index comes after
            self.cull_pass()
        started()
        if not self.nocull:
            self.open_index()
        poller = select.poll()
        poller.register(self.device.fileno(), select.POLLIN)
        poller.register(watch.fileno(), select.POLLIN)
        backoff_until = 0.0
        next_caps = 0.0 if self.rules.caps.configured and not self.nocull else float("inf")
        #: the last pass ran out of candidates while the kernel still asked: no waiting
        again = False
        try:
            while not stop.is_set():
                poller.poll(0 if again else int(poll_interval * 1000))
                again = False
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
                else:
                    again = self._culling
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
    setup: list[bytes] | None,
    on_ready: Callable[[], object] = lambda: None,
    report_stats: Callable[[Callable[[], dict[str, object]]], object] = lambda _collect: None,
) -> int:
    """Bind (unless ``commands`` is None: the device is bound already) and serve until
    ``stop``; ``report_stats`` is handed a function returning the driver's counters,
    for periodic and on-demand stats lines, once the start-up work is done (a first
    pass when the kernel asks at start: it runs alone, it is what the kernel waits for;
    the stats line and the control server take seconds to import in a slow guest)."""
    assert config.dir is not None
    driver = ClassicDriver(
        device,
        config.dir,
        nocull=nocull,
        table_size=1 << config.culltable,
        rules=CullRules.from_config(config),
    )
    if setup is not None:
        driver.bind(setup)
    on_ready()
    try:
        driver.serve(stop, started=lambda: report_stats(lambda: dict(vars(driver.stats))))
    finally:
        log.info("stats", final=True, **vars(driver.stats))
    return 0


def _path(cand: Candidate) -> str:
    return os.path.join(cand.directory, cand.name)
