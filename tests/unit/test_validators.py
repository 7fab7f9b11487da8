"""HTTP validators (pure): strict parsers, what each validator is worth, the
preconditions sent, and which answers are about the pinned version."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources import validators as v
from cachefilesd_py.sources.base import MAX_BLOB_SIZE, BlobIdentity, check_blob_size

LM = 1_700_000_000
LM_TEXT = "Tue, 14 Nov 2023 22:13:20 GMT"


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ('"abc"', '"abc"'),
        ('W/"abc"', 'W/"abc"'),
        ('""', '""'),
        ("abc", None),  # unquoted
        ('"a"b"', None),
        ('"a", "b"', None),  # two ETag headers, joined by urllib3
        ('w/"a"', None),
        ('"a\x7f"', None),
        ('"' + "x" * 600 + '"', None),
        (None, None),
    ],
)
def test_parse_etag(raw: str | None, want: str | None) -> None:
    assert v.parse_etag(raw) == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("123", 123),
        ("0", 0),
        ("²", None),  # str.isdigit() says yes, int() says no
        ("١٢", None),
        ("+5", None),
        ("5, 5", None),  # two Content-Length headers
        (" 5", None),
        ("1" * 21, None),
        ("", None),
        (None, None),
    ],
)
def test_parse_content_length(raw: str | None, want: int | None) -> None:
    assert v.parse_content_length(raw) == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("bytes 0-0/10", (0, 0, 10)),
        ("bytes 5-9/10", (5, 9, 10)),
        ("bytes 5-10/10", None),
        ("bytes 6-5/10", None),
        ("bytes 0-0/*", None),
        ("bytes */10", None),
        ("bytes ٠-٠/١", None),
        ("items 0-0/10", None),
    ],
)
def test_parse_content_range(raw: str, want: tuple[int, int, int] | None) -> None:
    assert v.parse_content_range(raw) == want


def test_http_dates() -> None:
    assert v.parse_http_date(LM_TEXT) == LM
    assert v.format_http_date(LM) == LM_TEXT
    assert v.parse_http_date("Tuesday, 14-Nov-23 22:13:20 GMT") == LM  # RFC 850 form
    for bad in ("yesterday", "Tue, 14 Nov 2023 22:13:20 -0000", "", "é" * 3, None):
        assert v.parse_http_date(bad) is None, bad


@given(st.text(max_size=80))
def test_parsers_never_raise(text: str) -> None:
    v.parse_etag(text)
    v.parse_http_date(text)
    v.parse_content_length(text)
    v.parse_content_range(text)


def test_what_each_validator_is_worth() -> None:
    date = LM + 3600
    assert v.usable_basis('"s"', None, date) == "etag"
    assert v.usable_basis('W/"w"', LM, date) == "last-modified"
    assert v.usable_basis(None, LM, date) == "last-modified"
    # a Last-Modified less than a minute before Date may still change in its second
    assert v.usable_basis(None, date - 59, date) is None
    assert v.usable_basis(None, date - 60, date) == "last-modified"
    assert v.usable_basis('W/"w"', None, date) is None
    assert v.usable_basis(None, None, date) is None
    assert "weak ETag" in (v.identity_problem('W/"w"', None, date) or "")
    assert "60 s" in (v.identity_problem(None, date - 5, date) or "")
    assert "no ETag and no Last-Modified" in (v.identity_problem(None, None, date) or "")


def test_preconditions_sent() -> None:
    strong = BlobIdentity(10, '"s"', "u", LM)
    assert v.conditions(strong) == {"If-Match": '"s"', "If-Unmodified-Since": LM_TEXT}
    # a weak ETag in If-Match would fail every READ with 412 (strong comparison)
    weak = BlobIdentity(10, 'W/"w"', "u", LM)
    assert v.conditions(weak) == {"If-Unmodified-Since": LM_TEXT}
    assert v.conditions(BlobIdentity(10, None, "u", LM)) == {"If-Unmodified-Since": LM_TEXT}


@pytest.mark.parametrize(
    ("ident", "headers", "ok"),
    [
        (BlobIdentity(1, '"s"', "u"), {"ETag": '"s"'}, True),
        (BlobIdentity(1, '"s"', "u"), {"ETag": '"t"'}, False),
        (BlobIdentity(1, '"s"', "u"), {"ETag": 'W/"s"'}, False),
        (BlobIdentity(1, '"s"', "u"), {}, False),  # a 206 must repeat the ETag
        (BlobIdentity(1, 'W/"w"', "u", LM), {"ETag": '"w"', "Last-Modified": LM_TEXT}, True),
        (BlobIdentity(1, 'W/"w"', "u", LM), {"ETag": 'W/"x"', "Last-Modified": LM_TEXT}, False),
        (BlobIdentity(1, None, "u", LM), {"Last-Modified": LM_TEXT}, True),
        (BlobIdentity(1, None, "u", LM), {}, False),
        (BlobIdentity(1, None, "u", LM), {"Last-Modified": v.format_http_date(LM - 1)}, False),
        (BlobIdentity(1, None, "u", LM), {"Last-Modified": "garbage"}, False),
        (BlobIdentity(1, '"s"', "u", LM), {"ETag": '"s"', "Last-Modified": "x"}, False),
        (BlobIdentity(1, '"s"', "u", LM), {"ETag": '"s"'}, True),
    ],
)
def test_answers_about_another_version_are_refused(
    ident: BlobIdentity, headers: dict[str, str], ok: bool
) -> None:
    assert (v.answer_problem(ident, headers) is None) == ok


def test_tokens_hold_every_validator() -> None:
    assert BlobIdentity(10, None, "u").token() == "10:-:-"
    assert BlobIdentity(10, None, "u", LM).token() == f"10:-:{LM}"
    assert BlobIdentity(10, '"s"', "u", LM).token() == f'10:"s":{LM}'
    # the same size with another Last-Modified is another version
    assert BlobIdentity(10, None, "u", LM).token() != BlobIdentity(10, None, "u", LM + 1).token()


def test_blob_size_is_bounded() -> None:
    assert check_blob_size(MAX_BLOB_SIZE, "u") == MAX_BLOB_SIZE
    for bad in (MAX_BLOB_SIZE + 1, 2 << 50, -1):
        with pytest.raises(SourceError) as e:
            check_blob_size(bad, "u")
        assert e.value.reason == "too-large"
