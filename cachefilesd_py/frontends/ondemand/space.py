"""Keeping an on-demand cache inside its limits.

In on-demand mode there is no state line: the kernel signals space pressure only by
POLLOUT on the device (free blocks or files below *cull*) and by ENOBUFS on writes
(below *stop*). The daemon then culls whole blobs the kernel is not using:

- candidates come from one scan of ``cache/`` (bounded heap, ``space/scan.py``); a blob
  the daemon has seen since start is ordered by the cull policy (which saw its OPENs
  and misses), a blob from before the start by its atime, and those come first;
- pinned blobs (``pin`` globs over ``<volume>/<cookie>``) and blobs with an open kernel
  object are never culled; ``cull`` itself re-checks and answers EBUSY for objects in
  use, so a read can never race a removal;
- ``cull`` names the file relative to the working directory, hence the ``chdir``;
- a culled blob's presence sidecar is removed after the kernel moved the file to the
  graveyard, and the graveyard is emptied;
- culling aims at *run* plus a headroom, and at the absolute caps
  (``cache_max_bytes``/``cache_max_objects``, and ``volume_max_bytes`` per volume).

Not done here yet: chunk-level hole punching inside blobs (the store's
``clear_chunks`` is the durable half of it).
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.kernel.device import Device, cull_one
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.space.graveyard import reap
from cachefilesd_py.space.policy import CullPolicy, make_policy
from cachefilesd_py.space.scan import Candidate, scan
from cachefilesd_py.space.stats import Limits, SpaceSnapshot, bytes_to_free

log = structlog.get_logger("ondemand.space")

BlobKeyBytes = tuple[bytes, bytes]


def key_of(candidate: Candidate) -> BlobKeyBytes | None:
    """The blob key of a cache file named ``I<volume>/@xx/D<cookie>``."""
    vol_dir = os.path.basename(os.path.dirname(candidate.directory))
    if not vol_dir.startswith("I") or not candidate.name.startswith("D"):
        return None
    return vol_dir[1:].encode(), candidate.name[1:].encode()


@dataclass
class CullOutcome:
    culled: int = 0
    freed_bytes: int = 0
    busy: int = 0
    pinned: int = 0
    #: whether the limits asked for anything to be freed at all
    needed: bool = False


class OnDemandCuller:
    def __init__(
        self,
        device: Device,
        cache_dir: Path,
        presence: PresenceStore,
        config: Config,
        in_use: Callable[[], set[BlobKeyBytes]],
    ) -> None:
        self.device = device
        self.cache_dir = cache_dir
        self.presence = presence
        self.config = config
        self.in_use = in_use
        self.policy: CullPolicy = make_policy(config.cull_policy)
        self._lock = threading.Lock()

    # -- signals from the frontend --------------------------------------------------

    def opened(self, key: BlobKeyBytes, size: int) -> None:
        with self._lock:
            self.policy.admit(key, size)
            self.policy.touch(key)

    def missed(self, key: BlobKeyBytes) -> None:
        with self._lock:
            self.policy.touch(key)

    # -- deciding --------------------------------------------------------------------

    def pinned(self, key: BlobKeyBytes) -> bool:
        volume = key[0].decode("utf-8", "replace").removeprefix("erofs,")
        name = f"{volume}/{key[1].decode('utf-8', 'replace')}"
        return any(fnmatch.fnmatchcase(name, p) for p in self.config.pins)

    def bytes_needed(self, scanned_bytes: int, scanned_objects: int) -> tuple[int, int]:
        snap = SpaceSnapshot.of(str(self.cache_dir))
        pct = {
            n: self.config.threshold(n)
            for n in ("brun", "bcull", "bstop", "frun", "fcull", "fstop")
        }
        need = bytes_to_free(snap, Limits.from_percent(snap, pct))
        if self.config.cache_max_bytes is not None:
            need = max(need, scanned_bytes - self.config.cache_max_bytes)
        objects = 0
        if self.config.cache_max_objects is not None:
            objects = max(0, scanned_objects - self.config.cache_max_objects)
        return need, objects

    def volumes_over_cap(self, candidates: list[Candidate]) -> dict[bytes, int]:
        """Bytes above its ``volume_max_bytes`` cap, per volume key (first matching rule
        wins; the glob sees the volume without its ``erofs,`` prefix)."""
        if not self.config.volume_max_bytes:
            return {}
        used: dict[bytes, int] = {}
        for cand in candidates:
            key = key_of(cand)
            if key is not None:
                used[key[0]] = used.get(key[0], 0) + cand.blocks * 512
        over: dict[bytes, int] = {}
        for volume, total in used.items():
            name = volume.decode("utf-8", "replace").removeprefix("erofs,")
            for rule in self.config.volume_max_bytes:
                if fnmatch.fnmatchcase(name, rule.pattern):
                    if total > rule.size:
                        over[volume] = total - rule.size
                    break
        return over

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        """Blobs unknown to the policy (cached before this start) first, oldest atime
        first; then the policy's eviction order."""
        by_key: dict[object, Candidate] = {key_of(c): c for c in candidates}
        known: list[Candidate] = []
        with self._lock:
            for key in self.policy.victims(lambda k: k not in by_key):
                known.append(by_key[key])
                if len(known) == len(by_key):
                    break
        known_set = {id(c) for c in known}
        unknown = sorted(
            (c for c in candidates if id(c) not in known_set), key=lambda c: c.atime_ns
        )
        return unknown + known

    # -- doing -----------------------------------------------------------------------

    def cull_pass(self, need_bytes: int | None = None, need_objects: int = 0) -> CullOutcome:
        """Cull toward the limits. The cache tree is scanned only when there is
        something to free (statvfs is cheap; a scan of a big cache is not), or when
        absolute caps are configured (they need the tree's totals)."""
        out = CullOutcome()
        caps = (
            self.config.cache_max_bytes is not None
            or self.config.cache_max_objects
            or self.config.volume_max_bytes
        )
        if need_bytes is None and not caps:
            need_bytes, need_objects = self.bytes_needed(0, 0)
            if need_bytes <= 0:
                return out
        result = scan(str(self.cache_dir / "cache"), 1 << 20)
        if need_bytes is None:
            need_bytes, need_objects = self.bytes_needed(result.blocks * 512, result.objects)
        over = self.volumes_over_cap(result.oldest)
        if need_bytes <= 0 and need_objects <= 0 and not over:
            return out
        out.needed = True
        busy_keys = self.in_use()
        for cand in self.order(result.oldest):
            key = key_of(cand)
            if key is None:
                continue
            globally_done = out.freed_bytes >= need_bytes and out.culled >= need_objects
            if globally_done and over.get(key[0], 0) <= 0:
                if not any(v > 0 for v in over.values()):
                    break
                continue
            if self.pinned(key):
                out.pinned += 1
                continue
            if key in busy_keys:
                out.busy += 1
                continue
            outcome = cull_one(self.device, cand.directory, cand.name)
            if outcome == "culled":
                out.culled += 1
                out.freed_bytes += cand.blocks * 512
                if key[0] in over:
                    over[key[0]] -= cand.blocks * 512
                self.presence.remove(key)
                with self._lock:
                    self.policy.remove(key)
            elif outcome == "busy":
                out.busy += 1
        reap(str(self.cache_dir / "graveyard"))
        log.info(
            "cull.pass",
            mode="ondemand",
            need_bytes=need_bytes,
            culled=out.culled,
            freed=out.freed_bytes,
            busy=out.busy,
            pinned=out.pinned,
            scanned=result.objects,
        )
        return out

    def remove_orphan_sidecars(self) -> int:
        """Sidecars whose cache file is gone (culled by anyone, or never committed)."""
        result = scan(str(self.cache_dir / "cache"), 1 << 20)
        known = {k for c in result.oldest if (k := key_of(c)) is not None}
        orphans = self.presence.orphans(known)
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)
