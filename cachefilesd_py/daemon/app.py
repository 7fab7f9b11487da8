"""Builds the daemon from its configuration and runs it until told to stop.

Start-up order (the kernel's rules decide it, see ``docs/protocol-ondemand.md`` §1):
raise RLIMIT_NOFILE (every open blob holds an anonymous fd) → check the cache
directory → open ``/dev/cachefiles`` (only one opener at a time: EBUSY means another
daemon has it) → send the configuration commands one per write → ``bind`` or
``bind ondemand`` → tell systemd READY=1 → serve until SIGTERM/SIGINT.

Shutdown: stop reading requests, finish the fills in flight (every READ still gets its
completion), checkpoint presence bitmaps, close every anonymous fd, close the device.
Closing the device unbinds the cache: mounts still using it get EIO from then on, so
an administrator unmounts EROFS first (``docs/protocol-ondemand.md`` §7).

SIGHUP re-reads the configuration file and swaps in the new ``source`` rules; the
kernel's thresholds are fixed at ``bind`` and need a restart, which is logged.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
from pathlib import Path
from types import FrameType

import structlog

from cachefilesd_py.config.load import load_config
from cachefilesd_py.config.model import Config
from cachefilesd_py.daemon import host, systemd
from cachefilesd_py.daemon.stats import Collect, StatsReporter
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.bind import kernel_commands
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.frontends.ondemand.space import make_culler
from cachefilesd_py.kernel.device import CachefilesDevice
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.space.caps import CullRules

log = structlog.get_logger("daemon")

#: the daemon's own directory inside the cache root (next to the kernel's cache/ and
#: graveyard/), holding presence sidecars
STATE_DIR_NAME = "cachefilesd-py"


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def engine_settings(config: Config) -> EngineSettings:
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

    return SourceSettings(
        ca_file=config.ca_file,
        headers_for=headers_for(config),
        timeout=config.fetch_timeout,
        retries=config.fetch_retries,
        pool_size=config.fetch_concurrency,
    )


class Daemon:
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

        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload.rejected", error=str(exc))
            return
        if self._engine is not None:
            self._engine.resolve = SourceResolver(new.sources).resolve
        if kernel_commands(new) != kernel_commands(self.config):
            log.warning(
                "reload.kernel_settings_need_restart",
                note="dir/tag/thresholds are fixed at bind; restart to apply",
            )
        self.config = new
        log.info("reloaded", sources=len(new.sources))

    # -- run -------------------------------------------------------------------------

    _engine: Engine | None = None
    _reporter: StatsReporter | None = None

    def run(self) -> int:
        nofile = raise_nofile_limit()
        if not self.cache_dir.is_dir():
            raise OSError(2, f"Can't confirm cache location: {self.cache_dir}")
        device = CachefilesDevice()
        try:
            if self.config.ondemand:
                return self._run_ondemand(device, nofile)
            return self._run_classic(device)
        finally:
            device.close()
            log.info("terminated")

    def _run_ondemand(self, device: CachefilesDevice, nofile: int) -> int:
        state_dir = self.cache_dir / STATE_DIR_NAME
        presence = PresenceStore(state_dir / "presence")
        factory = SourceFactory(source_settings(self.config))
        engine = Engine(
            resolve=SourceResolver(self.config.sources).resolve,
            open_source=factory.open,
            presence=presence,
            settings=engine_settings(self.config),
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
        driver.bind(kernel_commands(self.config))
        engine.start()
        systemd.ready()
        log.info("cache.device", **host.cache_device(str(self.cache_dir)))
        log.info(
            "ready",
            mode="ondemand",
            cache_dir=str(self.cache_dir),
            nofile=nofile,
            sources=len(self.config.sources),
            chunk_size=self.config.chunk_size,
        )

        def collect() -> dict[str, object]:
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
                **space,
                **host.footprint(),
            }

        self._reporter = StatsReporter(collect).start()
        try:
            driver.serve(self.stop)
        finally:
            self._reporter.close()
            systemd.stopping()
            driver.shutdown()
            factory.close()
            log.info("stats", final=True, **collect())
        return 0

    def _run_classic(self, device: CachefilesDevice) -> int:
        from cachefilesd_py.frontends.classic.driver import run_classic

        def report(collect: Collect) -> None:
            self._reporter = StatsReporter(lambda: {**collect(), **host.footprint()}).start()

        systemd.status("binding classic cache")
        try:
            return run_classic(
                device,
                self.config,
                self.stop,
                nocull=self.nocull,
                setup=kernel_commands(self.config),
                on_ready=lambda: (systemd.ready(), log.info("ready", mode="classic")),
                report_stats=report,
            )
        finally:
            if self._reporter is not None:
                self._reporter.close()


def run(config: Config, options: object) -> int:
    """Entry point used by ``cachefilesd_py.daemon.cli``."""
    daemon = Daemon(
        config,
        getattr(options, "config_path", "/etc/cachefilesd.conf"),
        bool(getattr(options, "nocull", False)),
    )
    daemon.install_signals()
    os.umask(0o077)
    return daemon.run()
