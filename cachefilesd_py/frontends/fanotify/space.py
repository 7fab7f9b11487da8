"""Culling and trimming in fanotify mode: the same limits, caps, pins and policy as
on-demand mode, carried out on ``<dir>/fanotify/<volume>/<name>``.

What differs from on-demand mode is who may touch a file, not what the rules are
(``space/plan.py`` decides, ``space/culler.py`` runs the loop):

- Nothing in the kernel signals space pressure here (no ``/dev/cachefiles``), so a
  thread checks every :data:`INTERVAL` seconds: ``statvfs`` of the cache against the
  ``brun``/``bcull``/``bstop`` percentages (``bcull`` starts a pass, which aims at
  ``brun`` plus headroom, as the kernel's hysteresis does), and the absolute caps.
- A blob a mount reads now (served) is **never culled nor trimmed**: it counts as in
  use. Removing it is impossible (EROFS holds its file open), and punching a hole in
  it can race a read the daemon has already allowed. A backing read raises its
  pre-content event and, once answered, reads the file in the same task with no lock
  held in between (``vfs_iocb_iter_read``: ``rw_verify_area``, then ``read_iter``). A
  read allowed from the bitmap a moment before a trim cleared the bits may therefore
  reach the file after the punch and copy the hole's zeros into EROFS's page cache.
  Nothing a user-space daemon can observe tells when that read has happened (the
  post-read ``FAN_ACCESS`` is not raised for an asynchronous read), so no wait makes
  the punch safe; the first design (a settle time after the last answer) lost that
  race in a loaded guest. A cache over its limits because of mounted images says so
  (``fanotify.over_limit_mounted``, once per state change); the space comes back once
  the image is no longer served (taken out of the configuration).
- A blob no mount reads (a cache file of an image no longer configured, or not
  mounted) is culled whole — its file unlinked, then its sidecar removed — or trimmed,
  under its trim lease (``engine/leases.py``), which a starting image's
  ``prepare_blob`` waits for. No mark is on such a file: its punch raises nothing.

Lock order: as ``engine/cull.py``'s.
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
    shared plan, idle trims) over ``<dir>/fanotify``, with served blobs in use; see
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
        #: whether the last pass was left short by mounted images (logged on change)
        self.held_by_mounts = False

    def in_use_keys(self) -> set[BlobKey]:
        return super().in_use_keys() | set(self.served())

    def _cull_pass(
        self, need_bytes: int | None, need_objects: int, dry_run: bool, record: bool
    ) -> PassResult:
        out = super()._cull_pass(need_bytes, need_objects, dry_run, record)
        if not dry_run:
            self._report_mounted(out)
        return out

    def _report_mounted(self, out: PassResult) -> None:
        """Say once when the limits cannot be met because mounted images hold the
        space, and once when they can again."""
        short = out.needed and out.tally.freed_bytes < out.need_bytes
        held = short and out.tally[Outcome.IN_USE] > 0
        if held and not self.held_by_mounts:
            log.warning(
                "fanotify.over_limit_mounted",
                need_bytes=out.need_bytes,
                freed=out.tally.freed_bytes,
                note="mounted images are never punched; their space goes when unmounted",
            )
        elif self.held_by_mounts and not held:
            log.info("fanotify.within_limits")
        self.held_by_mounts = held

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
    held_pins: Callable[[], frozenset[str]] = frozenset,
) -> FanotifyCuller:
    """The culler of a fanotify cache: the configured percentages (statvfs of the
    cache), caps, pins and cull policy, as in on-demand mode. ``held_pins``: the pins
    of ``cachefilesctl pin`` (``space/pins.py``), held from the first pass on."""
    culler = FanotifyCuller(
        tree=cache_dir / TREE_NAME,
        presence=presence,
        leases=leases,
        rules=CullRules.from_config(config),
        policy=make_policy(config.cull_policy),
        limits_need=limits_need_of(cache_dir, {n: config.threshold(n) for n in THRESHOLD_NAMES}),
        served=served,
    )
    culler.held_pins = held_pins
    return culler
