"""Signal handling of the daemon: handlers only note; the "signals" thread logs and acts.

A handler that logs can deadlock the daemon (it runs in the main thread, maybe while
that thread holds the log stream's write lock), so these tests check *which thread*
logs, not only that something is logged.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.config.load import load_config
from cachefilesd_py.daemon import app


class RecordingLog:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, event: str, **kw: Any) -> None:
        self.calls.append((threading.current_thread().name, event, kw))

    info = warning = error = exception = _record

    def events(self) -> list[str]:
        return [event for _thread, event, _kw in self.calls]


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingLog]:
    rec = RecordingLog()
    monkeypatch.setattr(app, "log", rec)
    saved = {
        s: signal.getsignal(s)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    }
    yield rec
    for s, handler in saved.items():
        signal.signal(s, handler)


def wait_until(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "cachefilesd.conf"
    path.write_text(f"dir {tmp_path}\nondemand\nsource * file:///a/{{cookie}}\n")
    return path


@pytest.fixture
def daemon(conf: Path, recording: RecordingLog) -> Iterator[app.Daemon]:
    """A daemon object with its signal handlers installed (nothing bound)."""
    d = app.Daemon(load_config(str(conf)), str(conf), nocull=False)
    d.install_signals()
    yield d
    d.stop.set()


def test_sighup_reloads_and_sigterm_stops_without_logging_in_the_handler(
    conf: Path, daemon: app.Daemon, recording: RecordingLog
) -> None:
    conf.write_text(
        f"dir {conf.parent}\nondemand\nsource a/* file:///a/{{cookie}}\n"
        "source * file:///b/{cookie}\n"
    )
    signal.raise_signal(signal.SIGHUP)
    assert wait_until(lambda: len(daemon.config.sources) == 2), recording.calls
    signal.raise_signal(signal.SIGTERM)
    assert daemon.stop.is_set()  # the handler ran synchronously
    assert wait_until(lambda: "stopping" in recording.events()), recording.calls
    assert ("signals", "stopping", {"signal": "SIGTERM"}) in recording.calls
    assert all(thread != "MainThread" for thread, _e, _kw in recording.calls), recording.calls


def test_a_broken_config_on_reload_is_rejected_and_kept(
    conf: Path, daemon: app.Daemon, recording: RecordingLog
) -> None:
    before = daemon.config
    conf.write_text(f"dir {conf.parent}\nondemand\nbogus_directive 1\n")
    signal.raise_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload.rejected" in recording.events()), recording.calls
    assert daemon.config is before
