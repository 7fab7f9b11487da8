"""How a kernel-driven classic pass sizes its table and when it reads the state (pure)."""

from __future__ import annotations

import pytest

from cachefilesd_py.frontends.classic.driver import MAX_TABLE, STATE_EVERY, KernelGate, table_for
from cachefilesd_py.space.plan import Outcome, Tally


@pytest.mark.parametrize(
    ("need_bytes", "need_files", "mean", "floor", "table"),
    [
        (0, 0, 16384, 4096, 4096),  # nothing known to be missing: the culltable
        (80 << 20, 0, 16384, 4096, 10240),  # 5,120 objects of 16 KiB, doubled
        (80 << 20, 9000, 16384, 4096, 18000),  # the files are what is missing most
        (1 << 40, 0, 4096, 4096, MAX_TABLE),  # bounded memory, whatever is missing
        (100, 0, 16384, 16, 16),
    ],
)
def test_table_for(need_bytes: int, need_files: int, mean: int, floor: int, table: int) -> None:
    assert table_for(need_bytes, need_files, mean, floor) == table


class State:
    def __init__(self, clears_after: int) -> None:
        self.reads = 0
        self.clears_after = clears_after

    def __call__(self) -> bool:
        self.reads += 1
        return self.reads < self.clears_after


def cull(tally: Tally, n: int, size: int) -> None:
    tally.counts[Outcome.CULLED] += n
    tally.freed_bytes += n * size


def test_gate_reads_the_state_only_once_the_need_may_be_met() -> None:
    state = State(clears_after=10**9)
    gate = KernelGate(state, need_bytes=100 * 16384, need_files=0)
    gate.tally = Tally()
    for _ in range(STATE_EVERY - 1):  # well below the need: no read
        assert gate()
        cull(gate.tally, 1, 16384)
    assert state.reads == 0
    assert gate()  # a read every STATE_EVERY objects all the same
    assert state.reads == 1
    cull(gate.tally, 100 - (STATE_EVERY - 1), 16384)  # the need is met: a read every time
    for i in range(5):
        assert gate()
        assert state.reads == 2 + i


def test_gate_needs_both_bytes_and_files() -> None:
    state = State(clears_after=10**9)
    gate = KernelGate(state, need_bytes=16384, need_files=10)
    gate.tally = Tally()
    cull(gate.tally, 5, 1 << 20)  # bytes done, files not
    for _ in range(STATE_EVERY - 1):
        assert gate()
    assert state.reads == 0
    cull(gate.tally, 5, 1)
    gate()
    assert state.reads == 1


def test_gate_stops_when_the_kernel_clears_its_flag() -> None:
    state = State(clears_after=3)
    gate = KernelGate(state, need_bytes=0, need_files=0)  # unknown: read every time
    gate.tally = Tally()
    assert [gate() for _ in range(3)] == [True, True, False]
    assert state.reads == 3 == gate.reads
