"""The supervisor's process model on the host: real forks, real signals, stub workers.

``tests/integration/supervised.py`` runs the product's supervisor with a recording
stand-in for the device (the host has no ``/dev/cachefiles``); the worker body is a
stub that speaks the control protocol. The real kernel side of the same failovers is
in the guest tests (``tests/vm/test_failover_guest.py``, and under systemd
``tests/vm/test_failover_systemd_guest.py``); the kernel's restore semantics on the
fake and the real kernel are contract cases (``testing/kernel_contract.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def wait_for(cond: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or cond}")


class Run:
    def __init__(self, work: Path, **options: object) -> None:
        self.work = work
        (work / "cache").mkdir()
        self.conf = work / "cachefilesd.conf"
        self.conf.write_text(f"dir {work / 'cache'}\nondemand\nsource * file:///x/{{cookie}}\n")
        (work / "options.json").write_text(json.dumps(options))
        self.log = open(work / "supervisor.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.supervised", str(work)],
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
        )

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in (self.work / "supervisor.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict):
                    out.append(ev)
        return out

    def named(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.events() if e.get("event") == name]

    def serving(self) -> list[int]:
        path = self.work / "events.log"
        if not path.exists():
            return []
        return [int(line.split()[2]) for line in path.read_text().splitlines()
                if line.split()[1] == "serving"]

    def restores(self) -> int:
        """``restore`` writes after the start-up probe."""
        path = self.work / "commands.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return sum(1 for line in lines if line.split(None, 2)[2] == "restore") - 1

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def spares(self) -> list[int]:
        serving = set(self.serving())
        return [p for p in self.children() if p not in serving]

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.log.close()
        return rc


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def make(**options: object) -> Run:
        work = tmp_path / f"run{len(runs)}"
        work.mkdir()
        run = Run(work, **options)
        runs.append(run)
        wait_for(lambda: run.named("ready"), what="ready")
        return run

    yield make
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        run.log.close()


def test_a_killed_worker_is_replaced_by_the_spare_after_restore(
    start: Callable[..., Run],
) -> None:
    run = start()
    for n in range(1, 4):
        wait_for(lambda: run.spares(), what="a spare")
        spare = run.spares()[0]
        wait_for(lambda: any(
            e.get("event") == "worker.prepared" and e.get("worker") == spare  # noqa: B023
            for e in run.events()
        ), what="the spare prepared")
        victim = run.serving()[-1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(run.serving()) == n + 1, what=f"takeover {n}")  # noqa: B023
        assert run.serving()[-1] == spare, "the spare did not take over"
        assert run.restores() == n, "one restore per death"
    deaths = run.named("worker.died")
    assert [d["how"] for d in deaths] == ["killed by SIGKILL"] * 3
    wait_for(lambda: len(run.named("worker.serving")) == 4, what="the last takeover logged")
    takeovers = run.named("worker.serving")[1:]
    assert len(takeovers) == 3 and all("takeover_s" in t for t in takeovers)
    # the restore of each takeover came after the death was noticed and before the
    # new worker served
    restore_times = [
        float(line.split()[0])
        for line in (run.work / "commands.log").read_text().splitlines()
        if line.endswith(" restore")
    ][1:]
    serve_times = [
        float(line.split()[0])
        for line in (run.work / "events.log").read_text().splitlines()
        if line.split()[1] == "serving"
    ][1:]
    assert all(r < s for r, s in zip(restore_times, serve_times, strict=True))
    assert run.stop() == 0


def test_a_wedged_worker_is_killed_and_replaced(start: Callable[..., Run]) -> None:
    run = start(limits={"heartbeat": 1.5, "loop": 1.5, "read": 3.0, "start": 5.0})
    victim = run.serving()[-1]
    (run.work / f"wedge-{victim}").touch()
    wait_for(lambda: len(run.serving()) == 2, what="failover of the wedged worker")
    wedged = run.named("worker.wedged")
    assert wedged and wedged[0]["worker"] == victim
    assert "no heartbeat" in str(wedged[0]["reason"])
    died = run.named("worker.died")[0]
    assert died["how"] == "killed by SIGKILL" and died["killed_because"]
    assert run.restores() == 1
    assert run.stop() == 0


def test_a_dead_spare_is_replaced_without_restore(start: Callable[..., Run]) -> None:
    run = start()
    wait_for(lambda: run.spares(), what="a spare")
    spare = run.spares()[0]
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: run.spares() and run.spares()[0] != spare, what="a new spare")
    assert run.restores() == 0
    assert len(run.serving()) == 1
    assert run.stop() == 0


def test_sigterm_stops_workers_and_exits_zero(start: Callable[..., Run]) -> None:
    run = start()
    wait_for(lambda: run.spares(), what="a spare")
    children = run.children()
    assert len(children) == 2
    assert run.stop() == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(
            f"/proc/{pid}/stat").read_text().split()[2]
    events = (run.work / "events.log").read_text()
    assert f"stopped {run.serving()[0]}" in events, "the serving worker did not stop cleanly"
    assert run.restores() == 0
    assert not run.named("worker.died")


def test_a_crash_loop_ends_the_supervisor(start: Callable[..., Run]) -> None:
    run = start(budget=[2, 60.0])
    for n in range(3):
        wait_for(lambda: len(run.serving()) == n + 1, what="a serving worker")  # noqa: B023
        os.kill(run.serving()[-1], signal.SIGKILL)
    assert run.proc.wait(20) == 1
    assert run.named("supervisor.giving_up")
    assert not run.children()


def test_without_restore_a_worker_death_ends_the_supervisor(start: Callable[..., Run]) -> None:
    run = start(can_restore=False)
    os.kill(run.serving()[-1], signal.SIGKILL)
    assert run.proc.wait(20) == 1
    why = str(run.named("supervisor.giving_up")[0]["why"])
    assert "restore" in why
    assert run.restores() == 0


def test_sighup_checks_the_config_forwards_and_replaces_the_spare(
    start: Callable[..., Run],
) -> None:
    run = start()
    wait_for(lambda: run.spares(), what="a spare")
    old_spare = run.spares()[0]
    good = run.conf.read_text()
    run.conf.write_text(good + "bogus_directive 1\n")
    run.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: run.named("reload.rejected"), what="the rejection")
    assert run.spares() == [old_spare]
    run.conf.write_text(good + "source a/* file:///y/{cookie}\n")
    run.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: run.named("reload.forwarded"), what="the reload")
    worker = run.serving()[0]
    wait_for(lambda: f"hup {worker}" in (run.work / "events.log").read_text(),
             what="SIGHUP at the worker")
    wait_for(lambda: run.spares() and run.spares() != [old_spare], what="a new spare")
    assert run.stop() == 0
