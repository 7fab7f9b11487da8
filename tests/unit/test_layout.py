"""The cachefiles on-disk layout: paths the real 6.12 kernel made, and the S/T/E name
encodings worked out by hand from the rules in kernel/layout.py's docstring."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.kernel.layout import (
    B64_ALPHABET,
    cookie_hash,
    fanout_dir_name,
    fscache_hash,
    object_file_name,
    object_path,
    volume_dir_name,
    volume_hash,
)


@pytest.mark.parametrize(
    ("volume", "cookie", "expected"),
    [
        # the worked example from a real run (fsid test.img, no domain)
        (b"erofs,test.img", b"test.img", "cache/Ierofs,test.img/@f7/Dtest.img"),
        # committed files seen in this project's guest runs on 6.12
        (b"erofs,img.erofs", b"img.erofs", "cache/Ierofs,img.erofs/@66/Dimg.erofs"),
        (b"erofs,p.erofs", b"p.erofs", "cache/Ierofs,p.erofs/@7f/Dp.erofs"),
        (b"erofs,huge.erofs", b"huge.erofs", "cache/Ierofs,huge.erofs/@a3/Dhuge.erofs"),
        # the OPEN's volume key may still carry its NUL
        (b"erofs,img.erofs\0", b"img.erofs", "cache/Ierofs,img.erofs/@66/Dimg.erofs"),
    ],
)
def test_object_path_matches_the_kernel(volume: bytes, cookie: bytes, expected: str) -> None:
    assert object_path(Path("/c"), volume, cookie) == Path("/c") / expected
    assert object_path("/c", volume, cookie) == Path("/c") / expected


@pytest.mark.parametrize(
    ("key", "name"),
    [
        (b"img.erofs", "Dimg.erofs"),
        (b"!", "D!"),
        (b".", "D."),
        (b"~", "D~"),
        (b"a\x7f", "Da\x7f"),  # DEL counts as printable for cachefiles
        # Hex words. b"\0\0\0\1": BE word 1 costs 1+1, LE 0x01000000 costs 1+7, base64
        # costs 2+4 = 6: big-endian wins.
        (b"\x00\x00\x00\x01", "S1"),
        (b"\x01\x00\x00\x00", "T1"),  # mirror image: little-endian wins
        (b"\x00", "S"),  # one zero word (padded): 1 < 6, tie -> S, zero printed empty
        (b"\x00\x01\x00\x00", "T100"),  # BE 0x10000 costs 6, LE 0x100 costs 4
        (b"/", "T2f"),  # 0x2f000000 costs 9, 0x2f costs 3
        (b" ", "T20"),
        (b"\x00\x00\x00\x01\x00\x00\x00\x02", "S1,2"),  # 4 vs 16 vs 2+3*4 = 14
        (b"\x00\x00\x00\x00\x00\x00\x00\x05", "S,5"),  # a zero word is an empty field
        # Base64: 3 bytes ff ff ff: BE 0xffffff00 costs 9, LE 0x00ffffff costs 7, base64
        # 6 -> E, pad 0, 24 one-bits = four 63s = "----".
        (b"\xff\xff\xff", "E0----"),
        # "a b" = 61 20 62: 24-bit LE value 0x622061; 6-bit pieces from the lowest:
        # 33 'x', 1 '1', 34 'y', 24 'o'.
        (b"a b", "E0x1yo"),
        # 01 02 03 04 05 (padded to two words): BE 0x01020304 + 0x05000000 cost 9+9,
        # LE 0x04030201 + 0x00000005 cost 9+2 = 11; base64 2+2*4 = 10 -> E, pad 1.
        # Group 0x030201: pieces 1 '1', 8 '8', 48 'M', 0 '0'; group 0x0504: 4 '4', 20 'k',
        # 0 '0', 0 '0'.
        (b"\x01\x02\x03\x04\x05", "E118M04k00"),
    ],
)
def test_object_file_names(key: bytes, name: str) -> None:
    assert object_file_name(key) == name


def test_base64_alphabet_order() -> None:
    assert B64_ALPHABET[0] == "0" and B64_ALPHABET[10] == "a" and B64_ALPHABET[36] == "A"
    assert B64_ALPHABET[62:] == "_-" and len(set(B64_ALPHABET)) == 64


@given(st.binary(min_size=1, max_size=255))
def test_names_are_single_path_components(key: bytes) -> None:
    name = object_file_name(key)
    assert "/" not in name and "\0" not in name
    assert name[0] in "DSTE"
    printable = all(0x21 <= b <= 0x7F and b != 0x2F for b in key)
    assert (name[0] == "D") == printable
    if name[0] == "E":
        assert len(name) == 2 + 4 * -(-len(key) // 3)
        assert set(name[2:]) <= set(B64_ALPHABET)


def test_hash_needs_whole_words() -> None:
    with pytest.raises(ValueError):
        fscache_hash(0, b"abc")


def test_hash_of_nothing_is_zero() -> None:
    # no words: x = 0, y = salt = 0, and the fold of zeros is zero
    assert fscache_hash(0, b"") == 0


def test_hashes_are_salted_and_32_bit() -> None:
    v = volume_hash(b"erofs,test.img")
    assert 0 <= v < 2**32
    assert cookie_hash(b"erofs,test.img", b"test.img") == fscache_hash(v, b"test.img")
    assert cookie_hash(b"erofs,x", b"test.img") != cookie_hash(b"erofs,test.img", b"test.img")
    assert fanout_dir_name(b"erofs,test.img", b"test.img") == "@f7"


def test_volume_hash_layout() -> None:
    """length byte + key + at least one NUL, padded to whole words"""
    key = b"abc"  # 1 + 3 + 1 = 5 bytes -> 8
    assert volume_hash(key) == fscache_hash(0, b"\x03abc\0\0\0\0")
    key = b"ab"  # 1 + 2 + 1 = 4 bytes, exactly one word
    assert volume_hash(key) == fscache_hash(0, b"\x02ab\0")


@pytest.mark.parametrize(
    ("volume", "name"),
    [(b"erofs,x", "Ierofs,x"), (b"erofs,x\0", "Ierofs,x"), (b"v\xff", "Iv\udcff")],
)
def test_volume_dir_names(volume: bytes, name: str) -> None:
    assert volume_dir_name(volume) == name


@pytest.mark.parametrize("volume", [b"erofs/x", b"a\0b", b"v" * 255, b"v" * 256])
def test_impossible_volume_keys(volume: bytes) -> None:
    with pytest.raises(ValueError):
        volume_dir_name(volume)


def test_object_path_refuses_names_over_name_max() -> None:
    key = b"\x01" * 200  # not printable: E form of 2 + 67*4 = 270 characters
    assert len(object_file_name(key)) == 270
    with pytest.raises(ValueError):
        object_path(Path("/c"), b"erofs,x", key)
    with pytest.raises(ValueError):
        object_file_name(b"")


def test_object_path_for_an_encoded_name() -> None:
    p = object_path(Path("/c"), b"erofs,x", b"\x00\x00\x00\x01")
    assert p.name == "S1" and p.parent.parent == Path("/c/cache/Ierofs,x")
    assert p.parent.name == fanout_dir_name(b"erofs,x", b"\x00\x00\x00\x01")
