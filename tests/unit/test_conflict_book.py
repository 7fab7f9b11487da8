"""The conflict book's transitions (engine/conflicts.py) and version tokens read back
(``BlobIdentity.from_token``): tables and hypothesis, no I/O but the book's file."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.engine.conflicts import (
    UNKNOWN,
    Conflict,
    ConflictBook,
    Resolution,
    decode,
    encode,
)
from cachefilesd_py.sources.base import BlobIdentity

A, B, C = '10:"a":5', '12:"b":6', '14:"c":7'


def book(tmp_path: Path | None = None) -> tuple[ConflictBook, list[Conflict]]:
    seen: list[Conflict] = []
    return ConflictBook(tmp_path, on_found=seen.append, clock=lambda: 100.0), seen


def test_found_once_per_pair_of_versions() -> None:
    b, seen = book()
    assert b.found("v/x", A, A) is None  # the same version is no conflict
    first = b.found("v/x", A, B)
    assert first == Conflict("v/x", A, B, 100.0) and seen == [first]
    assert b.found("v/x", A, B) is None and b.found("v/x", A, UNKNOWN) is None
    third = b.found("v/x", A, C)  # the origin moved again: news
    assert third is not None and third.upstream == C and len(seen) == 2
    assert b.needing_attention() == 1


def test_unknown_upstream_is_refined_without_a_second_signal() -> None:
    b, seen = book()
    b.found("v/x", A, UNKNOWN)
    assert b.found("v/x", A, B) is None
    assert b.get("v/x") == Conflict("v/x", A, B, 100.0) and len(seen) == 1


@pytest.mark.parametrize(
    ("how", "again", "reported"),
    [
        (Resolution.KEEP, B, False),  # kept: the same versions are not news
        (Resolution.KEEP, C, True),  # a third version is
        (Resolution.REFETCH, B, False),
        (Resolution.REFETCH, C, False),  # refetch takes whatever the origin has
    ],
)
def test_resolutions(how: Resolution, again: str, reported: bool) -> None:
    b, seen = book()
    b.found("v/x", A, B)
    done = b.resolve("v/x", how)
    assert done.resolution is how and b.needing_attention() == 0
    assert done.in_force == (None if how is Resolution.REFETCH else A)
    assert (b.found("v/x", A, again) is not None) is reported
    assert len(seen) == 1 + reported


def test_resolve_unknown_or_open_is_refused() -> None:
    b, _ = book()
    with pytest.raises(KeyError):
        b.resolve("v/none", Resolution.KEEP)
    b.found("v/x", A, B)
    with pytest.raises(ValueError, match="keep or refetch"):
        b.resolve("v/x", Resolution.OPEN)


def test_kept_on_disk_and_a_corrupt_file_is_an_empty_book(tmp_path: Path) -> None:
    b, _ = book(tmp_path)
    b.found("v/x", A, B)
    b.resolve("v/x", Resolution.KEEP)
    b.found("v/y", B, C)
    again = ConflictBook(tmp_path)
    assert again.all() == b.all()
    b.forget("v/y", "test")
    assert [c.blob for c in ConflictBook(tmp_path).all()] == ["v/x"]
    (tmp_path / "conflicts.json").write_bytes(b'{"version": 1, "conflicts": [{"blob": 1}]}')
    assert ConflictBook(tmp_path).all() == []
    (tmp_path / "conflicts.json").write_bytes(b"\xff")
    assert ConflictBook(tmp_path).all() == []


def test_a_failing_notifier_does_not_fail_the_finder() -> None:
    def broken(_c: Conflict) -> None:
        raise RuntimeError("bus gone")

    b = ConflictBook(on_found=broken)
    assert b.found("v/x", A, B) is not None


@given(
    st.integers(0, 1 << 44),
    st.one_of(st.none(), st.text(min_size=1, max_size=40).filter(lambda t: t != "-")),
    st.one_of(st.none(), st.integers(0, 1 << 40)),
)
def test_identity_token_round_trip(size: int, etag: str | None, lm: int | None) -> None:
    ident = BlobIdentity(size, etag, "http://o/b", lm)
    assert BlobIdentity.from_token(ident.token(), "http://o/b") == ident


@pytest.mark.parametrize("token", ["", "x", "1:2", "a:b:c", "-1:e:-", "1::-", "1:e:x"])
def test_not_a_token(token: str) -> None:
    assert BlobIdentity.from_token(token, "u") is None


@given(st.lists(st.tuples(st.text(max_size=8), st.sampled_from([A, B, C]))))
def test_encode_decode(items: list[tuple[str, str]]) -> None:
    conflicts = {n: Conflict(n, A, up, 1.5, Resolution.KEEP) for n, up in items}
    assert decode(encode(conflicts)) == conflicts


def test_a_disabled_book_records_nothing(tmp_path: Path) -> None:
    b = ConflictBook(tmp_path, enabled=False)
    assert b.found("v/x", A, B) is None and b.all() == []
    assert not (tmp_path / "conflicts.json").exists()
