"""Every fuzz harness (``fuzz/fuzz_<name>.py``), run briefly and deterministically:
on its whole seed corpus, then on inputs hypothesis derives from it (bytes flipped,
inserted, deleted, duplicated, spliced, integers planted) and on plain random bytes.
A harness raises only when the code under test broke its contract, so any exception
fails the test with the input that caused it. Harnesses added later are picked up by
name. The long coverage-guided runs are ``python -m fuzz <name>`` (docs/security.md)."""

from __future__ import annotations

import importlib
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

REPO = Path(__file__).resolve().parents[2]
FUZZ = REPO / "fuzz"
HARNESSES = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))
#: hypothesis-derived inputs per harness: with the corpus, a few seconds each. A harness
#: may ask for fewer with ``CI_EXAMPLES`` (one whose inputs cost a network deadline each)
EXAMPLES = 500


def load(name: str) -> ModuleType:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(f"fuzz.fuzz_{name}")


def corpus(name: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((FUZZ / "corpus" / name).iterdir()) if p.is_file()]


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """Harnesses make the code log its misses; keep them out of the output."""
    with capture_logs():
        yield
    structlog.reset_defaults()


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], max_len: int, tokens: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 7 if tokens else 6))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:  # change one byte
            pos = min(pos, len(data) - 1)
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:  # insert bytes
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == 2:  # delete a range
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == 3 and data:  # duplicate a range
            end = draw(st.integers(pos, len(data)))
            data[end:end] = data[pos:end]
        elif op == 4:  # splice in part of another seed
            other = draw(st.sampled_from(seeds))
            cut = draw(st.integers(0, len(other)))
            data = data[:pos] + other[cut:]
        elif op == 5:  # plant an interesting integer
            value = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 2**31, 2**32 - 1]))
            width = draw(st.sampled_from(["<B", "<H", "<I", "<Q"]))
            packed = struct.pack(width, value & (256 ** struct.calcsize(width) - 1))
            data[pos : pos + len(packed)] = packed
        elif op == 6:  # truncate
            del data[pos:]
        elif op == 7:  # insert one of the harness's dictionary tokens
            data[pos:pos] = draw(st.sampled_from(tokens))
    return bytes(data[:max_len])


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_accepts_its_whole_corpus(name: str) -> None:
    harness, seeds = load(name), corpus(name)
    assert seeds, f"fuzz/corpus/{name}/ is empty: seed it with valid inputs"
    for data in seeds:
        harness.TestOneInput(data)


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_on_derived_and_random_inputs(name: str) -> None:
    harness, seeds = load(name), corpus(name)
    max_len = getattr(harness, "MAX_LEN", 4096)
    examples = getattr(harness, "CI_EXAMPLES", EXAMPLES)
    tokens = [t for t in getattr(harness, "TOKENS", ()) if t]
    inputs = st.one_of(mutated(seeds, max_len, tokens), st.binary(max_size=min(max_len, 512)))
    check: Callable[[bytes], None] = harness.TestOneInput

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def run(data: bytes) -> None:
        check(data)

    run()


def test_the_runner_fuzzes_a_harness_with_atheris(tmp_path: Path) -> None:
    """``python -m fuzz`` itself: a few thousand coverage-guided inputs, clean exit,
    libFuzzer's final statistics printed."""
    pytest.importorskip("atheris")
    run = subprocess.run(
        [sys.executable, "-m", "fuzz", "classic_state", "--runs", "3000", "--work", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stat::number_of_executed_units: 3000" in run.stderr
    assert "INFO: Instrumenting cachefilesd_py.frontends.classic.commands" in run.stderr
