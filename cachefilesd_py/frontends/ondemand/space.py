"""Space pressure in on-demand mode: when to cull, and what an on-demand cache file is.

In on-demand mode there is no state line: the kernel signals space pressure only by
POLLOUT on the device (free blocks or files below *cull*) and by ENOBUFS on writes
(below *stop*) (``docs/protocol-ondemand.md`` §6). :class:`SpaceWatcher` is the thread
that answers both by running the core's blob culler (``engine/cull.py``):

- the reader loop asks for POLLOUT only while no pass is running or backing off, so a
  full disk cannot spin it (:meth:`SpaceWatcher.kick` on POLLOUT);
- a fill that meets ENOBUFS below *stop* calls :meth:`SpaceWatcher.make_room`: start
  a pass (or join the running one), wait for it, pause briefly, write again;
- a pass that frees nothing although the kernel asked backs off for a few seconds; one
  that found nothing to free (statvfs shows no shortage, but the kernel also counts
  blocks still being written) looks again soon;
- every 30 s a pass runs anyway (the absolute caps need scans), and every 20th pass
  removes the sidecars of cache files that are gone.

What an on-demand cache file is: ``cache/I<volume key>/@xx/<name>``, named by the
kernel from the blob's keys (:func:`key_of`, ``BlobKey.from_cache_path``, for every
name form). ``cull`` names the file relative to the working directory, hence
``kernel.device.cull_in``.

Lock order: the watcher's two events are not locks; it takes none of its own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import Config
from cachefilesd_py.engine.cull import BlobCuller
from cachefilesd_py.engine.leases import BlobLeases
from cachefilesd_py.kernel.device import Device, cull_in, in_use_in
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.space.caps import CullRules
from cachefilesd_py.space.culler import PassResult
from cachefilesd_py.space.policy import make_policy
from cachefilesd_py.space.scan import Candidate
from cachefilesd_py.space.stats import Limits, SpaceSnapshot, bytes_to_free

log = structlog.get_logger("ondemand.space")

THRESHOLD_NAMES = ("brun", "bcull", "bstop", "frun", "fcull", "fstop")


def key_of(cand: Candidate) -> BlobKey | None:
    """The blob of an on-demand cache file ``I<volume>/@xx/<name>`` (any name form)."""
    return BlobKey.from_cache_path(os.path.basename(os.path.dirname(cand.directory)), cand.name)


def make_culler(
    device: Device,
    cache_dir: Path,
    presence: PresenceStore,
    leases: BlobLeases,
    config: Config,
    rules: CullRules | None = None,
) -> BlobCuller:
    """The blob culler of an on-demand cache: the kernel's ``cull``, the kernel's
    percentage limits (statvfs of the cache), the configured caps, pins and policy."""
    percent = {n: config.threshold(n) for n in THRESHOLD_NAMES}

    def limits_need() -> int:
        """Bytes to free for the percentage limits (*run* plus headroom)."""
        snap = SpaceSnapshot.of(str(cache_dir))
        return bytes_to_free(snap, Limits.from_percent(snap, percent))

    return BlobCuller(
        tree=cache_dir / "cache",
        graveyard=cache_dir / "graveyard",
        presence=presence,
        leases=leases,
        rules=rules if rules is not None else CullRules.from_config(config),
        policy=make_policy(config.cull_policy),
        key_of=key_of,
        cull=lambda cand: cull_in(device, cand.directory, cand.name),
        in_kernel_use=lambda cand: in_use_in(device, cand.directory, cand.name) != 0,
        limits_need=limits_need,
    )


class SpaceWatcher:
    """The "space" thread: runs cull passes when the kernel signals pressure."""

    #: seconds between passes without a signal (caps, orphan sidecars)
    PERIOD = 30.0
    #: pause after a signalled pass that could free nothing
    BACKOFF = 5.0
    #: every this many passes, sidecars of vanished cache files are removed
    ORPHAN_SWEEP_EVERY = 20

    def __init__(self, culler: BlobCuller) -> None:
        self.culler = culler
        self._kick = threading.Event()
        #: set while no pass runs or backs off (then POLLOUT may be asked for)
        self.idle = threading.Event()
        self.idle.set()
        #: set when serving ends: nothing may wait for a pass after that
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._loop, args=(stop,), name="space", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._kick.set()
        self.idle.set()  # release fills waiting in make_room
        if self._thread is not None:
            self._thread.join(timeout=30)

    def kick(self, why: str) -> None:
        if self.idle.is_set():
            log.info("space.pressure", signal=why)
            self.idle.clear()
            self._kick.set()

    def make_room(self, timeout: float = 10.0) -> bool:
        """Start a cull pass (or join the running one), wait for it to end, then pause
        briefly. False when the daemon is stopping (no pass will come) or the pass did
        not end in time. Called by fills that hit ENOBUFS."""
        if self._stopping.is_set():
            return False
        self.kick("enobufs")
        if not self.idle.wait(timeout) or self._stopping.is_set():
            return False
        self._stopping.wait(0.2)
        return not self._stopping.is_set()

    def _loop(self, stop: threading.Event) -> None:
        passes = 0
        while not stop.is_set() and not self._stopping.is_set():
            kicked = self._kick.wait(self.PERIOD)
            self._kick.clear()
            if stop.is_set() or self._stopping.is_set():
                break
            result: PassResult | None
            try:
                result = self.culler.cull_pass()
                passes += 1
                if passes % self.ORPHAN_SWEEP_EVERY == 0:
                    self.culler.remove_orphan_sidecars()
            except Exception:
                log.exception("space.cull_failed")
                result = None
            if kicked and (result is None or (result.needed and result.acted == 0)):
                stop.wait(self.BACKOFF)  # nothing cullable: do not spin on POLLOUT
            elif kicked and result is not None and result.acted == 0:
                # statvfs shows no shortage but the kernel signalled one (it also
                # counts blocks still being written): look again soon, not in 5 s
                stop.wait(0.5)
            self.idle.set()
