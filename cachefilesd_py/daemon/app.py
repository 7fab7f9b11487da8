"""What a worker serves: the frontend and the engine over a device the supervisor bound.

The process model (docs/failover.md) splits the daemon in two. The supervisor
(``daemon/supervisor.py``) opens and binds ``/dev/cachefiles`` (or takes it back from
systemd's fd store), writes ``restore`` when a worker died, and forks workers. A worker
builds a :class:`Daemon` over that device and serves it:

- :meth:`Daemon.prepare` builds everything that needs no kernel state (sources,
  presence store, engine, frontend driver, culler). A spare worker does this long
  before it is needed;
- :meth:`Daemon.serve` starts the engine's threads and reads requests until SIGTERM or
  SIGINT. Shutdown: stop reading, finish the fills in flight (every READ still gets
  its completion), checkpoint presence bitmaps, close every anonymous fd. The device
  fd stays open in the supervisor (and in systemd's fd store), so a worker's exit
  never unbinds the cache.

A worker never binds and never writes ``restore``: it starts reading only after the
supervisor has done both, so a re-delivered request is read once, by it.

SIGHUP re-reads the configuration file and swaps in the new ``source`` rules; the
kernel's thresholds are fixed at ``bind`` and need a restart, which is logged.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from cachefilesd_py.config.load import load_config
from cachefilesd_py.config.model import Config
from cachefilesd_py.daemon import host
from cachefilesd_py.daemon.stats import Collect, StatsReporter
from cachefilesd_py.frontends.bind import kernel_commands
from cachefilesd_py.kernel.device import Device
from cachefilesd_py.space.caps import CullRules

if TYPE_CHECKING:  # on-demand mode's stack: imported by the mode that uses it
    from cachefilesd_py.config.model import FanotifyImage
    from cachefilesd_py.daemon.control import ControlService
    from cachefilesd_py.daemon.fanotify_keeper import FanotifyHold
    from cachefilesd_py.daemon.offline import OfflineWiring
    from cachefilesd_py.engine.cull import BlobCuller
    from cachefilesd_py.engine.service import Engine, EngineSettings
    from cachefilesd_py.frontends.fanotify.service import FanotifyFrontend
    from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
    from cachefilesd_py.sources.open import SourceFactory, SourceSettings
    from cachefilesd_py.space.pins import PinStore

log = structlog.get_logger("daemon")

#: the daemon's own directory inside the cache root (next to the kernel's cache/ and
#: graveyard/), holding presence sidecars
STATE_DIR_NAME = "cachefilesd-py"


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def import_mode(config: Config) -> None:
    """Import what a worker of ``config``'s mode serves with, and nothing else.

    The supervisor calls this once the cache is bound, before it forks the first
    worker, so that workers (forks of it) start with everything imported. Classic mode
    needs none of the on-demand stack (engine, sources and their HTTP client,
    presence store, control server): not importing it is most of classic mode's
    start-up in a slow guest (docs/benchmarks.md, "Classic mode vs cachefilesd C").
    The control server and metrics of classic mode are imported by the serving
    worker while it already culls (:meth:`Daemon._serve_classic`)."""
    if config.ondemand or config.fanotify:
        # the codec socket.getaddrinfo() imports at a process's first connection: a
        # new worker's first HTTP request, on the path of the first READ after a
        # failover (docs/benchmarks.md, "Failover")
        import encodings.idna  # noqa: F401

    if config.fanotify:
        from cachefilesd_py.daemon import fanotify_mode  # noqa: F401
    elif config.ondemand:
        from cachefilesd_py.daemon import control, notify_dbus, offline  # noqa: F401
        from cachefilesd_py.engine import service  # noqa: F401
        from cachefilesd_py.frontends.ondemand import driver, space  # noqa: F401
        from cachefilesd_py.sources import netlink  # noqa: F401
        from cachefilesd_py.sources import open as _open  # noqa: F401
    else:
        from cachefilesd_py.frontends.classic import driver as _classic  # noqa: F401


def engine_settings(config: Config) -> EngineSettings:
    from cachefilesd_py.engine.service import EngineSettings

    return EngineSettings(
        chunk_size=config.chunk_size,
        chunk_size_rules=tuple((r.pattern, r.size) for r in config.source_chunk_sizes),
        readahead=config.readahead,
        fetch_timeout=config.fetch_timeout,
        # a buffer must hold the largest chunk any rule gives a blob
        max_run=max(4 << 20, config.chunk_size, *(r.size for r in config.source_chunk_sizes)),
        buffers=config.fetch_concurrency + 4,
    )


def source_settings(config: Config) -> SourceSettings:
    from cachefilesd_py.config.load import headers_for
    from cachefilesd_py.sources.open import SourceSettings

    return SourceSettings(
        ca_file=config.ca_file,
        headers_for=headers_for(config),
        timeout=config.fetch_timeout,
        retries=config.fetch_retries,
        pool_size=config.fetch_concurrency,
    )


def ondemand_figures(driver: OnDemandDriver, engine: Engine) -> dict[str, object]:
    """The on-demand stack's counters and latency percentiles, flat: the ``stats``
    line, ``cachefilesctl stats`` and the metrics' plain counters read these."""
    space = {}
    if driver.culler is not None:
        t = driver.culler.totals
        space = {"culled": t.culled, "trimmed": t.trimmed, "cull_freed": t.freed_bytes}
    return {
        **driver.stats_fields(),
        **vars(engine.filler.stats),
        **driver.read_times.summary_ms("read"),
        **engine.filler.fetch_times.summary_ms("fetch"),
        **engine.filler.write_times.summary_ms("write"),
        **engine.checkpoint_times.summary_ms("checkpoint"),
        **engine.checkpoint_fields(),
        **space,
    }


class Daemon:
    """One worker's serving stack (see the module docstring)."""

    def __init__(self, config: Config, config_path: str, nocull: bool) -> None:
        self.config = config
        self.config_path = config_path
        self.nocull = nocull or config.nocull
        self.stop = threading.Event()
        #: set by a handler after noting a signal; the "signals" thread waits on it
        self._signalled = threading.Event()
        self._reload_requested = False
        self._stop_signal: int | None = None
        assert config.dir is not None
        self.cache_dir = Path(config.dir)
        self._device: Device | None = None

    # -- signals ---------------------------------------------------------------------
    #
    # A Python signal handler runs in the main thread between two bytecodes, possibly
    # while that thread is inside a log call holding the log stream's (non-reentrant)
    # write lock: a handler that logs can deadlock the daemon — seen in the guest, a
    # SIGTERM that arrived while the reader thread logged a CLOSE hung it until SIGKILL.
    # So the handlers only set events; the "signals" thread logs and acts on them.

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        threading.Thread(target=self._signal_loop, name="signals", daemon=True).start()

    def _on_usr1(self, _signum: int, _frame: FrameType | None) -> None:
        if self._reporter is not None:
            self._reporter.request()

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signum
        self.stop.set()
        self._signalled.set()

    def _on_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True
        self._signalled.set()

    def _signal_loop(self) -> None:
        """Acts on what the handlers noted: reloads, and logs the stop request."""
        while True:
            self._signalled.wait()
            self._signalled.clear()
            if self._reload_requested:
                self._reload_requested = False
                try:
                    self.reload()
                except Exception:
                    log.exception("reload.failed")
            if self._stop_signal is not None:
                log.info("stopping", signal=signal.Signals(self._stop_signal).name)
                return

    def reload(self) -> None:
        from cachefilesd_py.errors import ConfigError

        with contextlib.suppress(ConfigError):  # logged by reload_report
            self.reload_report()

    def reload_report(self) -> dict[str, Any]:
        """Re-read the configuration; apply what can be applied live (the ``source``
        rules) and say which changed settings need a restart. A bad file changes
        nothing and raises :class:`ConfigError` (``file:line: rule``)."""
        from cachefilesd_py.errors import ConfigError

        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload.rejected", error=str(exc))
            raise
        changed = [k for k, v in vars(new).items() if getattr(self.config, k) != v]
        live = self._apply_live(new)
        applied = [k for k in changed if k in live]
        restart = [k for k in changed if k not in live]
        if kernel_commands(new) != kernel_commands(self.config):
            log.warning(
                "reload.kernel_settings_need_restart",
                note="dir/tag/thresholds are fixed at bind; restart to apply",
            )
        if restart:
            log.warning("reload.needs_restart", settings=restart)
        self.config = new
        log.info("reloaded", sources=len(new.sources), applied=applied)
        return {"changed": changed, "applied": applied, "needs_restart": restart}

    def _apply_live(self, new: Config) -> frozenset[str]:
        """Swap in what new kernel objects and fetches will use; the settings applied.

        ``source`` rules; ``source_headers`` (the files are read again on every reload,
        so a rotated token is picked up even when the configuration did not change,
        by every HTTP source, those of open blobs too: :meth:`reload_credentials`);
        ``fetch_retries`` for sources opened from now on; chunk sizes and
        read-ahead for blobs opened from now on (an open blob keeps its geometry; a
        chunk larger than the fill buffers sized at start needs a restart); pins and
        caps for the next cull pass. The cull policy keeps its state: a restart."""
        engine, factory = self._engine, self._factory
        if engine is None or factory is None:
            return frozenset()
        from dataclasses import replace

        from cachefilesd_py.sources.resolve import SourceResolver

        # first, as it may still fail (a headers file changed since load_config read it)
        self._reload_credentials(new)
        # pin_max_share: each pin reads it from the configuration in force
        live = {"sources", "source_headers", "fetch_retries", "readahead", "pin_max_share"}
        engine.resolve = SourceResolver(new.sources).resolve
        factory.settings = replace(factory.settings, retries=new.fetch_retries)
        wanted = engine_settings(new)
        chunks = [wanted.chunk_size, *(size for _p, size in wanted.chunk_size_rules)]
        changes: dict[str, Any] = {"readahead": wanted.readahead}
        if all(c <= engine.settings.max_run for c in chunks):  # one chunk fits a buffer
            changes |= {
                "chunk_size": wanted.chunk_size,
                "chunk_size_rules": wanted.chunk_size_rules,
            }
            live |= {"chunk_size", "source_chunk_sizes"}
        engine.settings = replace(engine.settings, **changes)
        from cachefilesd_py.daemon.offline import policies_of

        # the configuration's offline policies replace those switched at run time
        engine.gate.policies = policies_of(new)
        live.add("offline_policies")
        culler = self._culler
        if culler is not None:  # pins and caps: the next cull pass uses them
            culler.rules = CullRules.from_config(new)
            live |= {"pins", "cache_max_bytes", "cache_max_objects", "volume_max_bytes"}
        return frozenset(live)

    def reload_credentials(self) -> dict[str, Any]:
        """``cachefilesctl credentials reload``: read the ``source_headers`` files of
        the configuration in force again (checked as at start) and swap them in for
        every HTTP source, open blobs' included; forget the rejected credentials (the
        next fetch decides again). A refused file raises :class:`ConfigError`
        (``file:line``) and changes nothing."""
        from cachefilesd_py.errors import ConfigError

        try:
            return self._reload_credentials(self.config)
        except ConfigError as exc:
            log.error("credentials.reload_rejected", error=str(exc))
            raise

    def _reload_credentials(self, config: Config) -> dict[str, Any]:
        from cachefilesd_py.config.load import Credentials

        factory = self._factory
        creds = factory.settings.headers_for if factory is not None else None
        if not isinstance(creds, Credentials):  # nothing serving HTTP sources yet
            return {"rules": [], "cleared": []}
        rules = creds.reload(config)
        engine = self._engine
        cleared = engine.gate.credentials.clear() if engine is not None else []
        log.info("credentials.reloaded", rules=[r["pattern"] for r in rules], cleared=cleared)
        return {"rules": rules, "cleared": cleared}

    # -- building and serving --------------------------------------------------------

    _engine: Engine | None = None
    _driver: OnDemandDriver | None = None
    _factory: SourceFactory | None = None
    _culler: BlobCuller | None = None
    _reporter: StatsReporter | None = None
    _offline: OfflineWiring | None = None

    _fanotify: FanotifyHold | None = None
    _fanotify_built: tuple[Engine, SourceFactory] | None = None

    def prepare(self, device: Device | None, fanotify: FanotifyHold | None = None) -> None:
        """Build what serving needs, without reading from or writing to the device
        (fanotify mode: keep the supervisor's group, build the engine)."""
        self._device = device
        self._fanotify = fanotify
        if fanotify is not None:
            from cachefilesd_py.daemon.fanotify_mode import build_engine

            self._fanotify_built = build_engine(
                self.config,
                self.cache_dir / STATE_DIR_NAME,
                engine_settings=engine_settings(self.config),
                source_settings=source_settings(self.config),
            )
            return
        if not self.config.ondemand:
            return
        assert device is not None
        from cachefilesd_py.engine.conflicts import ConflictBook
        from cachefilesd_py.engine.service import Engine
        from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
        from cachefilesd_py.frontends.ondemand.space import make_culler
        from cachefilesd_py.presence.store import PresenceStore
        from cachefilesd_py.sources.open import SourceFactory
        from cachefilesd_py.sources.resolve import SourceResolver

        state_dir = self.cache_dir / STATE_DIR_NAME
        presence = PresenceStore(state_dir / "presence")
        self._factory = SourceFactory(source_settings(self.config))
        if any(
            rule.url_template.lower().startswith(("http:", "https:"))
            for rule in self.config.sources
        ):
            self._factory.prepare_http()  # not in the reader's first OPEN after a failover
        engine = Engine(
            resolve=SourceResolver(self.config.sources).resolve,
            open_source=self._factory.open,
            presence=presence,
            settings=engine_settings(self.config),
            conflicts=ConflictBook(state_dir),
        )
        self._engine = engine
        driver = OnDemandDriver(
            device,
            engine,
            self.cache_dir,
            workers=self.config.fetch_concurrency,
            fetch_timeout=self.config.fetch_timeout,
        )
        if not self.nocull:
            driver.culler = make_culler(
                device,
                self.cache_dir,
                presence,
                engine.leases,
                self.config,
                CullRules.from_config(self.config),
            )
        self._driver = driver
        self._culler = driver.culler

    def serve(self, on_serving: Callable[[], object] = lambda: None) -> int:
        """Serve the bound device until :attr:`stop` is set; ``on_serving`` is called
        once the worker reads requests."""
        if self._fanotify is not None:
            return self.run_fanotify(0, hold=self._fanotify, on_ready=on_serving)
        assert self._device is not None, "prepare() first"
        if self.config.ondemand:
            return self._serve_ondemand(on_serving)
        return self._serve_classic(on_serving)

    def health(self) -> dict[str, Any]:
        """What the heartbeat tells the supervisor (``daemon/channel.py``)."""
        driver = self._driver
        if driver is None:
            return {"loop_age": None, "oldest_read": None, "objects": None, "culling": None}
        offline = self._offline
        return {
            "loop_age": round(time.monotonic() - driver.last_loop, 3),
            "oldest_read": driver.oldest_read_age(),
            "objects": len(driver.objects()),
            "culling": driver.culling,
            "reads": driver.stats.reads,
            # the first few offline sources, for systemd's STATUS= (a message is small)
            "offline": offline.offline()[:4] if offline is not None else [],
        }

    def _serve_ondemand(self, on_serving: Callable[[], object]) -> int:
        driver, engine, factory = self._driver, self._engine, self._factory
        assert driver is not None and engine is not None and factory is not None
        engine.start()

        def collect() -> dict[str, object]:
            return {**ondemand_figures(driver, engine), **host.footprint()}

        from cachefilesd_py.daemon.control import serve_control
        from cachefilesd_py.daemon.offline import OfflineWiring, idle_pinned

        self._offline = offline = OfflineWiring(self.config, engine, driver.source_changed)
        driver.on_read_waiting = offline.read_waiting
        self._reporter = StatsReporter(collect).start()
        control = serve_control(self, "ondemand", collect, engine, driver)
        offline.idle_pinned = lambda: idle_pinned(control.pins, driver)
        on_serving()
        try:
            driver.serve(self.stop)
        finally:
            offline.close()
            control.close()
            self._reporter.close()
            driver.shutdown()
            factory.close()
            log.info("stats", final=True, **collect())
        return 0

    def run_fanotify(
        self,
        nofile: int,
        *,
        hold: FanotifyHold | None = None,
        on_ready: Callable[[], object] | None = None,
    ) -> int:
        """fanotify mode (daemon/fanotify_mode.py): in a worker, over the group the
        supervisor holds (``hold``); without one, this process makes and owns it."""
        from cachefilesd_py.daemon.fanotify_mode import run_fanotify

        def keep_reporter(reporter: StatsReporter) -> None:
            self._reporter = reporter

        def keep_engine(engine: Engine) -> None:
            self._engine = engine

        def start_control(
            frontend: FanotifyFrontend,
            factory: SourceFactory,
            collect: Callable[[], dict[str, object]],
            failed: list[tuple[FanotifyImage, str]],
            pins: PinStore,
        ) -> ControlService:
            from cachefilesd_py.daemon.fanotify_control import serve_fanotify_control

            # what reload applies live (_apply_live): sources, headers, pins, caps
            self._factory = factory
            self._culler = frontend.culler
            engine = self._engine
            assert engine is not None
            return serve_fanotify_control(self, frontend, engine, factory, collect, failed, pins)

        try:
            return run_fanotify(
                self.config,
                self.cache_dir,
                self.cache_dir / STATE_DIR_NAME,
                self.stop,
                engine_settings=engine_settings(self.config),
                source_settings=source_settings(self.config),
                nofile=nofile,
                on_engine=keep_engine,
                on_reporter=keep_reporter,
                hold=hold,
                on_ready=on_ready,
                built=self._fanotify_built if hold is not None else None,
                start_control=start_control,
            )
        finally:
            log.info("terminated")

    def _serve_classic(self, on_serving: Callable[[], object]) -> int:
        from cachefilesd_py.frontends.classic.driver import run_classic

        control = []

        def report(collect: Collect) -> None:
            # called after the first pass: the control server and its metrics
            # (prometheus-client, http.server) take seconds to import in a slow guest
            from cachefilesd_py.daemon.control import serve_control

            self._reporter = StatsReporter(lambda: {**collect(), **host.footprint()}).start()
            control.append(serve_control(self, "classic", collect, None, None))

        assert self._device is not None
        try:
            return run_classic(
                self._device,
                self.config,
                self.stop,
                nocull=self.nocull,
                setup=None,
                on_ready=on_serving,
                report_stats=report,
            )
        finally:
            for service in control:
                service.close()
            if self._reporter is not None:
                self._reporter.close()
