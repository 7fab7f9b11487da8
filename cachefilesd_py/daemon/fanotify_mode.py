"""The daemon in fanotify mode (``fanotify`` in the config): no ``/dev/cachefiles``.

The same engine, sources, presence sidecars and settings as on-demand mode
(``app.py`` builds them the same way); the frontend is ``frontends/fanotify``: it makes
the cache files, marks and mounts them, and answers the kernel's pre-content events.
Start-up: raise RLIMIT_NOFILE (every event in flight holds an fd) → presence store →
engine → frontend (group, images, mounts) → READY=1. An image that cannot be served is
logged; if none can, the daemon exits with an error.

Run in a worker, the group, the in-flight journal and the silent fds are the
supervisor's (``daemon/fanotify_keeper.py``): a worker's death never closes the group,
and the next worker adopts the mounts and answers what the dead one had read
(``frontends/fanotify/service.py``, docs/failover.md "fanotify mode").

SIGTERM: every mount is unmounted first, and the group stays open and served while a
mount is busy (``frontends/fanotify/service.py``): the daemon never leaves a mount it
can no longer serve. Culling and trimming follow the same limits, caps, pins and
policy as on-demand mode, except that the file of a mounted image is never touched
(``frontends/fanotify/space.py`` says why; off with ``nocull``); the pins of
``cachefilesctl pin`` (``<dir>/cachefilesd-py/pins.json``) are held from the first
pass. The control socket and metrics serve the same operations as in on-demand mode
(``daemon/fanotify_control.py``), ``pin``/``unpin``/``pins`` included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from cachefilesd_py.config.model import Config, FanotifyImage
from cachefilesd_py.daemon import host, systemd
from cachefilesd_py.daemon.control import ControlService
from cachefilesd_py.daemon.fanotify_control import fanotify_figures
from cachefilesd_py.daemon.fanotify_keeper import FanotifyHold
from cachefilesd_py.daemon.stats import StatsReporter
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.fanotify.inflight import InflightJournal
from cachefilesd_py.frontends.fanotify.service import FanotifyFrontend
from cachefilesd_py.frontends.fanotify.space import make_culler
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.space.pins import PinStore

log = structlog.get_logger("daemon")

#: starts the control socket: (frontend, source factory, collect, images that failed,
#: the pins of ``cachefilesctl pin``)
Failed = list[tuple[FanotifyImage, str]]
StartControl = Callable[
    [FanotifyFrontend, SourceFactory, Callable[[], dict[str, object]], Failed, PinStore],
    ControlService,
]


def build_engine(
    config: Config,
    state_dir: Path,
    *,
    engine_settings: EngineSettings,
    source_settings: SourceSettings,
) -> tuple[Engine, SourceFactory]:
    """The engine and its source factory, not started: a spare builds them ahead."""
    factory = SourceFactory(source_settings)
    engine = Engine(
        resolve=SourceResolver(config.sources).resolve,
        open_source=factory.open,
        presence=PresenceStore(state_dir / "presence"),
        settings=engine_settings,
    )
    return engine, factory


def run_fanotify(
    config: Config,
    cache_dir: Path,
    state_dir: Path,
    stop: threading.Event,
    *,
    engine_settings: EngineSettings,
    source_settings: SourceSettings,
    nofile: int,
    on_engine: Callable[[Engine], None] = lambda _e: None,
    on_reporter: Callable[[StatsReporter], None] = lambda _r: None,
    hold: FanotifyHold | None = None,
    on_ready: Callable[[], object] | None = None,
    built: tuple[Engine, SourceFactory] | None = None,
    start_control: StartControl | None = None,
) -> int:
    """Serve until ``stop`` (the module docstring). ``start_control`` starts the
    control socket and metrics once the images are served (``daemon/fanotify_control.py``);
    what it returns is closed first at shutdown."""
    engine, factory = built or build_engine(
        config, state_dir, engine_settings=engine_settings, source_settings=source_settings
    )
    on_engine(engine)
    journal = InflightJournal.attach(hold.journal_fd) if hold is not None else None
    # the pins of ``cachefilesctl pin`` (space/pins.py): held from the culler's first
    # pass, before the control socket that takes new ones is up
    pins = PinStore(state_dir)
    frontend = FanotifyFrontend(
        engine,
        cache_dir,
        config.fanotify_images,
        workers=config.fetch_concurrency,
        fetch_timeout=config.fetch_timeout,
        culler=None
        if config.nocull
        else lambda fe: make_culler(
            config,
            cache_dir,
            engine.presence,
            engine.leases,
            fe.served,
            held_pins=lambda: pins.snapshot().names(),
        ),
        group=hold.group if hold is not None else None,
        journal=journal,
        silent=hold.silent if hold is not None else None,
    )
    engine.start()
    try:
        failed = frontend.start()
        if len(failed) == len(config.fanotify_images):
            log.error("fanotify.no_image_served")
            return 1
        if on_ready is not None:
            on_ready()
        else:
            systemd.ready()
        log.info("cache.device", **host.cache_device(str(cache_dir)))
        log.info(
            "ready",
            mode="fanotify",
            cache_dir=str(cache_dir),
            nofile=nofile,
            images=len(frontend.images),
            failed=len(failed),
            chunk_size=config.chunk_size,
            takeover=vars(frontend.takeover) if frontend.takeover is not None else None,
        )

        def collect() -> dict[str, object]:
            return {**fanotify_figures(frontend, engine), **host.footprint()}

        reporter = StatsReporter(collect).start()
        on_reporter(reporter)
        control = start_control(frontend, factory, collect, failed, pins) if start_control else None
        try:
            stop.wait()
            systemd.stopping()
        finally:
            if control is not None:  # before the images go down, as on-demand mode
                control.close()
            reporter.close()
            log.info("stats", final=True, **collect())
    finally:
        frontend.stop()
        engine.close()
        factory.close()
        if journal is not None:
            journal.close()
    return 0
