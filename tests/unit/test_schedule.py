"""Lanes with their own limits: a stalled lane cannot take every worker."""

from __future__ import annotations

import threading

import pytest

from cachefilesd_py.engine.schedule import LaneScheduler, SchedulerClosed

WAIT = 10.0


def test_a_stalled_lane_leaves_workers_for_the_others() -> None:
    s = LaneScheduler("t", workers=4, per_lane=3)
    release = threading.Event()
    stalled_started = threading.Semaphore(0)
    healthy_done = threading.Event()

    def stall() -> None:
        stalled_started.release()
        release.wait(WAIT)

    try:
        for _ in range(10):  # far more than the lane may run at once
            s.submit("slow", stall)
        for _ in range(3):
            assert stalled_started.acquire(timeout=WAIT)
        assert s.lanes()["slow"] == (7, 3)  # three run, seven wait without a worker
        s.submit("fast", healthy_done.set)
        assert healthy_done.wait(WAIT), "the healthy lane found no worker"
        assert not stalled_started.acquire(timeout=0.1), "a fourth stalled item ran"
    finally:
        release.set()
        s.shutdown()
    assert s.held == 0


def test_lanes_take_turns() -> None:
    s = LaneScheduler("t", workers=1, per_lane=1)
    order: list[str] = []
    gate = threading.Event()
    s.submit("a", lambda: gate.wait(WAIT))  # holds the only worker while we queue
    for i in range(3):
        s.submit("a", lambda i=i: order.append(f"a{i}"))
        s.submit("b", lambda i=i: order.append(f"b{i}"))
    gate.set()
    s.shutdown()
    assert order == ["b0", "a0", "b1", "a1", "b2", "a2"] or order == [
        "a0",
        "b0",
        "a1",
        "b1",
        "a2",
        "b2",
    ]


def test_capacity_counts_queued_and_running() -> None:
    s = LaneScheduler("t", workers=1, capacity=3)
    gate = threading.Event()
    started = threading.Event()

    def block() -> None:
        started.set()
        gate.wait(WAIT)

    s.submit("a", block)
    assert started.wait(WAIT)
    s.submit("a", lambda: None)
    assert s.has_room() and s.held == 2
    s.submit("b", lambda: None)
    assert not s.has_room() and not s.wait_room(0.05)
    s.submit("b", lambda: None)  # never refused: the caller decides to stop taking work
    assert s.held == 4
    gate.set()
    assert s.wait_room(WAIT)
    s.shutdown()
    assert s.held == 0 and s.has_room()


def test_a_failing_item_does_not_kill_its_worker() -> None:
    s = LaneScheduler("t", workers=1)
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("bug")

    s.submit("a", boom)
    s.submit("a", done.set)
    assert done.wait(WAIT)
    s.shutdown()


def test_shutdown_runs_queued_work_or_drops_it() -> None:
    ran: list[int] = []
    s = LaneScheduler("t", workers=1)
    gate = threading.Event()
    s.submit("a", lambda: gate.wait(WAIT))
    for i in range(5):
        s.submit("a", lambda i=i: ran.append(i))
    gate.set()
    s.shutdown()
    assert ran == [0, 1, 2, 3, 4]
    with pytest.raises(SchedulerClosed):
        s.submit("a", lambda: None)

    ran.clear()
    s = LaneScheduler("t", workers=1)
    gate = threading.Event()
    started = threading.Event()
    s.submit("a", lambda: (started.set(), gate.wait(WAIT)))
    assert started.wait(WAIT)
    for i in range(5):
        s.submit("a", lambda i=i: ran.append(i))
    threading.Timer(0.2, gate.set).start()
    s.shutdown(cancel=True)
    assert ran == [] and s.held == 0


def test_default_lane_limit_leaves_a_quarter() -> None:
    assert LaneScheduler("t", workers=1).per_lane == 1
    assert LaneScheduler("t", workers=2).per_lane == 1
    assert LaneScheduler("t", workers=4).per_lane == 3
    assert LaneScheduler("t", workers=8).per_lane == 6
