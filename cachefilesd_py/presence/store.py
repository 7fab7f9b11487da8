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

A checkpoint saves each sidecar on its own: one that cannot be saved (a full disk, a
directory squatting on its name, a source token too long for the format) is logged as
``presence.save_failed`` and counted in ``save_failures``; its blob stays dirty (its
bits are not durable, the next checkpoint tries again) and the others are saved.

Reading a sidecar never trusts the file (``_read_sidecar``): it is opened with
``O_NONBLOCK|O_NOFOLLOW`` (a FIFO cannot block the open, a symlink is refused, whatever
it points to), it must be a regular file (``fstat``), and it is read only up to the
length its head claims, after checking that claim against the largest sidecar the
blob's size allows (in the smallest chunks) and against the file's size. Anything else
is a miss, and the next save replaces it: ``rename(2)`` replaces the name, whatever
the name was.

Lock order: ``BlobPresence.lock`` is a leaf lock (nothing else is taken while holding
it); ``PresenceStore._io_lock`` serialises sidecar writes and may be held while taking
a ``BlobPresence.lock`` briefly for a snapshot.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.errors import PresenceCorrupt
from cachefilesd_py.kernel.durable import (
    crashpoint,
    fsync_dir,
    fsync_path,
    remove_stale_temps,
    save_file_atomically,
    syncfs,
)
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.presence import format as fmt
from cachefilesd_py.presence.bitmap import ChunkBitmap, ChunkGeometry

log = structlog.get_logger("presence")

#: the smallest chunk size a configuration may choose (``config/parse.py``: 4K to 64M)
SMALLEST_CHUNK = 4096
#: :meth:`PresenceStore.load_bound` allows a sidecar of a blob this large whatever the
#: cache file's size says (a file the kernel has not grown yet)
TRIM_BOUND_FLOOR = 64 << 30

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
    #: the last save of this blob's sidecar failed (warned once, until one succeeds)
    save_failing: bool = False

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
        #: sidecars a checkpoint or bind could not save (each logged)
        self.save_failures = 0
        remove_stale_temps(self.root)

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
            data = _read_sidecar(path, fmt.largest_length(_most_chunks(blob_size)))
            if data is None:
                return "no sidecar"
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

    def _save_snapshot(self, bp: BlobPresence, version: int, bitmap: bytes) -> Exception | None:
        """Save one snapshot whose data is durable; the error if it could not be saved
        (logged and counted: the blob stays dirty, its bits not durable)."""
        try:
            self._save(bp, bitmap)
        except (OSError, ValueError) as exc:
            self.save_failures += 1
            # a lasting failure (a directory on the name, a token the format cannot
            # hold) would otherwise warn at every checkpoint
            report = log.debug if bp.save_failing else log.warning
            report(
                "presence.save_failed",
                blob=str(bp.key),
                sidecar=self.sidecar_path(bp.key).name,
                error=str(exc),
                failures=self.save_failures,
            )
            bp.save_failing = True
            return exc
        with bp.lock:
            bp.saved_version = max(bp.saved_version, version)
        if bp.save_failing:
            bp.save_failing = False
            log.info("presence.save_recovered", blob=str(bp.key))
        return None

    def _snapshot_durably(
        self, presences: list[BlobPresence], force: bool
    ) -> list[tuple[BlobPresence, int, bytes]]:
        """Snapshots of the (dirty) bitmaps, then a ``syncfs``: the data of every bit
        in them is durable when this returns. Call with ``_io_lock`` held."""
        snaps = [(bp, *bp.snapshot()) for bp in presences if force or bp.dirty]
        if snaps:
            crashpoint("checkpoint.before_syncfs")
            syncfs(self._fs_fd)
            crashpoint("checkpoint.after_syncfs")
        return snaps

    def checkpoint(self, presences: list[BlobPresence], *, force: bool = False) -> int:
        """Persist what is durable of each dirty blob; returns how many were saved.

        Raises OSError only when ``syncfs`` fails (then nothing is durable and nothing
        is saved); a sidecar that cannot be saved is logged and skipped."""
        with self._io_lock:
            snaps = self._snapshot_durably(presences, force)
            return sum(self._save_snapshot(*snap) is None for snap in snaps)

    def bind(self, bp: BlobPresence, cache_file: Path) -> None:
        """The kernel made ``cache_file`` reachable: make the sidecar durable, then
        point the file's xattr at it. Raises OSError (and binds nothing) when the
        sidecar cannot be saved."""
        with self._io_lock:
            (snap,) = self._snapshot_durably([bp], force=True)
            error = self._save_snapshot(*snap)
        if error is not None:
            code = error.errno if isinstance(error, OSError) and error.errno else errno.EIO
            raise OSError(code, f"sidecar not saved, cache file left unbound: {error}")
        crashpoint("bind.before_xattr")
        os.setxattr(cache_file, BINDING_XATTR, bp.binding_id.hex().encode())
        fsync_path(cache_file)
        bp.trusted = True

    def load_bound(self, key: BlobKey, cache_file: Path) -> BlobPresence | None:
        """The presence of an idle blob as its sidecar records it (geometry and source
        token from the sidecar's header), or None unless the sidecar is intact, belongs
        to ``key`` and ``cache_file`` is bound to it. For trimming, which needs no
        source: it only ever clears bits.

        With no geometry from a source, the sidecar's claim is bounded by the cache
        file: its size (at least :data:`TRIM_BOUND_FLOOR`) in the smallest chunk the
        configuration allows, so a hostile head cannot make this read more than that
        needs (2 MiB of bitmap for a file of up to 64 GiB)."""
        try:
            span = max(os.stat(cache_file).st_size, TRIM_BOUND_FLOOR)
            limit = fmt.largest_length(_most_chunks(span))
            data = _read_sidecar(self.sidecar_path(key), limit)
            if data is None:
                return None
            sc = fmt.decode(data)
            bound = os.getxattr(cache_file, BINDING_XATTR)
        except (OSError, PresenceCorrupt):
            return None
        if bound != sc.binding_id.hex().encode() or sc.key_hash != key.digest:
            return None
        geometry = ChunkGeometry(sc.blob_size, sc.chunk_size)  # decode checked it
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
        """Forget runs ``(first, count)`` of chunks durably, in one sidecar save.

        When the sidecar cannot be rewritten (trims run when space is short: ENOSPC is
        the likely failure), every bit is forgotten instead: the sidecar is unlinked
        durably, which needs no space, and the blob is a miss from then on. Raises
        OSError only if even that fails; then the bytes must stay."""
        with self._io_lock:
            with bp.lock:
                for first, count in runs:
                    bp.bitmap.clear_range(first, count)
                bp.version += 1
                version, bitmap = bp.version, bp.bitmap.to_bytes()
            if self._save_snapshot(bp, version, bitmap) is None:
                return
            path = self.sidecar_path(bp.key)
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
            with bp.lock:
                bp.bitmap.clear_range(0, bp.bitmap.nchunks)
                bp.trusted = False
                bp.saved_version = max(bp.saved_version, version)
            log.warning("presence.forgotten", blob=str(bp.key), reason="sidecar not saved")

    def remove(self, key: BlobKey) -> None:
        """Drop ``key``'s sidecar (its cache file is gone). Never raises: it runs inside
        a cull pass, and what cannot be unlinked (a directory on the name) is a miss
        at every load anyway."""
        path = self.sidecar_path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("presence.remove_failed", sidecar=path.name, error=exc.strerror)

    def orphans(self, known: set[BlobKey]) -> list[Path]:
        """Sidecars of no known blob, for the sweep to unlink: files and symlinks only
        (a directory on a sidecar's name cannot be unlinked; it is left alone)."""
        keep = {self.sidecar_path(k).name for k in known}
        return [
            Path(e.path)
            for e in os.scandir(self.root)
            if e.name.endswith(".presence")
            and e.name not in keep
            and not e.is_dir(follow_symlinks=False)
        ]

    def close(self) -> None:
        if self._fs_fd >= 0:
            os.close(self._fs_fd)
            self._fs_fd = -1


def _most_chunks(blob_size: int) -> int:
    """The most chunks a sidecar of a ``blob_size``-byte blob can count: a trusted
    sidecar keeps its own chunk size (:meth:`PresenceStore.load`), never below
    :data:`SMALLEST_CHUNK`."""
    return min(fmt.MAX_CHUNKS, -(-blob_size // SMALLEST_CHUNK))


def _read_sidecar(path: Path, limit: int) -> bytes | None:
    """The bytes of the sidecar at ``path`` (None if there is none), read without
    trusting the file: never blocking, never through a symlink, only a regular file,
    at most ``limit`` bytes and only as many as its head claims. PresenceCorrupt
    otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = OwnedFd(os.open(path, flags))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PresenceCorrupt("sidecar is a symbolic link") from exc
        raise PresenceCorrupt(f"sidecar unreadable: {exc.strerror}") from exc
    with fd:
        try:
            st = os.fstat(fd.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PresenceCorrupt("sidecar is not a regular file")
            length = fmt.claimed_length(_pread_upto(fd.fileno(), fmt.HEAD.size))
            if length > limit:
                raise PresenceCorrupt(
                    f"sidecar claims {length} bytes, more than the blob's {limit} allow"
                )
            if st.st_size != length:
                raise PresenceCorrupt("sidecar length does not match its chunk count")
            return _pread_upto(fd.fileno(), length + 1)  # decode sees a file that grew
        except OSError as exc:
            raise PresenceCorrupt(f"sidecar unreadable: {exc.strerror}") from exc


def _pread_upto(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from the start of ``fd`` (fewer only at end of file)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = os.pread(fd, min(size - got, 1 << 20), got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)
