"""The blob key: its derived names, and the on-demand cache path both ways, checked
against kernel/layout.py (which is checked against paths the real kernel made)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.kernel.layout import (
    NAME_MAX,
    cookie_key_of_name,
    object_file_name,
    object_path,
    volume_dir_name,
)
from cachefilesd_py.presence import format as sidecar_format

#: volume keys the kernel can make a directory of: no NUL, no "/", I + key <= NAME_MAX
volume_keys = st.binary(min_size=1, max_size=NAME_MAX - 1).filter(
    lambda k: b"\0" not in k and b"/" not in k
)
#: cookie keys as an OPEN may carry them (1..255 bytes, any byte)
cookie_keys = st.binary(min_size=1, max_size=255)


def storable(volume: bytes, cookie: bytes) -> bool:
    try:
        object_path("/c", volume, cookie)
    except ValueError:
        return False
    return True


def test_derived_names() -> None:
    key = BlobKey.ondemand(b"erofs,imgs\0", b"a.img")
    assert key == BlobKey(b"erofs,imgs", b"a.img") == BlobKey.named("imgs", "a.img")
    assert key.volume == b"imgs"
    assert key.match_name == "imgs/a.img"
    assert str(key) == "erofs,imgs/a.img"
    assert BlobKey(b"nfs,4.2,x", b"\xff").match_name == "nfs,4.2,x/\\xff"
    # the sidecar format names blobs by this digest: it must never change
    assert key.digest == hashlib.sha256(b"erofs,imgs\0a.img").digest()
    assert key.digest == sidecar_format.key_digest((b"erofs,imgs", b"a.img"))


@pytest.mark.parametrize(
    ("cookie", "name"),
    [
        (b"img.erofs", "Dimg.erofs"),
        (b"sub/img", "E2PlDoLAmrD100"),
        (b"/", "T2f"),
        (b" ", "T20"),
        (b"\x00\x00\x00\x01", "S1"),
        (b"\x01\x02\x03\x04\x05", "E118M04k00"),
        (b"a b", "E0x1yo"),
    ],
)
def test_cache_names_back_to_cookies(cookie: bytes, name: str) -> None:
    assert object_file_name(cookie) == name
    assert cookie_key_of_name(name) == cookie
    key = BlobKey(b"erofs,v", cookie)
    path = key.cache_path("/c")
    assert path.name == name
    assert BlobKey.from_cache_path(path.parent.parent.name, path.name) == key


@pytest.mark.parametrize(
    "name",
    ["", "D", "X1", "S0", "S01", "Sg", "S123456789", "E", "E0", "E3abcd", "E0abc", "E0a!cd", "D/x"],
)
def test_names_no_cookie_makes(name: str) -> None:
    assert cookie_key_of_name(name) is None


def test_volume_dir_back_to_key() -> None:
    assert BlobKey.from_cache_path("Ierofs,x", "Dimg") == BlobKey(b"erofs,x", b"img")
    assert BlobKey.from_cache_path("@00", "Dimg") is None
    assert BlobKey.from_cache_path("I", "Dimg") is None
    assert BlobKey.from_cache_path("Ierofs,x", "graveyard") is None


@given(volume_keys, cookie_keys)
def test_cache_path_round_trip(volume: bytes, cookie: bytes) -> None:
    """Every key the kernel can store maps to layout's path, and that path maps back
    to the key, unless the cookie ends in NUL: S/T names do not record the padding,
    so such keys share a file with a shorter key (the kernel cannot tell them apart
    either), and that shorter key, whose path is the same, comes back."""
    assume(storable(volume, cookie))
    key = BlobKey(volume, cookie)
    path = key.cache_path(Path("/c"))
    assert path == object_path(Path("/c"), volume, cookie)
    assert path.parent.parent.name == volume_dir_name(volume)
    back = BlobKey.from_cache_path(path.parent.parent.name, path.name)
    assert back is not None
    assert back.cache_path(Path("/c")) == path
    if not cookie.endswith(b"\0"):
        assert back == key
    else:
        assert cookie.startswith(back.name) and set(cookie[len(back.name) :]) <= {0}


@given(st.text(min_size=1, max_size=40))
def test_any_name_decodes_to_a_key_that_names_it_or_to_nothing(name: str) -> None:
    cookie = cookie_key_of_name(name)
    if cookie is not None:
        assert object_file_name(cookie) == name
