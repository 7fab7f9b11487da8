"""Durable presence: sidecar files bound to cache files by an xattr.

Where: one sidecar per blob in ``<cache dir>/cachefilesd-py/presence/``, named by the
blob key's digest (``BlobKey.digest``). The cache file carries the xattr
``user.cachefilesd_py.presence`` whose value is the sidecar's random 16-byte binding id
(hex). A sidecar is trusted only if that xattr is on the cache file the kernel uses for
the blob *and* the sidecar's header matches the blob (key, size, source identity token).
Anything else is a miss: an empty bitmap, logged as ``presence.distrusted``, never an
error. A trusted sidecar keeps its own chunk size (see :meth:`PresenceStore.load`).

Why an xattr and a sidecar: an xattr-only bitmap tops out near 1 GiB of blob (64 KiB
values); a sidecar alone could outlive its cache file (the kernel culls, replaces or
discards files behind our back), and the binding id in the file's own xattr travels and
dies with that file.

Crash consistency: a bit may lag its data, never lead it.

1. Workers write data through the kernel (direct I/O) and then ``note_written`` the
   chunks: they are present in memory (no refetch) but not yet durable.
2. ``checkpoint`` snapshots the bitmaps, calls ``syncfs`` on the cache filesystem
   (everything written before it, including those chunks, is now durable), and only
   then saves the snapshots' sidecars atomically (``kernel/durable.py``).
3. A new blob's cache file is an unlinked tmpfile until the kernel commits it after
   CLOSE; only then is it reachable, and ``bind`` writes the sidecar durably *before*
   setting the xattr that makes it trusted (then fsyncs the file for the xattr).
4. ``clear_chunks`` persists the cleared bits *before* the caller punches holes.

Lock order: ``BlobPresence.lock`` is a leaf lock (nothing else is taken while holding
it); ``PresenceStore._io_lock`` serialises sidecar writes and may be held while taking
a ``BlobPresence.lock`` briefly for a snapshot.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.errors import PresenceCorrupt
from cachefilesd_py.kernel.durable import crashpoint, fsync_path, save_file_atomically, syncfs
from cachefilesd_py.presence import format as fmt
from cachefilesd_py.presence.bitmap import ChunkBitmap, ChunkGeometry

log = structlog.get_logger("presence")

BINDING_XATTR = "user.cachefilesd_py.presence"


@dataclass(eq=False)
class BlobPresence:
    key: BlobKey
    geometry: ChunkGeometry
    token: str
    binding_id: bytes
    bitmap: ChunkBitmap
    trusted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: bumped by every change; ``saved_version`` is the version last made durable
    version: int = 0
    saved_version: int = -1

    def note_written(self, first: int, count: int) -> None:
        with self.lock:
            self.bitmap.set_range(first, count)
            self.version += 1

    def is_present(self, i: int) -> bool:
        with self.lock:
            return self.bitmap.test(i)

    def missing_runs(self, first: int, last: int) -> list[tuple[int, int]]:
        with self.lock:
            return self.bitmap.missing_runs(first, last)

    @property
    def dirty(self) -> bool:
        return self.version != self.saved_version

    def snapshot(self) -> tuple[int, bytes]:
        with self.lock:
            return self.version, self.bitmap.to_bytes()


class PresenceStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._io_lock = threading.Lock()
        self._fs_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def sidecar_path(self, key: BlobKey) -> Path:
        return self.root / (key.digest.hex() + ".presence")

    def load(
        self,
        key: BlobKey,
        cache_file: Path | None,
        blob_size: int,
        token: str,
        *,
        chunk_size: int,
        chunk_size_ok: Callable[[int], bool] = lambda _size: True,
    ) -> BlobPresence:
        """The blob's presence: from its sidecar if the sidecar is trusted, else empty.

        ``chunk_size`` is what a blob without a trusted sidecar gets. A trusted sidecar
        keeps the chunk size it records, even when the configuration now says another
        (its bits count its own chunks; the admin changed ``chunk_size`` since), as
        long as ``chunk_size_ok`` accepts it (the engine's fill buffers must hold a
        chunk); otherwise the sidecar is distrusted and the blob starts empty."""
        empty = BlobPresence(
            key,
            ChunkGeometry(blob_size, chunk_size),
            token,
            os.urandom(16),
            ChunkBitmap(ChunkGeometry(blob_size, chunk_size).nchunks),
        )
        if cache_file is None:
            return empty
        path = self.sidecar_path(key)
        reason = self._distrust_reason(key, cache_file, path, blob_size, token, chunk_size_ok)
        if isinstance(reason, str):
            if reason != "no sidecar":
                log.warning(
                    "presence.distrusted", blob=str(key), file=str(cache_file), reason=reason
                )
            return empty
        sc = reason
        geometry = ChunkGeometry(blob_size, sc.chunk_size)
        if sc.chunk_size != chunk_size:
            log.info(
                "presence.kept_chunk_size",
                blob=str(key),
                chunk=sc.chunk_size,
                configured=chunk_size,
                note="the sidecar's chunk size is kept for this blob; new blobs get the new one",
            )
        bp = BlobPresence(
            key,
            geometry,
            token,
            sc.binding_id,
            ChunkBitmap(geometry.nchunks, sc.bitmap),
            trusted=True,
        )
        bp.saved_version = bp.version
        return bp

    def _distrust_reason(
        self,
        key: BlobKey,
        cache_file: Path,
        path: Path,
        blob_size: int,
        token: str,
        chunk_size_ok: Callable[[int], bool],
    ) -> str | fmt.Sidecar:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return "no sidecar"
        except OSError as exc:
            return f"sidecar unreadable: {exc.strerror}"
        try:
            sc = fmt.decode(data)
        except PresenceCorrupt as exc:
            return str(exc)
        try:
            bound = os.getxattr(cache_file, BINDING_XATTR)
        except OSError:
            return "cache file carries no binding xattr"
        if bound != sc.binding_id.hex().encode():
            return "cache file is bound to another sidecar"
        if sc.key_hash != key.digest:
            return "sidecar belongs to another blob"
        if sc.chunk_size <= 0 or sc.chunk_size & (sc.chunk_size - 1):
            return f"sidecar chunk size {sc.chunk_size} is not a power of two"
        if (sc.blob_size, sc.nchunks) != (blob_size, -(-blob_size // sc.chunk_size)):
            return "blob size changed"
        if not chunk_size_ok(sc.chunk_size):
            return f"sidecar chunk size {sc.chunk_size} cannot be filled any more"
        if sc.token != token:
            return "source identity changed"
        return sc

    def _save(self, bp: BlobPresence, bitmap: bytes) -> None:
        sc = fmt.Sidecar(
            bp.geometry.chunk_size,
            bp.geometry.blob_size,
            bp.geometry.nchunks,
            bp.binding_id,
            bp.key.digest,
            bp.token,
            bitmap,
        )
        save_file_atomically(self.sidecar_path(bp.key), fmt.encode(sc))

    def checkpoint(self, presences: list[BlobPresence], *, force: bool = False) -> int:
        """Persist what is durable of each dirty blob; returns how many were saved."""
        with self._io_lock:
            snaps = [(bp, *bp.snapshot()) for bp in presences if force or bp.dirty]
            if not snaps:
                return 0
            crashpoint("checkpoint.before_syncfs")
            syncfs(self._fs_fd)  # the data of every bit in the snapshots is now durable
            crashpoint("checkpoint.after_syncfs")
            for bp, version, bitmap in snaps:
                self._save(bp, bitmap)
                with bp.lock:
                    bp.saved_version = max(bp.saved_version, version)
            return len(snaps)

    def bind(self, bp: BlobPresence, cache_file: Path) -> None:
        """The kernel made ``cache_file`` reachable: make the sidecar durable, then
        point the file's xattr at it."""
        self.checkpoint([bp], force=True)
        crashpoint("bind.before_xattr")
        os.setxattr(cache_file, BINDING_XATTR, bp.binding_id.hex().encode())
        fsync_path(cache_file)
        bp.trusted = True

    def load_bound(self, key: BlobKey, cache_file: Path) -> BlobPresence | None:
        """The presence of an idle blob as its sidecar records it (geometry and source
        token from the sidecar's header), or None unless the sidecar is intact, belongs
        to ``key`` and ``cache_file`` is bound to it. For trimming, which needs no
        source: it only ever clears bits."""
        try:
            sc = fmt.decode(self.sidecar_path(key).read_bytes())
            bound = os.getxattr(cache_file, BINDING_XATTR)
        except (OSError, PresenceCorrupt):
            return None
        if bound != sc.binding_id.hex().encode() or sc.key_hash != key.digest:
            return None
        geometry = ChunkGeometry(sc.blob_size, sc.chunk_size)
        if geometry.nchunks != sc.nchunks:
            return None
        bp = BlobPresence(
            key,
            geometry,
            sc.token,
            sc.binding_id,
            ChunkBitmap(sc.nchunks, sc.bitmap),
            trusted=True,
        )
        bp.saved_version = bp.version
        return bp

    def clear_chunks(self, bp: BlobPresence, first: int, count: int) -> None:
        """Forget chunks durably; only after this returns may their bytes go."""
        self.clear_runs(bp, [(first, count)])

    def clear_runs(self, bp: BlobPresence, runs: list[tuple[int, int]]) -> None:
        """Forget runs ``(first, count)`` of chunks durably, in one sidecar save."""
        with self._io_lock:
            with bp.lock:
                for first, count in runs:
                    bp.bitmap.clear_range(first, count)
                bp.version += 1
                version, bitmap = bp.version, bp.bitmap.to_bytes()
            self._save(bp, bitmap)
            with bp.lock:
                bp.saved_version = max(bp.saved_version, version)

    def remove(self, key: BlobKey) -> None:
        self.sidecar_path(key).unlink(missing_ok=True)

    def orphans(self, known: set[BlobKey]) -> list[Path]:
        keep = {self.sidecar_path(k).name for k in known}
        return [p for p in self.root.glob("*.presence") if p.name not in keep]

    def close(self) -> None:
        if self._fs_fd >= 0:
            os.close(self._fs_fd)
            self._fs_fd = -1

