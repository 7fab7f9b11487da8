"""The core's blob culler: keeps a tree of blob files inside its limits.

For the frontends whose blobs are whole cache files with presence sidecars (on-demand
mode; the fanotify frontend's files are the same kind). What it needs from the
frontend: how to find the blob of a file (``key_of``), how to remove a file (``cull``:
the kernel's command in on-demand mode) and how much the kernel's percentage limits
ask to free (``limits_need``). The decisions are the shared cull plan's
(``space/plan.py``), carried out by the shared loop (``space/culler.py``):

- candidates come from one scan of the tree (bounded heap, ``space/scan.py``); blobs
  the daemon has seen since start are ordered by the cull policy (which saw their
  OPENs and misses), blobs from before the start by atime, and those go first;
- pinned blobs (a config ``pin`` glob, or a pin made through ``cachefilesctl pin``:
  :attr:`BlobCuller.held_pins`, ``space/pins.py``) and blobs with a use lease (an open
  kernel object) are never culled nor trimmed;
  the kernel's ``cull`` re-checks and answers EBUSY for files in use;
- a culled blob's sidecar goes after the kernel moved its file to the graveyard, and
  the graveyard is emptied;
- culling aims at what the limits ask (*run* plus a headroom) and at the absolute caps
  (``cache_max_bytes``/``cache_max_objects``, and ``volume_max_bytes`` per volume);
- a blob much larger than what is still to be freed is *trimmed* instead
  (:meth:`BlobCuller.trim`): under its trim lease (no kernel object on it, new OPENs
  wait, ``engine/leases.py``), its tail chunks' bits are cleared in the sidecar
  durably first, then holes are punched over them. A bit may lag its data, never lead
  it: a crash between the two leaves data without a bit, a refetch later. A blob
  without a trusted sidecar cannot be trimmed and is culled whole. A blob the kernel
  still has open (``in_kernel_use``: on-demand mode asks ``inuse``; it covers objects
  a dead worker opened) is not trimmed.

Lock order: ``BlobCuller._lock`` guards the policy only and is a leaf (nothing else is
taken while it is held). A pass takes, one at a time and never nested in each other,
the leases' condition (``in_use``, trim leases), the presence store's I/O lock (inside
a trim) and the kernel's working-directory lock (``cull``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.engine.leases import BlobLeases
from cachefilesd_py.kernel._sys import punch_hole
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.space.caps import CullRules
from cachefilesd_py.space.chunks import KEEP_HEAD_BYTES, chunks_to_trim, keep_head_chunks
from cachefilesd_py.space.culler import (
    DecisionRecord,
    PassResult,
    run_plan,
    volume_dir_of,
)
from cachefilesd_py.space.graveyard import reap
from cachefilesd_py.space.plan import CullPlan, Decision, Needs, Outcome, Tally
from cachefilesd_py.space.policy import CullPolicy
from cachefilesd_py.space.scan import Candidate, ScanResult, scan

log = structlog.get_logger("space")


class BlobCuller:
    """Culls (and trims) a tree of blob files; see the module docstring."""

    def __init__(
        self,
        *,
        tree: Path,
        graveyard: Path | None,
        presence: PresenceStore,
        leases: BlobLeases,
        rules: CullRules,
        policy: CullPolicy,
        key_of: Callable[[Candidate], BlobKey | None],
        cull: Callable[[Candidate], int],
        limits_need: Callable[[], int],
        in_kernel_use: Callable[[Candidate], bool] = lambda _cand: False,
        scan_limit: int = 1 << 20,
        scan_tree: Callable[[str, int], ScanResult] = scan,
        volume_of: Callable[[Candidate], str] = volume_dir_of,
        keep_head_bytes: int = KEEP_HEAD_BYTES,
    ) -> None:
        self.tree = tree
        self.graveyard = graveyard
        self.presence = presence
        self.leases = leases
        self.rules = rules
        self.policy = policy
        self.key_of = key_of
        self._cull = cull
        self.limits_need = limits_need
        self.in_kernel_use = in_kernel_use
        self.scan_limit = scan_limit
        #: how the tree is walked and its volumes named (the cachefiles layout by
        #: default; the fanotify frontend's tree is ``<volume>/<name>``)
        self.scan_tree = scan_tree
        self.volume_of = volume_of
        #: bytes at the head of a blob a trim never gives back
        self.keep_head_bytes = keep_head_bytes
        #: the blob names (``str(key)``) pinned at run time, read once per pass; the
        #: union with the config's ``pin`` globs is what a pass keeps
        self.held_pins: Callable[[], frozenset[str]] = frozenset
        #: totals since start, for the daemon's stats
        self.totals = Tally()
        #: the tree as the last pass's scan found it: (unix time, objects, bytes)
        self.last_scan: tuple[float, int, int] | None = None
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()

    # -- signals from the frontend --------------------------------------------------

    def opened(self, key: BlobKey, size: int) -> None:
        with self._lock:
            self.policy.admit(key, size)
            self.policy.touch(key)

    def missed(self, key: BlobKey) -> None:
        with self._lock:
            self.policy.touch(key)

    # -- deciding --------------------------------------------------------------------

    def in_use_keys(self) -> set[BlobKey]:
        """The blobs a pass must leave alone, neither culled nor trimmed: those this
        process has open (its leases); a frontend whose kernel reads files it never
        opened through the daemon adds its own."""
        return set(self.leases.in_use())

    def pinned(self, key: BlobKey, held: frozenset[str] | None = None) -> bool:
        """A config ``pin`` glob matches ``key``, or a run-time pin names it
        (``held``: :attr:`held_pins` as the pass read it)."""
        if str(key) in (self.held_pins() if held is None else held):
            return True
        return self.rules.pinned(
            key.volume.decode("utf-8", "backslashreplace"),
            key.name.decode("utf-8", "backslashreplace"),
        )

    def order(self, keyed: list[tuple[Candidate, BlobKey]]) -> list[tuple[Candidate, BlobKey]]:
        """Blobs unknown to the policy (cached before this start) first, oldest atime
        first; then the policy's eviction order."""
        by_key = {key: (cand, key) for cand, key in keyed}
        known: list[tuple[Candidate, BlobKey]] = []
        with self._lock:
            for key in self.policy.victims(lambda k: k not in by_key):
                known.append(by_key[key])  # type: ignore[index]
                if len(known) == len(by_key):
                    break
        known_keys = {key for _cand, key in known}
        unknown = sorted(
            ((c, k) for c, k in keyed if k not in known_keys), key=lambda ck: ck[0].atime_ns
        )
        return unknown + known

    # -- doing -----------------------------------------------------------------------

    def cull_pass(
        self,
        need_bytes: int | None = None,
        need_objects: int = 0,
        *,
        dry_run: bool = False,
        record: bool = False,
    ) -> PassResult:
        """Cull toward the limits. The tree is scanned only when there is something to
        free (statvfs is cheap; a scan of a big cache is not), or when absolute caps
        are configured (they need the tree's totals).

        ``dry_run``: decide as a pass would, remove nothing (a cull is assumed to free
        the file's blocks, a trim what it was asked for; a real trim may find the blob
        untrimmable and cull it whole). ``record`` (implied by ``dry_run``): keep every
        decision in the result. Passes run one at a time (the space thread's and the
        operator's)."""
        with self._pass_lock:
            return self._cull_pass(need_bytes, need_objects, dry_run, record or dry_run)

    def _cull_pass(
        self, need_bytes: int | None, need_objects: int, dry_run: bool, record: bool
    ) -> PassResult:
        out = PassResult()
        caps = self.rules.caps
        if need_bytes is None and not caps.configured:
            need_bytes = self.limits_need()
            if need_bytes <= 0:
                return out
        result = self.scan_tree(str(self.tree), self.scan_limit)
        out.scanned = result.objects
        self.last_scan = (time.time(), result.objects, result.blocks * 512)
        cap_needs = caps.needs(
            result.blocks * 512,
            result.objects,
            {v: b * 512 for v, b in result.volume_blocks.items()},
        )
        if need_bytes is None:
            need_bytes = max(self.limits_need(), cap_needs.bytes)
        needs = Needs(need_bytes, max(need_objects, cap_needs.objects), cap_needs.volumes)
        out.need_bytes, out.need_objects = needs.bytes, needs.objects
        if not needs.any:
            return out
        out.needed = True
        keyed = [(c, k) for c in result.oldest if (k := self.key_of(c)) is not None]
        key_by_id = {id(c): k for c, k in keyed}
        busy = self.in_use_keys()
        held = self.held_pins()
        plan = CullPlan(
            needs,
            volume_of=self.volume_of,
            pinned=lambda c: self.pinned(key_by_id[id(c)], held),
            in_use=lambda c: key_by_id[id(c)] in busy,
            trim=True,
        )
        remover = _DryRemover() if dry_run else _BlobRemover(self, key_by_id)
        ordered = [c for c, _k in self.order(keyed)]

        def keep(cand: Candidate, decision: Decision, outcome: Outcome, freed: int) -> None:
            out.decisions.append(
                DecisionRecord(str(key_by_id[id(cand)]), outcome.value, freed, decision.reason)
            )

        out.tally = run_plan(
            plan,
            ordered,
            remover,
            describe=lambda c: str(key_by_id[id(c)]),
            on_decision=keep if record else None,
            detail=remover.detail,
            info=not dry_run,  # a plan shown to the operator is no decision carried out
        )
        if dry_run:
            log.info("cull.plan", need_bytes=need_bytes, decisions=len(out.decisions))
            return out
        if self.graveyard is not None:
            reap(str(self.graveyard))
        self.totals.add(out.tally)
        log.info(
            "cull.pass",
            need_bytes=need_bytes,
            need_objects=needs.objects,
            volumes_over=len(needs.volumes),
            freed=out.tally.freed_bytes,
            scanned=result.objects,
            **out.tally.as_fields(),
        )
        return out

    def cull(self, cand: Candidate, key: BlobKey) -> Outcome:
        outcome = Outcome.of_cull(self._cull(cand))
        if outcome is Outcome.CULLED:
            self.presence.remove(key)
            with self._lock:
                self.policy.remove(key)
        return outcome

    def trim(
        self, cand: Candidate, key: BlobKey, need_bytes: int
    ) -> tuple[Outcome, int, list[tuple[int, int]]]:
        """Give back about ``need_bytes`` of an idle blob's chunks: ``(TRIMMED, bytes
        freed, [(offset, length) punched])``, ``(BUSY, 0, [])`` when the blob is in
        use, ``(UNTRIMMABLE, 0, [])`` when it has no trusted sidecar or nothing to trim
        (cull it whole instead)."""
        path = Path(cand.directory) / cand.name
        with self.leases.trim(key) as granted:
            if not granted:
                return Outcome.BUSY, 0, []
            # The leases know the objects this process opened; the kernel knows them
            # all (after a failover, objects the dead worker opened stay open in the
            # kernel until a READ re-opens them). With the lease held no new OPEN is
            # answered, so the kernel's "not in use" holds until the punch is done.
            if self.in_kernel_use(cand):
                return Outcome.BUSY, 0, []
            return trim_idle_file(self.presence, key, path, need_bytes, self.keep_head_bytes)

    def remove_orphan_sidecars(self) -> int:
        """Sidecars whose cache file is gone (culled by anyone, or never committed)."""
        result = self.scan_tree(str(self.tree), self.scan_limit)
        known = {k for c in result.oldest if (k := self.key_of(c)) is not None}
        orphans = self.presence.orphans(known)
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)


def trim_idle_file(
    presence: PresenceStore,
    key: BlobKey,
    path: Path,
    need_bytes: int,
    keep_head_bytes: int = KEEP_HEAD_BYTES,
) -> tuple[Outcome, int, list[tuple[int, int]]]:
    """Give back about ``need_bytes`` of the tail chunks of a cache file nothing reads
    now (the caller holds its trim lease and knows no kernel object uses it): bits
    cleared durably first, then holes punched. ``(TRIMMED, bytes freed, [(offset,
    length) punched])``; ``(UNTRIMMABLE, 0, [])`` without a trusted sidecar bound to
    ``path`` or with nothing to trim."""
    bp = presence.load_bound(key, path)
    if bp is None:
        return Outcome.UNTRIMMABLE, 0, []
    geo = bp.geometry
    runs = chunks_to_trim(
        bp.bitmap.present_runs(0, geo.nchunks),
        geo.blob_size,
        geo.chunk_size,
        need_bytes,
        keep_head_chunks(geo.chunk_size, keep_head_bytes),
    )
    if not runs:
        return Outcome.UNTRIMMABLE, 0, []
    presence.clear_runs(bp, runs)  # the bits go durably before the bytes
    try:
        freed = punch_runs(path, runs, geo.chunk_size)
    except OSError as exc:
        # the bits are already gone: at worst a refetch, never wrong bytes
        log.warning("cull.trim_failed", blob=str(key), file=str(path), error=str(exc))
        return Outcome.UNTRIMMABLE, 0, []
    chunk = geo.chunk_size
    ranges = [
        (first * chunk, min(count * chunk, geo.blob_size - first * chunk)) for first, count in runs
    ]
    log.info(
        "cull.trimmed",
        blob=str(key),
        file=str(path),
        chunks=sum(c for _f, c in runs),
        ranges=ranges,
        freed=freed,
        present=bp.bitmap.count(),
    )
    if freed <= 0:
        return Outcome.UNTRIMMABLE, 0, []
    return Outcome.TRIMMED, freed, ranges


def punch_runs(path: Path, runs: list[tuple[int, int]], chunk_size: int) -> int:
    """Punch holes over chunk runs ``(first, count)`` of ``path`` through a new fd;
    returns the bytes the filesystem freed (``st_blocks`` before and after)."""
    with OwnedFd(os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)) as fd:
        before = os.fstat(fd.fileno()).st_blocks
        for first, count in runs:
            punch_hole(fd.fileno(), first * chunk_size, count * chunk_size)
        after = os.fstat(fd.fileno()).st_blocks
    return max(0, before - after) * 512


class _DryRemover:
    """The :class:`Remover` of a dry run: every removal "succeeds", nothing is done."""

    def cull(self, cand: Candidate) -> Outcome:
        return Outcome.CULLED

    def trim(self, cand: Candidate, nbytes: int) -> tuple[Outcome, int]:
        return Outcome.TRIMMED, nbytes

    def detail(self, cand: Candidate) -> dict[str, Any]:
        return {"dry_run": True}


class _BlobRemover:
    """The :class:`Remover` of one :meth:`BlobCuller.cull_pass`; remembers the byte
    ranges of its trims for their decision events."""

    def __init__(self, culler: BlobCuller, keys: dict[int, BlobKey]) -> None:
        self._culler = culler
        self._keys = keys
        self._trimmed: dict[int, list[tuple[int, int]]] = {}

    def cull(self, cand: Candidate) -> Outcome:
        return self._culler.cull(cand, self._keys[id(cand)])

    def trim(self, cand: Candidate, nbytes: int) -> tuple[Outcome, int]:
        outcome, freed, ranges = self._culler.trim(cand, self._keys[id(cand)], nbytes)
        if ranges:
            self._trimmed[id(cand)] = ranges
        return outcome, freed

    def detail(self, cand: Candidate) -> dict[str, Any]:
        ranges = self._trimmed.get(id(cand))
        return {"ranges": [list(r) for r in ranges]} if ranges else {}
