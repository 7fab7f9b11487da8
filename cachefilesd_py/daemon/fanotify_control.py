"""The control socket and the metrics in fanotify mode (docs/control.md, "fanotify mode").

The same schema, server and handlers as on-demand and classic mode
(``daemon/control.py``), read from the fanotify frontend (``frontends/fanotify``):

- ``status``: mode ``fanotify``, the images served with their mount points and blobs,
  and the configured images that could not be served, with why;
- ``blobs``/``show``/``verify``: the engine's open blobs are the served ones (each
  image file and its ``device=`` blobs), each named with its image and mount point;
  their cache files are ``<dir>/fanotify/<volume>/<name>``;
- ``stats``/``metrics``: the driver's counters (events, answers by path, fills) and
  its two answer-time histograms (range present, range filled) next to the engine's;
- ``prefetch``: the range is read through a fresh fd of the cache file
  (``FanotifyFrontend.prefetch``): the kernel raises pre-content events for that read
  and the frontend's reader answers them as it answers a mount's reads — a fill
  through the event's fd, presence bits after the data.
  A blob no mount serves cannot be prefetched (no reader would answer): refused;
- ``cull_plan``/``cull``: a pass of the fanotify culler (``frontends/fanotify/space.py``):
  a blob a mount reads is in use, never culled nor trimmed;
- ``pin``/``unpin``/``pins``: the same pin store, cap and plan as on-demand mode
  (``daemon/pinning.py``, ``space/pins.py``); the culler holds the pins. A pin's
  preload fills a served blob as ``prefetch`` does (metadata first, then the data
  behind the path); an image's extra blobs are its ``device=`` blobs in order. A blob
  of ``<dir>/fanotify`` no mount serves is written into its (unmarked) cache file.
  ``cachefilesctl pin /path/on/mount`` finds the image by its mount point in
  ``status`` (``control/live.py``): a file-backed EROFS mount names no blob;
- ``credentials reload``: as in on-demand mode (``Daemon.reload_credentials``);
- ``reload``: as SIGHUP (``Daemon.reload_report``): ``source`` rules, headers, retries,
  pins, caps applied; ``fanotify_image`` lines and the rest named as needing a restart.

A worker binds the socket when it starts serving and closes it when it stops; a worker
that replaces a dead one unlinks the stale socket and binds it again
(``daemon/control_server.py``), exactly as on-demand workers do.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import FanotifyImage
from cachefilesd_py.control.schema import ControlError, ErrorCode
from cachefilesd_py.daemon.control import (
    ControlService,
    ServingState,
    cli_pins,
    core_counts,
    credentials_reload_of,
    engine_histograms,
    pass_report,
    reload_of,
    start_control,
)
from cachefilesd_py.engine.blob import Blob
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.frontends.fanotify import images as img
from cachefilesd_py.frontends.fanotify.service import FanotifyFrontend
from cachefilesd_py.space.pins import PinStore

log = structlog.get_logger("control")


def fanotify_figures(frontend: FanotifyFrontend, engine: Engine) -> dict[str, object]:
    """The fanotify stack's counters and latency percentiles, flat (the ``stats`` line,
    ``cachefilesctl stats`` and the metrics' plain counters)."""
    space: dict[str, object] = {}
    if frontend.culler is not None:
        t = frontend.culler.totals
        space = {"culled": t.culled, "trimmed": t.trimmed, "cull_freed": t.freed_bytes}
    return {
        **frontend.stats_fields(),
        **vars(engine.filler.stats),
        **engine.filler.fetch_times.summary_ms("fetch"),
        **engine.filler.write_times.summary_ms("write"),
        **engine.checkpoint_times.summary_ms("checkpoint"),
        **engine.checkpoint_fields(),
        **space,
    }


def fanotify_state(
    daemon: Any,
    frontend: FanotifyFrontend,
    engine: Engine,
    factory: Any,
    collect: Callable[[], dict[str, object]],
    failed: Sequence[tuple[FanotifyImage, str]] = (),
    pins: PinStore | None = None,
) -> ServingState:
    """What the handlers read in fanotify mode (``daemon`` is ``daemon/app.py``'s
    ``Daemon``: its configuration, cache directory and ``reload_report``). ``pins``:
    the store the culler holds already (``run_fanotify`` makes it before the first
    pass); None: made here and handed to the culler."""
    cache_dir: Path = daemon.cache_dir
    if pins is None:
        pins = cli_pins(cache_dir, frontend.culler)

    def image_of(blob: Blob) -> img.ServedImage | None:
        for image in frontend.images:
            if any(b.blob is blob for b in image.blobs):
                return image
        return None

    def more_status() -> dict[str, Any]:
        return {
            "images": [
                {
                    "image": f"{i.spec.volume}/{i.spec.name}",
                    "mountpoint": i.spec.mountpoint,
                    "mounted": i.mounted,
                    "blobs": [str(b.key) for b in i.blobs],
                }
                for i in frontend.images
            ],
            "images_failed": [
                {"image": f"{s.volume}/{s.name}", "mountpoint": s.mountpoint, "error": why}
                for s, why in failed
            ],
        }

    def more_blob(blob: Blob) -> dict[str, Any]:
        image = image_of(blob)
        served = frontend.served().get(blob.key)
        return {
            "image": f"{image.spec.volume}/{image.spec.name}" if image else None,
            "mountpoint": image.spec.mountpoint if image else None,
            # a mount reads it: never culled nor trimmed (frontends/fanotify/space.py)
            "in_use": bool(image is not None and image.mounted),
            "silenced": bool(served is not None and served.silenced),
        }

    def fill(blob: Blob, offset: int, length: int) -> None:
        try:
            frontend.prefetch(blob.key, offset, length)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise ControlError(
                    ErrorCode.UNAVAILABLE,
                    f"{blob.key}: no mount of fanotify mode reads it, so no reader would "
                    "answer its events; prefetch serves mounted images only",
                ) from None
            raise

    def cache_file(key: BlobKey) -> Path | None:
        volume, name = key.volume.decode(errors="replace"), key.name.decode(errors="replace")
        if not key.volume_key.startswith(b"erofs,") or not img.safe_name(volume, name):
            return None  # not a name the fanotify tree can hold
        return img.cache_path(cache_dir, volume, name)

    def devices_of(key: BlobKey) -> list[BlobKey] | None:
        for image in frontend.images:
            if image.blobs and image.blobs[0].key == key:
                return [b.key for b in image.blobs]
        return None

    culler = frontend.culler
    driver = frontend.driver
    histograms: dict[str, tuple[Any, str]] = {}
    if driver is not None:
        histograms = {
            "fanotify_present": (
                driver.present_times,
                "fanotify event answer time, range present (from the bitmap)",
            ),
            "fanotify_fill": (
                driver.fill_times,
                "fanotify event answer time, range missing (filled, then allowed)",
            ),
        }
    return ServingState(
        mode="fanotify",
        cache_dir=cache_dir,
        config=lambda: daemon.config,
        collect=collect,
        engine=engine,
        objects=lambda: len(frontend.served()),
        reload=reload_of(daemon),
        credentials_reload=credentials_reload_of(daemon),
        cull_plan=(lambda: pass_report(culler.cull_pass(dry_run=True))) if culler else None,
        cull_now=(lambda: pass_report(culler.cull_pass())) if culler else None,
        fill=fill,
        cache_file=cache_file,
        more_status=more_status,
        more_blob=more_blob,
        histograms=histograms | engine_histograms(engine),
        counts=lambda: core_counts(engine, factory),
        last_scan=lambda: getattr(culler, "last_scan", None),
        pins=pins,
        devices_of=devices_of,
    )


def serve_fanotify_control(
    daemon: Any,
    frontend: FanotifyFrontend,
    engine: Engine,
    factory: Any,
    collect: Callable[[], dict[str, object]],
    failed: Sequence[tuple[FanotifyImage, str]] = (),
    pins: PinStore | None = None,
) -> ControlService:
    """Start the control socket and metrics of a daemon in fanotify mode; a failure is
    logged and serving goes on without them, as in the other modes."""
    state = fanotify_state(daemon, frontend, engine, factory, collect, failed, pins)
    try:
        return start_control(state, daemon.config)
    except (OSError, ControlError) as exc:
        log.error("control.unavailable", error=str(exc), path=daemon.config.control_socket)
        return ControlService(None, None)
