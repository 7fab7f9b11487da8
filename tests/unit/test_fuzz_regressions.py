"""One test per defect the fuzzers found (``fuzz/``, docs/security.md), each with the
input that showed it, minimised by hand."""

from __future__ import annotations

import pytest

from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.errors import ConfigError
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


@pytest.mark.parametrize("suffix", ["\u212a", "\u212aiB"])  # KELVIN SIGN, which folds to k
def test_a_size_with_a_unicode_case_fold_of_a_unit_is_a_config_error(suffix: str) -> None:
    """fuzz_config: the case-insensitive size pattern matched U+212A as ``K``, then
    ``UNITS[suffix.upper()]`` raised KeyError out of the parser."""
    with pytest.raises(ConfigError, match=r"c\.conf:2: readahead: .* is not a size"):
        parse_config(f"dir /c\nreadahead 4{suffix}\n", "c.conf")


@pytest.mark.parametrize("mask", ["-1", "+5", "1_0", "\u0661\u0662"])
def test_a_debug_mask_the_kernel_cannot_take_is_a_config_error(mask: str) -> None:
    """fuzz_config: ``int(text, 0)`` took signs, ``_`` and non-ASCII digits, so
    ``--check-config`` passed what ``debug`` cannot carry (issue 10 item 12 names
    ``debug -1``)."""
    with pytest.raises(ConfigError, match=r"c\.conf:2: debug: "):
        parse_config(f"dir /c\ndebug {mask}\n", "c.conf")


@pytest.mark.parametrize(("mask", "kept"), [("0x1ffffffff", 2**32 - 1), ("4294967296", 0)])
def test_a_debug_mask_above_32_bits_is_kept_as_the_kernel_keeps_it(mask: str, kept: int) -> None:
    """The kernel reads the mask with ``simple_strtoul`` into an ``unsigned int``: it
    takes such a line and keeps the low 32 bits, and cachefilesd passes it on, so a
    drop-in does the same (docs/config-compat.md); the command sent is that mask."""
    assert parse_config(f"dir /c\ndebug {mask}\n", "c.conf").debug == kept


@pytest.mark.parametrize(
    ("mask", "value"), [("0", 0), ("7", 7), ("0x1F", 31), ("4294967295", 2**32 - 1)]
)
def test_debug_masks_the_kernel_takes_still_parse(mask: str, value: int) -> None:
    assert parse_config(f"dir /c\ndebug {mask}\n", "c.conf").debug == value
