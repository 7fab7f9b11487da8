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
  (``cache_max_bytes``/``cache_max_objects``, and ``volume_max_bytes`` per volume);
- a blob much larger than what is still to be freed is *trimmed* instead of removed
  (``space/chunks.py`` picks the chunks): under the blob's trim lease (no kernel object
  on it, new OPENs wait, ``engine/leases.py``), its bits are cleared in the sidecar
  durably first, then holes are punched over those chunks. A bit may lag its data,
  never lead it: a crash between the two leaves data without a bit, a refetch later.
  A blob without a trusted sidecar is culled whole instead.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.engine.leases import BlobLeases
from cachefilesd_py.kernel._sys import punch_hole
from cachefilesd_py.kernel.device import Device, cull_one, in_use
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.space.caps import Caps, pinned
from cachefilesd_py.space.chunks import chunks_to_trim, keep_head_chunks, should_trim
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
    #: blobs that gave back chunks (holes punched) instead of being culled whole
    trimmed: int = 0
    freed_bytes: int = 0
    busy: int = 0
    pinned: int = 0
    #: whether the limits asked for anything to be freed at all
    needed: bool = False

    @property
    def acted(self) -> int:
        return self.culled + self.trimmed


class OnDemandCuller:
    def __init__(
        self,
        device: Device,
        cache_dir: Path,
        presence: PresenceStore,
        config: Config,
        leases: BlobLeases,
    ) -> None:
        self.device = device
        self.cache_dir = cache_dir
        self.presence = presence
        self.config = config
        self.leases = leases
        self.caps = Caps.from_config(config)
        #: totals since start, for the daemon's stats
        self.totals = CullOutcome()
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
        return pinned(self.config.pins, volume, key[1].decode("utf-8", "replace"))

    def limits_need(self) -> int:
        """Bytes to free for the percentage limits (*run* plus headroom), from statvfs."""
        snap = SpaceSnapshot.of(str(self.cache_dir))
        pct = {
            n: self.config.threshold(n)
            for n in ("brun", "bcull", "bstop", "frun", "fcull", "fstop")
        }
        return bytes_to_free(snap, Limits.from_percent(snap, pct))

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
        if need_bytes is None and not self.caps.configured:
            need_bytes = self.limits_need()
            if need_bytes <= 0:
                return out
        result = scan(str(self.cache_dir / "cache"), 1 << 20)
        caps = self.caps.needs(
            result.blocks * 512,
            result.objects,
            {v: b * 512 for v, b in result.volume_blocks.items()},
        )
        if need_bytes is None:
            need_bytes = max(self.limits_need(), caps.bytes)
        need_objects = max(need_objects, caps.objects)
        over = dict(caps.volumes)
        if need_bytes <= 0 and need_objects <= 0 and not over:
            return out
        out.needed = True
        busy_keys = self.leases.in_use()
        for cand in self.order(result.oldest):
            key = key_of(cand)
            if key is None:
                continue
            vdir = os.path.basename(os.path.dirname(cand.directory))
            globally_done = out.freed_bytes >= need_bytes and out.culled >= need_objects
            if globally_done and over.get(vdir, 0) <= 0:
                if not any(v > 0 for v in over.values()):
                    break
                continue
            if self.pinned(key):
                out.pinned += 1
                continue
            if key in busy_keys:
                out.busy += 1
                continue
            still = max(need_bytes - out.freed_bytes, over.get(vdir, 0))
            if out.culled >= need_objects and should_trim(cand.blocks * 512, still):
                freed = self.trim(cand, key, still)
                if freed is None:
                    out.busy += 1
                    continue
                if freed > 0:
                    out.trimmed += 1
                    out.freed_bytes += freed
                    if vdir in over:
                        over[vdir] -= freed
                    continue
            outcome = cull_one(self.device, cand.directory, cand.name)
            if outcome == "culled":
                out.culled += 1
                out.freed_bytes += cand.blocks * 512
                if vdir in over:
                    over[vdir] -= cand.blocks * 512
                self.presence.remove(key)
                with self._lock:
                    self.policy.remove(key)
            elif outcome == "busy":
                out.busy += 1
        reap(str(self.cache_dir / "graveyard"))
        for name in ("culled", "trimmed", "freed_bytes", "busy", "pinned"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(out, name))
        log.info(
            "cull.pass",
            mode="ondemand",
            need_bytes=need_bytes,
            culled=out.culled,
            trimmed=out.trimmed,
            freed=out.freed_bytes,
            busy=out.busy,
            pinned=out.pinned,
            scanned=result.objects,
        )
        return out

    def trim(self, cand: Candidate, key: BlobKeyBytes, need_bytes: int) -> int | None:
        """Give back about ``need_bytes`` of an idle blob's chunks; the bytes freed
        (0 when the blob has no trusted sidecar or nothing trimmable: cull it whole
        instead), or None when the blob is in use."""
        path = Path(cand.directory) / cand.name
        with self.leases.trim(key) as granted:
            if not granted:
                return None
            # The leases know the objects this worker opened; the kernel knows them all
            # (after a failover, objects opened by the previous worker stay open and
            # in use until a READ re-opens them). With the lease held no new OPEN is
            # answered, so the kernel's "free" stays true until the punch is done.
            if in_use(self.device, cand.directory, cand.name) != "free":
                return None
            bp = self.presence.load_bound(key, path)
            if bp is None:
                return 0
            geo = bp.geometry
            runs = chunks_to_trim(
                bp.bitmap.present_runs(0, geo.nchunks),
                geo.blob_size,
                geo.chunk_size,
                need_bytes,
                keep_head_chunks(geo.chunk_size),
            )
            if not runs:
                return 0
            self.presence.clear_runs(bp, runs)  # the bits go durably before the bytes
            chunk = bp.geometry.chunk_size
            try:
                with OwnedFd(os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)) as fd:
                    before = os.fstat(fd.fileno()).st_blocks
                    for first, count in runs:
                        punch_hole(fd.fileno(), first * chunk, count * chunk)
                    after = os.fstat(fd.fileno()).st_blocks
            except OSError as exc:
                # the bits are already gone: at worst a refetch, never wrong bytes
                log.warning("cull.trim_failed", file=str(path), error=str(exc))
                return 0
        freed = max(0, before - after) * 512
        log.info(
            "cull.trimmed",
            file=str(path),
            chunks=sum(c for _f, c in runs),
            freed=freed,
            present=bp.bitmap.count(),
        )
        return freed

    def remove_orphan_sidecars(self) -> int:
        """Sidecars whose cache file is gone (culled by anyone, or never committed)."""
        result = scan(str(self.cache_dir / "cache"), 1 << 20)
        known = {k for c in result.oldest if (k := key_of(c)) is not None}
        orphans = self.presence.orphans(known)
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)
