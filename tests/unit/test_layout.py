"""The cachefiles on-disk layout, checked against files the real 6.12 kernel made."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachefilesd_py.kernel.layout import fscache_hash, object_file_name, object_path


@pytest.mark.parametrize(
    ("volume", "cookie", "expected"),
    [
        # seen in shared/vm/README.md
        (b"erofs,test.img", b"test.img", "cache/Ierofs,test.img/@f7/Dtest.img"),
        # seen in this project's guest runs
        (b"erofs,img.erofs", b"img.erofs", "cache/Ierofs,img.erofs/@66/Dimg.erofs"),
        (b"erofs,p.erofs", b"p.erofs", "cache/Ierofs,p.erofs/@7f/Dp.erofs"),
        (b"erofs,huge.erofs", b"huge.erofs", "cache/Ierofs,huge.erofs/@a3/Dhuge.erofs"),
        (b"erofs,img.erofs\0", b"img.erofs", "cache/Ierofs,img.erofs/@66/Dimg.erofs"),
    ],
)
def test_object_path_matches_the_kernel(volume: bytes, cookie: bytes, expected: str) -> None:
    assert object_path(Path("/c"), volume, cookie) == Path("/c") / expected


def test_unprintable_keys_have_no_d_name() -> None:
    assert object_file_name(b"a b") is None
    assert object_file_name(b"a/b") is None
    assert object_file_name(b"\x01") is None
    assert object_path(Path("/c"), b"erofs,x", b"sp ace") is None
    assert object_path(Path("/c"), b"erofs/x", b"ok") is None


def test_hash_needs_whole_words() -> None:
    with pytest.raises(ValueError):
        fscache_hash(0, b"abc")
    assert 0 <= fscache_hash(0, b"") < 2**32
