"""Culling and trimming in fanotify mode: the same limits, caps, pins and policy as
on-demand mode, carried out on ``<dir>/fanotify/<volume>/<name>``.

What differs from on-demand mode is who may touch a file, not what the rules are
(``space/plan.py`` decides, ``space/culler.py`` runs the loop):

- Nothing in the kernel signals space pressure here (no ``/dev/cachefiles``), so a
  thread checks every :data:`INTERVAL` seconds: ``statvfs`` of the cache against the
  ``brun``/``bcull``/``bstop`` percentages (``bcull`` starts a pass, which aims at
  ``brun`` plus headroom, as the kernel's hysteresis does), and the absolute caps.
- A blob a mount reads now (served) cannot be removed: EROFS holds its file open and
  reads it at any time. It can only be *trimmed* (``plan``: ``trim_only``), live,
  under its :class:`~cachefilesd_py.frontends.fanotify.trim.TrimGuard` (``trim.py``:
  bits cleared durably, a settle, then the punch; fills parked meanwhile).
- A blob no mount reads (a cache file of an image no longer configured, or not
  mounted) is culled whole — its file unlinked, then its sidecar removed — or trimmed,
  under its trim lease (``engine/leases.py``), which a starting image's
  ``prepare_blob`` waits for. No mark is on such a file: its punch raises nothing.

Lock order: the culler's ``_lock`` (policy) is a leaf; a pass takes, one at a time,
the leases' condition, a blob's ``TrimGuard`` condition and the presence store's I/O
lock, never nested in each other.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import Config
from cachefilesd_py.engine.cull import trim_idle_file
from cachefilesd_py.engine.leases import BlobLeases
from cachefilesd_py.frontends.fanotify.images import TREE_NAME, ServedBlob
from cachefilesd_py.frontends.fanotify.trim import SETTLE_SECONDS, TrimTarget, trim_served
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.space.caps import CullRules
from cachefilesd_py.space.chunks import KEEP_HEAD_BYTES
from cachefilesd_py.space.culler import PassResult, run_plan
from cachefilesd_py.space.plan import CullPlan, Needs, Outcome, Tally
from cachefilesd_py.space.policy import CullPolicy, make_policy
from cachefilesd_py.space.scan import Candidate, scan_volume_files
from cachefilesd_py.space.stats import Limits, SpaceSnapshot, bytes_to_free

log = structlog.get_logger("fanotify.space")

#: seconds between checks of the cache's space
INTERVAL = 1.0


def key_of(cand: Candidate) -> BlobKey:
    """The blob of ``<dir>/fanotify/<volume>/<name>``."""
    return BlobKey.named(os.path.basename(cand.directory), cand.name)


def volume_dir_of(cand: Candidate) -> str:
    """Volumes are counted as ``I<volume>``, as ``scan_volume_files`` does."""
    return "I" + os.path.basename(cand.directory)


def limits_need_of(cache_dir: Path, percent: dict[str, int]) -> Callable[[], int]:
    """Bytes to free for the percentage limits, or 0 while free space is above
    *cull* (the kernel's hysteresis: a pass that starts aims at *run* plus headroom)."""

    def need() -> int:
        snap = SpaceSnapshot.of(str(cache_dir))
        lim = Limits.from_percent(snap, percent)
        if snap.blocks_free >= lim.bcull:
            return 0
        return bytes_to_free(snap, lim)

    return need


class FanotifyCuller:
    """Keeps ``<dir>/fanotify`` inside its limits; see the module docstring."""

    def __init__(
        self,
        *,
        tree: Path,
        presence: PresenceStore,
        leases: BlobLeases,
        rules: CullRules,
        policy: CullPolicy,
        limits_need: Callable[[], int],
        served: Callable[[], dict[BlobKey, ServedBlob]],
        unsilence: Callable[[ServedBlob], None],
        settle: float = SETTLE_SECONDS,
        keep_head_bytes: int = KEEP_HEAD_BYTES,
        scan_limit: int = 1 << 20,
    ) -> None:
        self.tree = tree
        self.presence = presence
        self.leases = leases
        self.rules = rules
        self.policy = policy
        self.limits_need = limits_need
        self.served = served
        self.unsilence = unsilence
        self.settle = settle
        self.keep_head_bytes = keep_head_bytes
        self.scan_limit = scan_limit
        self.totals = Tally()
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()

    # -- signals from the frontend ------------------------------------------------

    def opened(self, key: BlobKey, size: int) -> None:
        with self._lock:
            self.policy.admit(key, size)
            self.policy.touch(key)

    def missed(self, key: BlobKey) -> None:
        with self._lock:
            self.policy.touch(key)

    # -- a pass -------------------------------------------------------------------

    def cull_pass(self) -> PassResult:
        with self._pass_lock:
            return self._cull_pass()

    def _cull_pass(self) -> PassResult:
        out = PassResult()
        caps = self.rules.caps
        need_bytes = self.limits_need()
        if need_bytes <= 0 and not caps.configured:
            return out
        result = scan_volume_files(str(self.tree), self.scan_limit)
        out.scanned = result.objects
        cap_needs = caps.needs(
            result.blocks * 512,
            result.objects,
            {v: b * 512 for v, b in result.volume_blocks.items()},
        )
        needs = Needs(max(need_bytes, cap_needs.bytes), cap_needs.objects, cap_needs.volumes)
        out.need_bytes, out.need_objects = needs.bytes, needs.objects
        if not needs.any:
            return out
        out.needed = True
        served = self.served()
        keys = {id(c): key_of(c) for c in result.oldest}
        busy = self.leases.in_use()
        plan = CullPlan(
            needs,
            volume_of=volume_dir_of,
            pinned=lambda c: self._pinned(keys[id(c)]),
            in_use=lambda c: keys[id(c)] in busy,
            trim_only=lambda c: keys[id(c)] in served,
            trim=True,
        )
        remover = _Remover(self, keys, served)
        out.tally = run_plan(
            plan, self._order(result.oldest, keys), remover, describe=lambda c: str(keys[id(c)])
        )
        self.totals.add(out.tally)
        log.info(
            "cull.pass",
            mode="fanotify",
            need_bytes=needs.bytes,
            need_objects=needs.objects,
            volumes_over=len(needs.volumes),
            freed=out.tally.freed_bytes,
            scanned=result.objects,
            **out.tally.as_fields(),
        )
        return out

    def _pinned(self, key: BlobKey) -> bool:
        return self.rules.pinned(
            key.volume.decode("utf-8", "backslashreplace"),
            key.name.decode("utf-8", "backslashreplace"),
        )

    def _order(self, cands: list[Candidate], keys: dict[int, BlobKey]) -> list[Candidate]:
        """Blobs the policy does not know (cached before this start) first, oldest
        atime first; then the policy's eviction order."""
        by_key = {keys[id(c)]: c for c in cands}
        known: list[Candidate] = []
        with self._lock:
            for key in self.policy.victims(lambda k: k not in by_key):
                known.append(by_key[key])  # type: ignore[index]
                if len(known) == len(by_key):
                    break
        seen = {id(c) for c in known}
        return sorted((c for c in cands if id(c) not in seen), key=lambda c: c.atime_ns) + known

    # -- removing -----------------------------------------------------------------

    def cull_idle(self, cand: Candidate, key: BlobKey) -> Outcome:
        """Unlink a cache file no mount reads, then its sidecar (a sidecar without its
        file is an orphan, a file without its sidecar a miss: either order is safe;
        file first frees the space)."""
        with self.leases.trim(key) as granted:
            if not granted:
                return Outcome.BUSY
            try:
                os.unlink(Path(cand.directory) / cand.name)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return Outcome.GONE
                log.warning("cull.failed", blob=str(key), error=str(exc))
                return Outcome.FAILED
            self.presence.remove(key)
        with self._lock:
            self.policy.remove(key)
        return Outcome.CULLED

    def trim_idle(self, cand: Candidate, key: BlobKey, need_bytes: int) -> tuple[Outcome, int]:
        with self.leases.trim(key) as granted:
            if not granted:
                return Outcome.BUSY, 0
            return trim_idle_file(self.presence, key, Path(cand.directory) / cand.name, need_bytes)

    def trim_live(self, served: ServedBlob, need_bytes: int) -> tuple[Outcome, int]:
        presence = served.blob.presence
        if presence is None:
            return Outcome.UNTRIMMABLE, 0
        target = TrimTarget(
            served.path, presence, served.guard, served.size, lambda: self.unsilence(served)
        )
        try:
            return trim_served(
                self.presence,
                target,
                need_bytes,
                settle=self.settle,
                keep_head_bytes=self.keep_head_bytes,
            )
        except OSError as exc:  # the ignore mark could not go, or the sidecar not
            log.warning("fanotify.trim_failed", blob=str(served.key), error=str(exc))
            return Outcome.FAILED, 0


class _Remover:
    def __init__(
        self,
        culler: FanotifyCuller,
        keys: dict[int, BlobKey],
        served: dict[BlobKey, ServedBlob],
    ) -> None:
        self._culler = culler
        self._keys = keys
        self._served = served

    def cull(self, cand: Candidate) -> Outcome:
        key = self._keys[id(cand)]
        if key in self._served:
            return Outcome.IN_USE
        return self._culler.cull_idle(cand, key)

    def trim(self, cand: Candidate, nbytes: int) -> tuple[Outcome, int]:
        key = self._keys[id(cand)]
        served = self._served.get(key)
        if served is not None:
            return self._culler.trim_live(served, nbytes)
        return self._culler.trim_idle(cand, key, nbytes)


class SpaceThread:
    """Runs a pass every :data:`INTERVAL` seconds until :meth:`stop`."""

    def __init__(self, culler: FanotifyCuller, interval: float = INTERVAL) -> None:
        self.culler = culler
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fanotify-space", daemon=True)

    def start(self) -> SpaceThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.culler.cull_pass()
            except Exception:  # a pass that fails is logged; the next one tries again
                log.exception("cull.pass_failed", mode="fanotify")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


THRESHOLD_NAMES = ("brun", "bcull", "bstop", "frun", "fcull", "fstop")


def make_culler(
    config: Config,
    cache_dir: Path,
    presence: PresenceStore,
    leases: BlobLeases,
    served: Callable[[], dict[BlobKey, ServedBlob]],
    unsilence: Callable[[ServedBlob], None],
) -> FanotifyCuller:
    """The culler of a fanotify cache: the configured percentages (statvfs of the
    cache), caps, pins and cull policy, as in on-demand mode."""
    return FanotifyCuller(
        tree=cache_dir / TREE_NAME,
        presence=presence,
        leases=leases,
        rules=CullRules.from_config(config),
        policy=make_policy(config.cull_policy),
        limits_need=limits_need_of(cache_dir, {n: config.threshold(n) for n in THRESHOLD_NAMES}),
        served=served,
        unsilence=unsilence,
    )
