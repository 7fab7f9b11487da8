"""The cache files of fanotify images: made, vouched for, marked, mounted, taken down.

An image of ``fanotify_image <volume>/<name> <mountpoint> [<blob> ...]`` is one blob
per file EROFS reads: the image itself and its extra blobs (``device=``). Each blob has
a cache file ``<dir>/fanotify/<volume>/<name>``, sparse, of the blob's size, and a
presence sidecar like an on-demand blob (same :class:`~cachefilesd_py.blobkey.BlobKey`,
so the same sidecar and the same ``source`` rules whichever frontend serves it).

Preparing a blob (:func:`prepare_blob`), in this order because of the kernel's rules
(``docs/protocol-fanotify.md``, "The traps"):

1. take the blob's use lease and open it in the engine: its source identity (size,
   ETag) and its presence, trusted only if the sidecar vouches for this very file;
2. open the file (created if missing) **before the mark**, with no pre-content event
   possible on it: a file the sidecar does not vouch for is emptied (truncated to 0:
   its bytes may be another version's), then sized to the blob with a hole; a trusted
   bitmap whose present chunks are holes in the file (punched behind our back) is
   cleared, because the fast path answers from the bitmap alone and would hand out
   zeros;
3. bind the sidecar to the file (durable sidecar first, then the file's xattr);
4. note the file's identity (device, inode) for the session, then **mark** it
   ``FAN_PRE_ACCESS``. From here on every read or write of it through a newly opened
   file waits for the daemon.

Then :func:`mount_image` mounts the image file with ``mount(2)`` (``kernel/mount.py``:
util-linux's ``mount`` would put a loop device in between, whose reads raise no
event), extra blobs by ``device=``: EROFS opens every file at mount time, after their
marks. A mount point that already holds a mount is unmounted first: such a mount was
made by a daemon whose group is gone, so it reads holes as zeros; if it is in use the
image is not served (an error the admin must see).

Taking down (:func:`unmount_image`): a plain ``umount`` (never lazy: a detached mount
would live on after the group, trap 1); EBUSY is returned to the caller, which keeps
serving and tries again.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import FanotifyImage
from cachefilesd_py.config.parse import IMAGE_NAME
from cachefilesd_py.engine.blob import Blob
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.kernel import fanotify, mount
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("fanotify")

#: the directory of fanotify cache files inside the cache directory
TREE_NAME = "fanotify"


@dataclass(eq=False)
class ServedBlob:
    """One marked cache file and the engine blob behind it."""

    key: BlobKey
    path: Path
    blob: Blob
    #: (st_dev, st_ino) of the cache file: how an event's fd is matched to it
    identity: tuple[int, int]
    marked: bool = False
    #: an ignore mark makes the kernel stop asking (every byte present)
    silenced: bool = False

    @property
    def size(self) -> int:
        return self.blob.size

    @property
    def origin(self) -> str:
        return self.blob.source.origin


@dataclass(eq=False)
class ServedImage:
    spec: FanotifyImage
    blobs: list[ServedBlob] = field(default_factory=list)
    mounted: bool = False

    @property
    def mountpoint(self) -> Path:
        return Path(self.spec.mountpoint)


def safe_name(*names: str) -> bool:
    """Whether every name could be a volume or blob of a ``fanotify_image`` line (the
    config parser's rule): one file name under ``<dir>/fanotify``, never a way out."""
    return all(IMAGE_NAME.fullmatch(n) for n in names)


def cache_path(cache_dir: Path, volume: str, name: str) -> Path:
    """``<dir>/fanotify/<volume>/<name>`` (both names checked by the config parser:
    no ``/``, no leading ``.``)."""
    return cache_dir / TREE_NAME / volume / name


def blob_keys(spec: FanotifyImage) -> list[BlobKey]:
    """The image's blobs, the image first, then its ``device=`` blobs in order."""
    return [BlobKey.named(spec.volume, n) for n in (spec.name, *spec.blobs)]


def prepare_blob(
    engine: Engine, cache_dir: Path, key: BlobKey, deadline: Deadline, *, adopt: bool = False
) -> ServedBlob:
    """Steps 1-3 of the module docstring; the caller registers the identity with the
    session and then calls :func:`mark`. Raises ``SourceError``/``OSError``; on error
    the use lease is given back and the blob released.

    ``adopt``: the file is marked and mounted already (a worker taking over from a dead
    one, the group kept alive by the supervisor): it is neither emptied nor resized —
    a truncate of a marked file raises a pre-content event nobody reads yet — and the
    blob must be the version the file holds (a trusted sidecar, the same size), else
    OSError (the image is then not served: its readers get EIO, never zeros)."""
    path = cache_path(cache_dir, key.volume.decode(), key.name.decode())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not engine.leases.acquire_use(key, timeout=deadline.remaining()):
        raise OSError(errno.EBUSY, f"{key}: its cache file is being trimmed")
    try:
        blob = engine.open_blob(key, path, deadline)
    except BaseException:
        engine.leases.release_use(key)
        raise
    try:
        identity = _adopt_file(engine, blob, path) if adopt else _ready_file(engine, blob, path)
        presence = blob.presence
        if presence is not None:
            engine.presence.bind(presence, path)
    except BaseException:
        engine.release(blob)
        engine.leases.release_use(key)
        raise
    return ServedBlob(key, path, blob, identity)


def _ready_file(engine: Engine, blob: Blob, path: Path) -> tuple[int, int]:
    presence = blob.presence
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    with OwnedFd(os.open(path, flags, 0o600)) as fd:
        st = os.fstat(fd.fileno())
        trusted = presence is not None and presence.trusted
        if trusted and presence is not None:
            why = _contradiction(fd.fileno(), blob, st.st_size)
            if why is not None:
                log.warning("presence.contradicted", blob=str(blob.key), file=str(path), why=why)
                engine.presence.clear_runs(presence, [(0, blob.geometry.nchunks)])
                trusted = False
        if not trusted and st.st_size:
            os.ftruncate(fd.fileno(), 0)  # another version's bytes, maybe: start empty
        os.ftruncate(fd.fileno(), blob.size)
        st = os.fstat(fd.fileno())
        return st.st_dev, st.st_ino


def _adopt_file(engine: Engine, blob: Blob, path: Path) -> tuple[int, int]:
    """The marked file as it is: opened read-only (an open raises no pre-content
    event; only reads and writes do), checked, never written."""
    presence = blob.presence
    if presence is None or not presence.trusted:
        raise OSError(
            errno.ESTALE, f"{blob.key}: the sidecar does not vouch for the mounted file"
        )
    with OwnedFd(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as fd:
        st = os.fstat(fd.fileno())
        if st.st_size != blob.size:
            raise OSError(
                errno.ESTALE,
                f"{blob.key}: the mounted file has {st.st_size} bytes, the blob {blob.size}",
            )
        why = _contradiction(fd.fileno(), blob, st.st_size)
        if why is not None:  # bits lost are only refetched: the bytes stay as they are
            log.warning("presence.contradicted", blob=str(blob.key), file=str(path), why=why)
            engine.presence.clear_runs(presence, [(0, blob.geometry.nchunks)])
        return st.st_dev, st.st_ino


def _contradiction(fd: int, blob: Blob, file_size: int) -> str | None:
    """Why a trusted bitmap does not fit the file, or None: the file has the wrong size,
    or a chunk the bitmap calls present is (partly) a hole."""
    if file_size != blob.size:
        return f"file size {file_size}, blob size {blob.size}"
    presence = blob.presence
    assert presence is not None
    geo = blob.geometry
    with presence.lock:
        runs = presence.bitmap.present_runs(0, geo.nchunks)
    for first, count in runs:
        start = first * geo.chunk_size
        end = min(blob.size, (first + count) * geo.chunk_size)
        try:
            data = os.lseek(fd, start, os.SEEK_DATA)
            hole = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return f"chunks {first}..{first + count - 1} are a hole"
            raise
        if data != start or hole < end:
            return f"chunks {first}..{first + count - 1} are partly a hole"
    return None


def mark(group_fd: int, served: ServedBlob) -> None:
    """Add the ``FAN_PRE_ACCESS`` mark (step 4)."""
    fanotify.mark_pre_access(group_fd, served.path)
    served.marked = True


def fully_present(served: ServedBlob) -> bool:
    presence = served.blob.presence
    if presence is None:
        return False
    with presence.lock:
        return presence.bitmap.count() == served.blob.geometry.nchunks


def silence(group_fd: int, served: ServedBlob) -> bool:
    """Once every chunk is present, add an *ignore* mark for ``FAN_PRE_ACCESS``: the
    kernel stops raising events for the file (measured: 0 events afterwards, also for
    files opened before, docs/protocol-fanotify.md, trap 3). Reads then never wait for
    the daemon. Only for a file whose every byte is present: with the ignore mark a
    hole would read as zeros; no hole is punched in a served file (``space.py``). True
    if the mark was added now."""
    if served.silenced or not served.marked or not fully_present(served):
        return False
    fanotify.ignore_pre_access(group_fd, served.path)
    served.silenced = True
    log.info("fanotify.silenced", blob=str(served.key), note="every chunk present")
    return True


def unmark(group_fd: int, served: ServedBlob) -> None:
    if served.marked:
        try:
            fanotify.unmark_pre_access(group_fd, served.path)
        except OSError as exc:
            log.warning("fanotify.unmark_failed", blob=str(served.key), error=str(exc))
        served.marked = False


def clear_stale_mount(mountpoint: Path) -> None:
    """Make sure nothing is mounted on ``mountpoint`` (created if missing). A mount
    there now was made by a daemon whose group is gone: it reads holes as zeros, so it
    is unmounted; EBUSY (in use) is raised."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    while os.path.ismount(mountpoint):
        log.warning("fanotify.stale_mount", mountpoint=str(mountpoint))
        mount.umount(mountpoint)


def mount_image(image: ServedImage) -> None:
    """Mount the image's file on its mount point, extra blobs by ``device=``, read-only.
    Every blob must be marked already."""
    assert all(b.marked for b in image.blobs)
    primary, *extra = image.blobs
    mount.mount_file(primary.path, image.mountpoint, devices=[b.path for b in extra])
    image.mounted = True


def unmount_image(image: ServedImage) -> bool:
    """Unmount (never lazily); False if the mount is in use (EBUSY)."""
    if not image.mounted:
        return True
    try:
        mount.umount(image.mountpoint)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        if exc.errno != errno.EINVAL:  # EINVAL: not a mount point any more
            raise
    image.mounted = False
    return True
