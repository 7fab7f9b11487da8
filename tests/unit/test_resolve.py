"""Source rules and hostile keys."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.sources.resolve import SourceResolver

R = SourceResolver(
    [
        SourceRule("img/*", "http://h/{volume}/{cookie}"),
        SourceRule("*", "file:///srv/blobs/{cookie}"),
    ]
)


def test_first_match_wins_and_prefix_is_stripped() -> None:
    assert R.resolve(b"erofs,img\0", b"a.erofs") == "http://h/img/a.erofs"
    assert R.resolve(b"erofs,other", b"b") == "file:///srv/blobs/b"


def test_hostile_keys_are_refused() -> None:
    for cookie in (b"", b".", b"..", b"a b", b"a\0b", b"\xff", b"x" * 300, b"\n"):
        assert R.resolve(b"erofs,v", cookie) is None, cookie
    assert R.resolve(b"erofs,..", b"a") is None


def test_slashes_are_escaped_and_file_paths_stay_inside() -> None:
    assert R.resolve(b"erofs,img", b"a/b") == "http://h/img/a%2Fb"
    # a file:// path is unescaped before it is opened: traversal is refused outright
    assert R.resolve(b"erofs,other", b"../etc/passwd") is None
    assert R.resolve(b"erofs,other", b"sub/ok") == "file:///srv/blobs/sub%2Fok"
    # a key of slashes only would name the directory itself (found by hypothesis)
    for cookie in (b"/", b"//", b"/./", b"x/.."):
        assert R.resolve(b"erofs,other", cookie) is None, cookie


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_any_key_stays_inside_the_template(vol: bytes, cookie: bytes) -> None:
    url = R.resolve(b"erofs," + vol, cookie)
    if url is None:
        return
    if url.startswith("http://h/img/"):
        assert "/" not in url.removeprefix("http://h/img/").split("/", 1)[1]
    else:
        path = os.path.normpath(unquote(urlsplit(url).path))
        assert path.startswith("/srv/blobs/"), url
