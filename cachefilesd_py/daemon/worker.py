"""A worker process: forked by the supervisor as a spare, serving once told to.

Life of a worker (docs/failover.md):

1. **Forked** from the single-threaded supervisor, which has every module imported, so
   the child has them too (no interpreter start, no imports). First thing in the
   child: the parent-death signal (SIGKILL: a worker must never outlive the
   supervisor with anonymous fds of its own, or the next ``restore`` cannot work),
   then the supervisor's own fds and handlers are dropped, and ``$NOTIFY_SOCKET`` and
   friends forgotten (only the main process talks to systemd).
2. **Spare**: builds its :class:`~cachefilesd_py.daemon.app.Daemon` (sources, presence
   store, engine, driver: everything that needs no kernel state), says ``prepared``
   and waits. It never reads the device, so it never holds an anonymous fd. SIGTERM
   and SIGINT end it, SIGHUP and SIGUSR1 are ignored (they are the serving worker's).
3. **Serving**, on ``serve`` from the supervisor — which has reaped the previous
   worker (so every anonymous fd it had is closed) and written ``restore`` — it starts
   reading requests: first the re-delivered ones. Heartbeats go to the supervisor every
   second. SIGTERM/SIGINT end it cleanly (in-flight READs completed, presence
   checkpointed, anonymous fds closed); exit status 0.

Anonymous fds exist only in the serving worker, close-on-exec from the moment they
arrive (``kernel/fd.py``), and a worker never forks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.daemon import systemd
from cachefilesd_py.daemon.app import Daemon
from cachefilesd_py.daemon.channel import KINDS_FROM_SUPERVISOR, Channel
from cachefilesd_py.daemon.logging import set_process
from cachefilesd_py.kernel import _sys
from cachefilesd_py.kernel.device import Device

if TYPE_CHECKING:
    from cachefilesd_py.daemon.fanotify_keeper import FanotifyHold

log = structlog.get_logger("daemon")

HEARTBEAT_INTERVAL = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    config: Config
    config_path: str
    nocull: bool
    #: the bound device (on-demand and classic mode), None in fanotify mode
    device: Device | None
    supervisor_pid: int
    #: the group, journal and silent fds (fanotify mode)
    fanotify: FanotifyHold | None = None


def become_child(supervisor_pid: int, supervisor_fds: list[int], comm: str) -> None:
    """What a freshly forked worker does before anything else (see the module doc)."""
    _sys.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != supervisor_pid:  # the supervisor died before the prctl
        os._exit(1)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    for fd in supervisor_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    systemd.forget_main_process_variables()
    _set_name(comm)


def _set_name(comm: str) -> None:
    with contextlib.suppress(OSError):
        _sys.set_comm(comm)
    set_process(comm.removeprefix("cfd-"))


class Heartbeat:
    """Sends the daemon's health to the supervisor every second, from its own thread."""

    def __init__(self, chan: Channel, health: Callable[[], dict[str, object]]) -> None:
        self._chan = chan
        self._health = health
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            try:
                fields = self._health()
            except Exception:  # a broken probe must not end the heartbeats silently
                log.exception("heartbeat.failed")
                fields = {}
            self._chan.send("heartbeat", **fields)

    def stop(self) -> None:
        self._stop.set()


def run(spec: WorkerSpec, sock: socket.socket) -> int:
    """The worker's whole life, in the forked child; returns its exit status."""
    chan = Channel(sock, KINDS_FROM_SUPERVISOR)
    daemon = Daemon(spec.config, spec.config_path, spec.nocull)
    daemon.prepare(spec.device, spec.fanotify)
    chan.send("prepared")
    msg = chan.receive()
    if msg is None or msg.kind != "serve":
        return 0
    _set_name("cfd-serving")
    daemon.install_signals()
    heartbeat = Heartbeat(chan, daemon.health).start()
    try:
        return daemon.serve(on_serving=lambda: chan.send("serving"))
    finally:
        heartbeat.stop()
