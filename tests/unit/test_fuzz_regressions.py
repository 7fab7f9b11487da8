"""One test per defect the fuzzers found (``fuzz/``, docs/security.md), each with the
input that showed it, minimised by hand."""

from __future__ import annotations

import pytest

from cachefilesd_py.frontends.classic.commands import parse_state


@pytest.mark.parametrize(
    "word",
    ["cull=0A", "bcull=14A8", "frun=-1", "fcull=+5", "brun=0x1e3c", "bstop=1_0", "bcull= 5"],
)
def test_classic_state_takes_only_the_kernels_lowercase_hex(word: str) -> None:
    """fuzz_classic_state: ``int(value, 16)`` also took upper case, signs, ``0x`` and
    ``_``; ``frun=-1`` became a negative threshold. The kernel writes ``%llx``."""
    state = parse_state(b"cull=1 " + word.encode() + b" fstop=a")
    name = word.partition("=")[0]
    assert state.cull and state.get("fstop") == 10
    assert name == "cull" or name not in state.values
    assert word.split()[0] in state.malformed
