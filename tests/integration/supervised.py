"""Runs the real supervisor, with real forked workers, over a recording stand-in device.

    python -m tests.integration.supervised WORKDIR

Used by ``test_supervisor.py``: the host has no ``/dev/cachefiles``, so the device is
a :class:`RecordingDevice` that appends every command to ``WORKDIR/commands.log``
(with a timestamp), and each worker runs :func:`stub_worker` instead of the serving
stack. Everything else is the product's code: the keeper's bind, the supervisor's
loop, forks, signals, reaping, health verdicts, restore on failover, spares.

``WORKDIR/options.json`` sets the knobs: ``limits`` (health limits), ``budget``
([deaths, window]), ``can_restore``. A stub worker appends ``serving <pid>`` to
``WORKDIR/events.log`` when it takes over and ``hup <pid>`` on SIGHUP; it stops its
heartbeats while ``WORKDIR/wedge-<pid>`` exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from cachefilesd_py.config.load import load_config
from cachefilesd_py.daemon.channel import KINDS_FROM_SUPERVISOR, Channel
from cachefilesd_py.daemon.health import CrashBudget, Limits
from cachefilesd_py.daemon.keeper import DeviceKeeper, Notifier
from cachefilesd_py.daemon.logging import configure_logging, set_process
from cachefilesd_py.daemon.supervisor import Supervisor
from cachefilesd_py.daemon.worker import WorkerSpec


class RecordingDevice:
    """Stands in for /dev/cachefiles: records commands, never has a message."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def read_message(self) -> bytes:
        return b""

    def write_command(self, cmd: bytes) -> None:
        with open(self._log, "a") as f:
            f.write(f"{time.time():.6f} {os.getpid()} {cmd.decode()}\n")

    def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        raise OSError(9, "no anonymous fds here")

    def read_complete(self, fd: int, msg_id: int) -> None:
        raise OSError(9, "no anonymous fds here")

    def close_fd(self, fd: int) -> None:
        os.close(fd)

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _event(work: Path, text: str) -> None:
    with open(work / "events.log", "a") as f:
        f.write(f"{time.time():.6f} {text}\n")


def stub_worker(spec: WorkerSpec, sock: socket.socket) -> int:
    work = Path(spec.config.dir or ".").parent
    chan = Channel(sock, KINDS_FROM_SUPERVISOR)
    chan.send("prepared")
    msg = chan.receive()
    if msg is None or msg.kind != "serve":
        return 0
    pid = os.getpid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: _event(work, f"hup {pid}"))
    _event(work, f"serving {pid}")
    chan.send("serving")
    while not stop.wait(0.2):
        if not (work / f"wedge-{pid}").exists():
            chan.send("heartbeat", loop_age=0.0, oldest_read=None, objects=1, culling=False)
    _event(work, f"stopped {pid}")
    return 0


def main() -> int:
    work = Path(sys.argv[1])
    opts = json.loads((work / "options.json").read_text())
    configure_logging(1, "json", True)
    set_process("supervisor")
    config = load_config(str(work / "cachefilesd.conf"))
    keeper = DeviceKeeper(
        config,
        open_device=lambda: RecordingDevice(work / "commands.log"),  # type: ignore[arg-type,return-value]
        notifier=Notifier(store=lambda fd, name: False, remove=lambda name: False,
                          enabled=lambda: False),
    )
    keeper.acquire({})
    keeper.can_restore = bool(opts.get("can_restore", True))
    sup = Supervisor(
        config,
        str(work / "cachefilesd.conf"),
        False,
        keeper,
        worker_main=stub_worker,
        limits=Limits(**opts.get("limits", {})),
        budget=CrashBudget(*opts.get("budget", (60, 300.0))),
    )
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
