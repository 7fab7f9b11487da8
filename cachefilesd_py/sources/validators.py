"""HTTP validators: which version of a blob an answer is about (pure, no I/O).

A cache file is filled chunk by chunk, minutes or days apart, so every range request
must be *about the version the blob was opened with*, or bytes of two versions end up
in one file. HTTP gives two validators (RFC 9110 §8.8), and this module decides what
each is worth:

- a **strong ETag** (``"…"``) changes whenever the bytes do. Sent back as ``If-Match``:
  the origin answers 412 once the blob changed, and every ``206`` must carry the same
  ETag (a 206 must repeat the ETag a 200 would carry, RFC 9110 §15.3.7).
- a **weak ETag** (``W/"…"``) only promises "semantically equivalent", not the same
  bytes, and ``If-Match`` compares strongly, so sending it fails every READ with 412.
  It is used only as a change detector: an answer with another ETag is refused. It is
  never enough on its own.
- **Last-Modified** has one-second resolution; it is a usable validator only when it
  is at least 60 s older than the answer's ``Date`` (RFC 9110 §8.8.2.2: a blob written
  a minute ago may be written again within the same second and keep its date). It is
  sent back as ``If-Unmodified-Since`` (412 after a change), and a ``206`` must carry
  the very same ``Last-Modified`` when the identity relies on it (an origin may roll a
  blob back to an older copy with an older date, which ``If-Unmodified-Since`` alone
  lets through).

A blob whose origin gives neither a strong ETag nor a usable Last-Modified cannot be
cached safely: nothing would tell a later range of another version. Its identity is
refused (reason ``no-validator``) and the OPEN fails with EIO, with a message that
says why; an origin that has just written the blob is usable once its Last-Modified is
a minute old.

Every parser here is strict and ASCII-only: a header that does not have exactly the
expected form is "absent", never guessed at (``"²".isdigit()`` is true in Python, and
two ``Content-Length`` headers arrive joined by a comma).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from datetime import UTC, datetime

from cachefilesd_py.sources.base import BlobIdentity

#: how much older than ``Date`` a Last-Modified must be to count (RFC 9110 §8.8.2.2)
LAST_MODIFIED_MIN_AGE = 60
#: longer entity tags are refused: the sidecar stores the token (2-byte length), and no
#: real origin needs more (S3's multipart ETags are ~40 characters)
MAX_ETAG_LENGTH = 512

_ETAG = re.compile(r'(W/)?"[\x21\x23-\x7e\x80-\xff]*"')
_DIGITS = re.compile(r"[0-9]{1,20}")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20})")
_MAX_EPOCH = 1 << 40


def parse_etag(value: str | None) -> str | None:
    """The entity tag if ``value`` is exactly one well-formed ``[W/]"…"`` tag."""
    if value is None or len(value) > MAX_ETAG_LENGTH or not _ETAG.fullmatch(value):
        return None
    return value


def is_weak(etag: str) -> bool:
    return etag.startswith("W/")


def weak_equal(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2 weak comparison: the opaque tags match, W/ or not."""
    return a.removeprefix("W/") == b.removeprefix("W/")


def parse_http_date(value: str | None) -> int | None:
    """An HTTP date (IMF-fixdate, or the obsolete forms) as whole epoch seconds."""
    if value is None or not value.isascii() or len(value) > 64:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": no zone information, not an HTTP date
        return None
    try:
        seconds = int(when.timestamp())
    except (OverflowError, OSError, ValueError):
        return None
    return seconds if 0 <= seconds < _MAX_EPOCH else None


def format_http_date(seconds: int) -> str:
    """``seconds`` as an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
    return email.utils.format_datetime(datetime.fromtimestamp(seconds, UTC), True)


def parse_content_length(value: str | None) -> int | None:
    """A Content-Length of ASCII digits only (no sign, no list, no spaces)."""
    if value is None or not _DIGITS.fullmatch(value):
        return None
    return int(value)


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes first-last/total`` with ``first <= last < total``, else None."""
    if value is None:
        return None
    m = _CONTENT_RANGE.fullmatch(value)
    if not m:
        return None
    first, last, total = (int(g) for g in m.groups())
    if not first <= last < total:
        return None
    return first, last, total


def usable_basis(etag: str | None, last_modified: int | None, date: int | None) -> str | None:
    """What a range request can be conditioned on: ``"etag"`` (a strong ETag),
    ``"last-modified"`` (a Last-Modified old enough next to ``date``), or None."""
    if etag is not None and not is_weak(etag):
        return "etag"
    if (
        last_modified is not None
        and date is not None
        and last_modified <= date - LAST_MODIFIED_MIN_AGE
    ):
        return "last-modified"
    return None


def identity_problem(etag: str | None, last_modified: int | None, date: int | None) -> str | None:
    """Why an identity with these validators cannot be cached, or None."""
    if usable_basis(etag, last_modified, date) is not None:
        return None
    if last_modified is not None and date is not None:
        return (
            f"no strong ETag, and Last-Modified ({format_http_date(last_modified)}) is less "
            f"than {LAST_MODIFIED_MIN_AGE} s before Date ({format_http_date(date)}): the "
            "blob may still change within the same second; usable once it is older"
        )
    if etag is not None:
        return "only a weak ETag and no usable Last-Modified: nothing pins the bytes"
    return "no ETag and no Last-Modified: a later range could be of another version"


def conditions(ident: BlobIdentity) -> dict[str, str]:
    """Precondition headers that make the origin refuse (412) a changed blob."""
    headers: dict[str, str] = {}
    if ident.etag is not None and not is_weak(ident.etag):
        headers["If-Match"] = ident.etag
    if ident.last_modified is not None:
        headers["If-Unmodified-Since"] = format_http_date(ident.last_modified)
    return headers


def answer_problem(ident: BlobIdentity, headers: Mapping[str, str]) -> str | None:
    """Why a 206 with these headers may be about another version than ``ident``
    (None: it is about ``ident``). The basis validator must be present and equal;
    any other validator, when present, must agree too."""
    raw_etag = headers.get("ETag")
    etag = parse_etag(raw_etag)
    if raw_etag is not None and etag is None:
        return f"malformed ETag {raw_etag[:80]!r}"
    raw_lm = headers.get("Last-Modified")
    lm = parse_http_date(raw_lm)
    if raw_lm is not None and lm is None:
        return f"malformed Last-Modified {raw_lm[:80]!r}"
    strong = ident.etag is not None and not is_weak(ident.etag)
    if ident.etag is not None and etag is not None:
        same = etag == ident.etag if strong else weak_equal(etag, ident.etag)
        if not same:
            return f"ETag {etag} != {ident.etag}"
    if ident.last_modified is not None and lm is not None and lm != ident.last_modified:
        return f"Last-Modified {raw_lm} != {format_http_date(ident.last_modified)}"
    if strong and etag is None:
        return "the answer has no ETag, the blob was opened with one"
    if not strong and ident.last_modified is not None and lm is None:
        return "the answer has no Last-Modified, the blob was opened with one"
    return None
