"""Classic mode (``bind``): keep an NFS/AFS/Ceph/9p fscache cache inside its limits.

The kernel fills the cache by itself; the daemon's job is to cull (shared/reference/
cachefilesd-classic.md §3):

- ``read()`` returns the state line; ``cull=1`` means free space or files went below
  *cull* and stays 1 until both are back above *run*. POLLIN signals a state change.
- to cull, the daemon finds old objects itself and writes ``cull <name>`` **relative to
  its working directory** (so it ``chdir``s into the object's directory first); EBUSY
  means the object is in use (never culled), ESTALE/ENOENT that it is gone already.
  The kernel moves culled objects into ``graveyard/``, which the daemon must empty.

Unlike cachefilesd C, which culls one object per loop pass and re-walks the tree for
every 4096 victims, each pass here scans once into a bounded heap of the oldest objects
and culls in a batch toward *run* plus a headroom, re-reading the state between
batches; when nothing is cullable it backs off instead of spinning.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.frontends.classic.commands import parse_state
from cachefilesd_py.kernel.device import cull_one
from cachefilesd_py.space.graveyard import GraveyardWatch, reap
from cachefilesd_py.space.scan import scan

log = structlog.get_logger("classic")

BATCH = 64
BACKOFF = 5.0


class ClassicDevice(Protocol):
    def fileno(self) -> int: ...
    def read_message(self) -> bytes: ...
    def write_command(self, cmd: bytes) -> None: ...


@dataclass
class ClassicStats:
    passes: int = 0
    culled: int = 0
    busy: int = 0
    gone: int = 0
    failed: int = 0
    reaped: int = 0
    strays_removed: int = 0


class ClassicDriver:
    def __init__(
        self, device: ClassicDevice, cache_dir: str, *, nocull: bool, table_size: int = 4096
    ) -> None:
        self.device = device
        self.cache_dir = cache_dir
        self.nocull = nocull
        self.table_size = table_size
        self.stats = ClassicStats()

    def bind(self, commands: list[bytes]) -> None:
        for cmd in commands:
            self.device.write_command(cmd)
        self.device.write_command(b"bind")
        log.info("bound", mode="classic", cache_dir=self.cache_dir)

    def read_state(self) -> bool:
        state = parse_state(self.device.read_message())
        if state.malformed:
            log.warning("kernel.malformed_state", tokens=list(state.malformed))
        return state.cull

    def cull_pass(self) -> int:
        """Cull the oldest objects in batches while the kernel still asks for it."""
        self.stats.passes += 1
        result = scan(os.path.join(self.cache_dir, "cache"), self.table_size)
        for stray in result.strays:
            try:
                os.unlink(stray)
                self.stats.strays_removed += 1
            except OSError:
                pass
        culled = 0
        for i, cand in enumerate(result.oldest):
            if i % BATCH == 0 and i and not self.read_state():
                break
            outcome = cull_one(self.device, cand.directory, cand.name)
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            culled += outcome == "culled"
        for empty in result.empty_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(empty)
        log.info(
            "cull.pass",
            scanned=result.objects,
            candidates=len(result.oldest),
            culled=culled,
            busy=self.stats.busy,
            strays=len(result.strays),
        )
        return culled

    def serve(self, stop: threading.Event, poll_interval: float = 1.0) -> None:
        graveyard = os.path.join(self.cache_dir, "graveyard")
        self.stats.reaped += reap(graveyard)
        watch = GraveyardWatch(graveyard)
        poller = select.poll()
        poller.register(self.device.fileno(), select.POLLIN)
        poller.register(watch.fileno(), select.POLLIN)
        backoff_until = 0.0
        try:
            while not stop.is_set():
                poller.poll(int(poll_interval * 1000))
                if watch.changed():
                    self.stats.reaped += reap(graveyard)
                culling = self.read_state()
                if not culling or self.nocull or time.monotonic() < backoff_until:
                    continue
                if self.cull_pass() == 0:
                    log.info("cull.nothing_cullable", backoff=BACKOFF)
                    backoff_until = time.monotonic() + BACKOFF
                self.stats.reaped += reap(graveyard)
        finally:
            watch.close()


def run_classic(
    device: ClassicDevice,
    config: Config,
    stop: threading.Event,
    *,
    nocull: bool,
    commands: list[bytes],
    on_ready: Callable[[], object] = lambda: None,
) -> int:
    assert config.dir is not None
    driver = ClassicDriver(device, config.dir, nocull=nocull, table_size=1 << config.culltable)
    driver.bind(commands)
    on_ready()
    try:
        driver.serve(stop)
    finally:
        log.info("stats", **vars(driver.stats))
    return 0
