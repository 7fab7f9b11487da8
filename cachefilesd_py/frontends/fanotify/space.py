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

Lock order: as ``engine/cull.py``'s; a pass also takes a blob's ``TrimGuard``
condition, a leaf, never while holding another lock.
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
from cachefilesd_py.engine.cull import BlobCuller
from cachefilesd_py.engine.leases import BlobLeases
from cachefilesd_py.frontends.fanotify.images import TREE_NAME, ServedBlob
from cachefilesd_py.frontends.fanotify.trim import SETTLE_SECONDS, TrimTarget, trim_served
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.space.caps import CullRules
from cachefilesd_py.space.chunks import KEEP_HEAD_BYTES
from cachefilesd_py.space.culler import PassResult
from cachefilesd_py.space.plan import Outcome
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


class FanotifyCuller(BlobCuller):
    """The core's blob culler (``engine/cull.py``: candidates, policy order, pins, the
    shared plan, idle trims) over ``<dir>/fanotify``, with what this mode changes; see
    the module docstring."""

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
    ) -> None:
        super().__init__(
            tree=tree,
            graveyard=None,
            presence=presence,
            leases=leases,
            rules=rules,
            policy=policy,
            key_of=key_of,
            cull=self._unlink_idle,
            limits_need=limits_need,
            scan_tree=scan_volume_files,
            volume_of=volume_dir_of,
            keep_head_bytes=keep_head_bytes,
        )
        self.served = served
        self.unsilence = unsilence
        self.settle = settle
        #: the served blobs of the pass that runs (read once per pass)
        self._serving: dict[BlobKey, ServedBlob] = {}

    def _cull_pass(
        self, need_bytes: int | None, need_objects: int, dry_run: bool, record: bool
    ) -> PassResult:
        self._serving = self.served()
        try:
            return super()._cull_pass(need_bytes, need_objects, dry_run, record)
        finally:
            self._serving = {}

    def trim_only(self, key: BlobKey) -> bool:
        return key in self._serving

    def cull(self, cand: Candidate, key: BlobKey) -> Outcome:
        if key in self._serving:  # a mount reads it: never removed
            return Outcome.IN_USE
        return super().cull(cand, key)

    def _unlink_idle(self, cand: Candidate) -> int:
        """Unlink a cache file no mount reads, under its trim lease (a starting image
        waits for it): 0 or the errno (EBUSY while leased)."""
        key = key_of(cand)
        with self.leases.trim(key) as granted:
            if not granted:
                return errno.EBUSY
            try:
                os.unlink(Path(cand.directory) / cand.name)
            except OSError as exc:
                log.warning("cull.failed", blob=str(key), error=str(exc))
                return exc.errno or errno.EIO
            self.presence.remove(key)
        return 0

    def trim(
        self, cand: Candidate, key: BlobKey, need_bytes: int
    ) -> tuple[Outcome, int, list[tuple[int, int]]]:
        """A served image's file is trimmed in place (``trim_served``; its byte ranges
        are in that trim's own event, not in the decision's); an idle one as any blob."""
        served = self._serving.get(key)
        if served is None:
            return super().trim(cand, key, need_bytes)
        presence = served.blob.presence
        if presence is None:
            return Outcome.UNTRIMMABLE, 0, []
        target = TrimTarget(
            served.path, presence, served.guard, served.size, lambda: self.unsilence(served)
        )
        try:
            outcome, freed = trim_served(
                self.presence,
                target,
                need_bytes,
                settle=self.settle,
                keep_head_bytes=self.keep_head_bytes,
            )
        except OSError as exc:  # the ignore mark could not go, or the sidecar not
            log.warning("fanotify.trim_failed", blob=str(served.key), error=str(exc))
            return Outcome.FAILED, 0, []
        return outcome, freed, []


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
