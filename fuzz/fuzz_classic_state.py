"""The classic-mode state line (``read()`` of a classically bound device) → a
``CacheState``: never an exception, and a value is taken only in the form the kernel
writes it (``name=`` and lowercase hex digits, ``%llx``); any other word is reported as
malformed, none is silently dropped."""

from __future__ import annotations

import re

from cachefilesd_py.frontends.classic.commands import CacheState, parse_state

MAX_LEN = 1024
TOKENS = tuple(
    f"{name}=".encode()
    for name in (
        "cull",
        "frun",
        "fcull",
        "fstop",
        "brun",
        "bcull",
        "bstop",
        "freleased",
        "breleased",
    )
)
TOKEN = re.compile(r"([^=]+)=([0-9a-f]+)")


def TestOneInput(data: bytes) -> None:
    state = parse_state(data)
    assert isinstance(state, CacheState)
    assert state.cull == (state.values.get("cull", 0) != 0)
    for word in data.decode("ascii", "replace").split():
        taken = TOKEN.fullmatch(word)
        if taken is None:
            assert word in state.malformed, word
        else:
            assert word not in state.malformed and taken[1] in state.values, word
    for name, value in state.values.items():
        assert isinstance(value, int) and value >= 0, (name, value)
