"""``cachefilesctl pin``: mark blobs pinned (``space/pins.py``), then preload them.

What a pin names (``docs/offline.md``, "Pins"):

- **a blob** (``path`` empty): that blob, every chunk;
- **an image or a path in it** (``path`` given, ``/`` for the whole image): the blob
  named is the image's primary blob (an EROFS image is the blob its ``fsid`` names);
  its layout is read (``erofs/layout.py``) and the pin covers the primary blob and
  every extra blob of its device table that the path needs. The preload goes in two
  phases: first the **metadata** of the whole image (superblock, device table, every
  inode, directory, symlink target and chunk table: what ``ls -lR`` and ``stat`` need),
  so that the image is browsable offline before any data has arrived; then only the
  **data** behind the chosen file or directory (for ``/``: all of it). A pin keeps
  its blobs whole (the culler works per blob), but a path pin preloads only part.

The layout is parsed from bytes read straight from the primary blob's source (through
a small block cache): an open blob's cache file may not be linked yet and the
on-demand anonymous fd cannot be read. So the metadata is read once to parse it and
fetched once more into the cache by the preload — a few hundred KiB for a large image.

Every byte that reaches the cache goes through ``Engine.ensure``, the fill path of a
READ: presence bits, counters, source selection, retries and the in-flight table are
the same. Where the bytes are written, per blob:

- a blob a kernel object has open: through that object's anonymous fd (the sink is
  looked up again at every step, so a CLOSE meanwhile stops the preload with an
  error, never a write elsewhere);
- a blob whose cache file is in the tree but that no kernel object has open: opened
  by the engine under a use lease (no trim runs meanwhile; a kernel OPEN meanwhile
  shares the same blob and the same file) and written into its cache file, whose
  sidecar is bound to the file at the end, as a kernel release would;
- a blob the kernel never opened has no cache file (only the kernel creates one, at
  its OPEN, with its coherency xattr): it is pinned, not preloaded, and the reply says
  so. ``pin`` again after its first use preloads it; present chunks cost nothing.

In fanotify mode (``daemon/fanotify_control.py``) the same plan, pins and progress; what
differs is where the bytes go and how an image's extra blobs are named:

- a blob a mount serves is filled by the mode's ``fill`` (``ServingState.fill``): a
  read through a fresh fd of its marked cache file, whose pre-content events the
  daemon answers like a mount's reads (fill through the event's fd, presence bits
  after the data). Writing the marked file directly would itself raise events;
- a blob of ``<dir>/fanotify`` no mount serves (no mark on it) is written as an idle
  blob above, into the file ``ServingState.cache_file`` names;
- the image's device table is matched to the served image's blobs by position
  (``ServingState.devices_of``: the frontend mounts them as ``device=`` in that
  order), not by the tags mkfs wrote.

The pins are taken (all or none, judged by the cap) before anything is fetched, so a
preload cut short still leaves them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.control.schema import ControlError, ErrorCode
from cachefilesd_py.engine.blob import Blob
from cachefilesd_py.engine.fill import Sink
from cachefilesd_py.erofs.format import ErofsError
from cachefilesd_py.erofs.layout import ErofsImage
from cachefilesd_py.erofs.ranges import Needs
from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.space.stats import SpaceSnapshot

if TYPE_CHECKING:
    from cachefilesd_py.daemon.control import ServingState

log = structlog.get_logger("control")

#: bytes a preload asks for per step (one progress line each)
PRELOAD_STEP = 4 << 20

Progress = Callable[[Mapping[str, Any]], None]
#: (offset, length) ranges of one blob; None: the whole blob
Ranges = list[tuple[int, int]] | None


@dataclass
class Target:
    """One blob a pin covers: its name as the control API spells it, its key, size."""

    name: str
    key: BlobKey
    size: int


@dataclass
class Writer:
    """Where a target's bytes go during a preload: ``fill(offset, length)`` makes that
    range of ``blob`` present (raises ``ControlError``, ``SourceError`` or ``OSError``)."""

    blob: Blob
    fill: Callable[[int, int], None]
    via: str


def parse_key(name: str) -> BlobKey:
    """The key ``blobs`` prints as ``<volume key>/<cookie key>`` (split at the first
    ``/``: EROFS volume keys hold none)."""
    volume, sep, cookie = name.partition("/")
    if not sep or not volume or not cookie:
        raise ControlError(ErrorCode.BAD_ARGS, f"{name!r} is not <volume key>/<cookie key>")
    return BlobKey(volume.encode(), cookie.encode())


def cache_file_of(cache_dir: Path, key: BlobKey) -> Path | None:
    """Where cachefiles keeps ``key``'s file (None for keys it cannot store)."""
    try:
        return key.cache_path(cache_dir)
    except ValueError:
        return None


def blob_ranges(needs: Needs, device: int, size: int, chunk: int) -> Ranges:
    """``needs``' ranges of one blob, rounded out to its chunks and clipped to it."""
    if device in needs.whole:
        return None
    out = []
    for start, end in needs.for_device(device).aligned(chunk):
        end = min(end, size)
        if start < end:
            out.append((start, end - start))
    return out


class Pinner:
    """Pins and preloads for the control socket (see the module docstring)."""

    def __init__(self, state: ServingState, describe: Callable[[Blob], dict[str, Any]]) -> None:
        self.state = state
        self.describe = describe

    @property
    def _timeout(self) -> float:
        return self.state.config().fetch_timeout

    def _open_blob(self, name: str) -> Blob | None:
        assert self.state.engine is not None
        return next((b for b in self.state.engine.blobs() if str(b.key) == name), None)

    def _target(self, key: BlobKey) -> Target:
        name = str(key)
        blob = self._open_blob(name)
        if blob is not None:
            return Target(name, key, blob.size)
        assert self.state.engine is not None
        try:
            size = self.state.engine.source_for(key).identity(Deadline.after(self._timeout)).size
        except SourceError as exc:
            raise ControlError(ErrorCode.FAILED, f"{name}: {exc}") from None
        return Target(name, key, size)

    # -- what a pin covers -------------------------------------------------------------

    def plan(
        self, name: str, path: str
    ) -> tuple[list[Target], list[tuple[str, dict[str, Ranges]]]]:
        """The blobs a pin covers and its preload phases (``(phase, {blob: ranges})``)."""
        primary = self._target(parse_key(name))
        if not path:
            return [primary], [("data", {primary.name: None})]
        image = self._read_layout(primary)
        targets = {0: primary}
        devices = self.state.devices_of(primary.key)
        if devices is not None:  # fanotify: the served image's blobs, as device= orders them
            for index, key in enumerate(devices[1:], start=1):
                targets[index] = self._target(key)
        else:
            for slot in image.devices:
                if slot.tag:  # the extra blob's cookie; without one, the mount's device=
                    key = BlobKey(primary.key.volume_key, slot.tag.encode())
                    targets[slot.index] = self._target(key)
        image.device_sizes = {d: t.size for d, t in targets.items() if d}
        try:
            meta, data = image.metadata(), image.needs(path)
        except FileNotFoundError as exc:
            raise ControlError(ErrorCode.NOT_FOUND, f"{name}: {exc}") from None
        except ErofsError as exc:
            raise ControlError(
                ErrorCode.FAILED, f"{name}: not a readable EROFS image: {exc}"
            ) from None
        chunk = self._chunk(primary.key)
        phases: list[tuple[str, dict[str, Ranges]]] = []
        covered: list[Target] = []
        unnamed = {d for n in (meta, data) for d in (*n.ranges, *n.whole)} - set(targets)
        if unnamed:
            # the kernel names such a blob by the mount's device= option, which the
            # image does not record: the operator pins it by name
            log.warning("pins.unnamed_devices", blob=name, devices=sorted(unnamed))
        for phase, needs in (("metadata", meta), ("data", data)):
            per_blob = {}
            for device, t in targets.items():
                if device in needs.whole or needs.for_device(device):
                    per_blob[t.name] = blob_ranges(needs, device, t.size, chunk)
                    if t not in covered:
                        covered.append(t)
            phases.append((phase, per_blob))
        return covered, phases

    def _chunk(self, key: BlobKey) -> int:
        assert self.state.engine is not None
        blob = self._open_blob(str(key))
        return blob.chunk_size if blob is not None else self.state.engine.chunk_size_for(key)

    def _read_layout(self, primary: Target) -> ErofsImage:
        assert self.state.engine is not None
        try:
            source = self.state.engine.source_for(primary.key)
        except SourceError as exc:
            raise ControlError(ErrorCode.FAILED, f"{primary.name}: {exc}") from None

        def read(offset: int, length: int) -> bytes:
            buf = bytearray(length)
            source.fetch_into(offset, memoryview(buf), Deadline.after(self._timeout))
            return bytes(buf)

        try:
            return ErofsImage(read, primary.size)
        except SourceError as exc:
            raise ControlError(ErrorCode.FAILED, f"{primary.name}: {exc}") from None
        except ErofsError as exc:
            raise ControlError(
                ErrorCode.FAILED, f"{primary.name}: not a readable EROFS image: {exc}"
            ) from None

    # -- pinning -----------------------------------------------------------------------

    def take_pins(self, targets: list[Target]) -> None:
        """Record the pins, all or none, or refuse them when the pinned total would
        pass the cap (``space/pins.py``)."""
        pins = self.state.pins
        assert pins is not None
        cfg = self.state.config()
        if cfg.cache_max_bytes is not None:
            cache_bytes = cfg.cache_max_bytes
        else:
            snap = SpaceSnapshot.of(str(self.state.cache_dir))
            cache_bytes = snap.blocks * snap.block_size
        names = ", ".join(t.name for t in targets)
        sizes = {t.name: t.size for t in targets}
        try:
            verdict = pins.pin_all(sizes, cache_bytes, cfg.pin_max_share)
        except OSError as exc:
            raise ControlError(ErrorCode.FAILED, f"{names}: pin not saved: {exc}") from None
        if not verdict.allowed:
            log.warning(
                "pins.refused", blobs=list(sizes), size=sum(sizes.values()), reason=verdict.message
            )
            raise ControlError(ErrorCode.FAILED, f"{names}: refused: {verdict.message}")
        if verdict.warn:
            log.warning(
                "pins.near_cap", blobs=list(sizes), total=verdict.total_after, cap=verdict.cap
            )

    def pin(self, name: str, path: str, progress: Progress) -> dict[str, Any]:
        began = time.monotonic()
        targets, phases = self.plan(name, path)
        self.take_pins(targets)
        with contextlib.ExitStack() as stack:
            writers = {t.name: self._writer(stack, t) for t in targets}
            steps = [
                (phase, blob_name, off, n)
                for phase, per_blob in phases
                for blob_name, ranges in per_blob.items()
                if writers[blob_name] is not None
                for off, n in _steps(ranges, writers[blob_name].blob.size)  # type: ignore[union-attr]
            ]
            total = sum(n for *_x, n in steps)
            done = 0
            progress({"phase": phases[0][0], "done": 0, "total": total})
            for phase, blob_name, off, n in steps:
                writer = writers[blob_name]
                assert writer is not None
                self._ensure(writer, off, n)
                done += n
                progress({"phase": phase, "done": done, "total": total})
            blobs = [self._blob_reply(t, writers[t.name]) for t in targets]
        reply: dict[str, Any] = {
            "blob": name,
            "path": path or None,
            "preloaded": all(b["preloaded"] for b in blobs),
            "bytes": total,
            "seconds": round(time.monotonic() - began, 3),
            "blobs": blobs,
        }
        if len(targets) == 1 and not path:  # the plain blob pin's fields, flat
            reply |= {k: v for k, v in blobs[0].items() if k != "blob"}
        log.info(
            "control.pinned",
            blob=name,
            path=path or None,
            blobs=[b["blob"] for b in blobs],
            preloaded=reply["preloaded"],
            bytes=total,
        )
        return reply

    def _ensure(self, writer: Writer, offset: int, length: int) -> None:
        try:
            writer.fill(offset, length)
        except (SourceError, OSError) as exc:
            raise ControlError(
                ErrorCode.FAILED,
                f"{writer.blob.key}: pinned, preload stopped at {offset}: {exc}; "
                "pin it again to resume",
            ) from None

    def _fill_through(
        self, blob: Blob, sink: Callable[[], Sink | None]
    ) -> Callable[[int, int], None]:
        """A writer's fill: ``Engine.ensure`` into the sink looked up at every step."""

        def fill(offset: int, length: int) -> None:
            assert self.state.engine is not None
            now = sink()
            if now is None:
                raise ControlError(
                    ErrorCode.FAILED,
                    f"{blob.key}: pinned, preload stopped at {offset}: the kernel closed the "
                    "object; pin it again to resume",
                )
            self.state.engine.ensure(blob, offset, length, now, Deadline.after(self._timeout))

        return fill

    def cache_file(self, key: BlobKey) -> Path | None:
        """Where ``key``'s cache file is in this mode (None: a key it cannot store)."""
        if self.state.cache_file is not None:
            return self.state.cache_file(key)
        return cache_file_of(self.state.cache_dir, key)

    def _writer(self, stack: contextlib.ExitStack, target: Target) -> Writer | None:
        """Where ``target``'s bytes go (None: nowhere yet; see the module docstring)."""
        open_blob = self._open_blob(target.name)
        sink_for, mode_fill = self.state.sink_for, self.state.fill
        if open_blob is not None and mode_fill is not None:
            served = open_blob
            return Writer(served, lambda off, n: mode_fill(served, off, n), "mount's reader")
        if open_blob is not None and sink_for is not None and sink_for(open_blob) is not None:
            kernel_blob = open_blob
            return Writer(
                kernel_blob,
                self._fill_through(kernel_blob, lambda: sink_for(kernel_blob)),
                "kernel object",
            )
        cache_file = self.cache_file(target.key)
        if cache_file is None or not cache_file.exists():
            return None
        blob = stack.enter_context(self.idle_blob(target.key, cache_file, bind=True))
        from cachefilesd_py.frontends.fanotify.driver import EventFdSink
        from cachefilesd_py.kernel.fd import OwnedFd

        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = stack.enter_context(OwnedFd(os.open(cache_file, flags)))
        file_sink = EventFdSink(fd, blob.size)
        return Writer(blob, self._fill_through(blob, lambda: file_sink), "cache file")

    @contextlib.contextmanager
    def idle_blob(self, key: BlobKey, cache_file: Path, *, bind: bool) -> Iterator[Blob]:
        """A blob of the cache tree no kernel object has open, opened by the engine
        under a use lease (no trim runs meanwhile, ``engine/leases.py``) and released
        after; ``bind``: its sidecar is bound to ``cache_file`` then, as the kernel's
        release of an object does."""
        engine = self.state.engine
        assert engine is not None
        name = str(key)
        if not engine.leases.acquire_use(key, timeout=self._timeout):
            raise ControlError(ErrorCode.BUSY, f"{name}: being trimmed; try again")
        try:
            try:
                blob = engine.open_blob(key, cache_file, Deadline.after(self._timeout))
            except SourceError as exc:
                raise ControlError(ErrorCode.FAILED, f"{name}: {exc}") from None
            try:
                yield blob
            finally:
                engine.release(blob, committed=(lambda: cache_file) if bind else None)
        finally:
            engine.leases.release_use(key)

    def _blob_reply(self, target: Target, writer: Writer | None) -> dict[str, Any]:
        if writer is None:
            note = (
                "pinned; no cache file yet (the daemon makes it when an image that has "
                "the blob is served): pin it again then to preload it"
                if self.state.fill is not None
                else "pinned; no cache file yet (the kernel creates it at its first "
                "OPEN of the blob): pin it again once it was opened to preload it"
            )
            return {
                "blob": target.name,
                "size": target.size,
                "preloaded": False,
                "note": note,
            }
        return {
            "blob": target.name,
            "size": target.size,
            "preloaded": True,
            "via": writer.via,
            **{k: v for k, v in self.describe(writer.blob).items() if k.startswith("present")},
        }


def _steps(ranges: Ranges, size: int) -> Iterator[tuple[int, int]]:
    """``ranges`` (None: the whole blob of ``size`` bytes) cut into preload steps."""
    for off, n in [(0, size)] if ranges is None else ranges:
        end = min(size, off + n)
        while off < end:
            step = min(PRELOAD_STEP, end - off)
            yield off, step
            off += step
