"""Source rules and hostile keys: a key fills one path segment, never more."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.sources.resolve import ResolvedUrl, SourceResolver, key_problem

R = SourceResolver(
    [
        SourceRule("img/*", "http://h/{volume}/{cookie}"),
        SourceRule("q/*", "https://h:8443/get?vol={volume}&blob={cookie}"),
        SourceRule("*", "file:///srv/blobs/{cookie}"),
    ]
)


def test_first_match_wins_and_prefix_is_stripped() -> None:
    assert R.resolve(b"erofs,img\0", b"a.erofs") == "http://h/img/a.erofs"
    assert R.resolve(b"erofs,other", b"b") == "file:///srv/blobs/b"
    assert R.resolve(b"erofs,q", b"x") == "https://h:8443/get?vol=q&blob=x"


def test_real_names_are_accepted() -> None:
    nydus = b"0123456789abcdef" * 4  # a nydus blob id: 64 hex digits
    for key in (nydus, b"img.erofs", b"sha256:" + nydus, b"base-1.2+x86_64", b"A", b"9"):
        assert key_problem(key) is None, key
    assert R.resolve(b"erofs,img", b"sha256:ab") == "http://h/img/sha256%3Aab"


def test_hostile_keys_are_refused() -> None:
    hostile = (
        b"", b".", b"..", b".hidden", b"a b", b"a\0b", b"\xff", b"x" * 256, b"\n",
        b"a/b", b"../private/secret.img", b"..%2Fprivate", b"a%2Fb", b"a\\..\\b",
        b"..;", b"a;b", b"~root", b"a?b", b"a#b", b"-flag", b"_x", b"a@b", b"a=b",
    )  # fmt: skip
    for key in hostile:
        assert key_problem(key) is not None, key
        assert R.resolve(b"erofs,v", key) is None, key
        assert R.resolve(b"erofs," + key, b"a") is None, key


def test_file_urls_carry_their_base() -> None:
    url = R.resolve(b"erofs,other", b"blob.img")
    assert isinstance(url, ResolvedUrl)
    assert url.beneath == "/srv/blobs"
    layered = SourceResolver([SourceRule("*", "file:///srv/{volume}/img-{cookie}")])
    url = layered.resolve(b"erofs,v1", b"c")
    assert url == "file:///srv/v1/img-c"
    assert isinstance(url, ResolvedUrl) and url.beneath == "/srv"
    http = R.resolve(b"erofs,img", b"a")
    assert isinstance(http, ResolvedUrl) and http.beneath is None


_SEGMENT = re.compile(r"[A-Za-z0-9._%-]+")


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_any_key_fills_exactly_one_segment(vol: bytes, cookie: bytes) -> None:
    url = R.resolve(b"erofs," + vol, cookie)
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme == "http":
        assert parts.netloc == "h"
        segments = parts.path.split("/")
        assert len(segments) == 4 and segments[1] == "img", url
        assert all(_SEGMENT.fullmatch(s) for s in segments[2:]), url
        # nothing a server could decode into '/', '\\' or a dot segment
        for s in segments[2:]:
            decoded = unquote(s)
            assert "/" not in decoded and "\\" not in decoded and not decoded.startswith(".")
    elif parts.scheme == "file":
        path = unquote(parts.path)
        assert os.path.dirname(path) == "/srv/blobs" and os.path.normpath(path) == path, url
