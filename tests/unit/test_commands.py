"""The text commands of /dev/cachefiles: exact bytes, refusals, the threshold order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.kernel import commands

u32 = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (commands.encode_copen(7, 4096), b"copen 7,4096"),
        (commands.encode_copen(0, 0), b"copen 0,0"),
        (commands.encode_copen(2**32 - 1, 2**63 - 1), b"copen 4294967295,9223372036854775807"),
        (commands.encode_copen(8, -2), b"copen 8,-2"),
        (commands.encode_copen(8, -4095), b"copen 8,-4095"),
        (commands.encode_bind(ondemand=True), b"bind ondemand"),
        (commands.encode_bind(ondemand=False), b"bind"),
        (commands.encode_restore(), b"restore"),
        (commands.encode_dir("/var/cache/fscache"), b"dir /var/cache/fscache"),
        (commands.encode_dir(b"/caches/\xff"), b"dir /caches/\xff"),
        (commands.encode_tag("mycache"), b"tag mycache"),
        (
            commands.encode_secctx("system_u:system_r:cachefiles_kernel_t:s0"),
            b"secctx system_u:system_r:cachefiles_kernel_t:s0",
        ),
        (commands.encode_threshold("bcull", 7), b"bcull 7%"),
        (commands.encode_threshold("fstop", 0), b"fstop 0%"),
        (commands.encode_threshold("brun", 99), b"brun 99%"),
        (commands.encode_cull("Dimg.erofs"), b"cull Dimg.erofs"),
        (commands.encode_cull("S1,2"), b"cull S1,2"),
        (commands.encode_inuse("Dimg.erofs"), b"inuse Dimg.erofs"),
    ],
)
def test_command_encodings(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected
    assert b"\n" not in encoded and b"\0" not in encoded


@given(u32, st.integers(-4095, 2**63 - 1))
def test_copen_is_decimal_and_never_zero_padded(msg_id: int, value: int) -> None:
    word, args = commands.encode_copen(msg_id, value).split(b" ")
    assert word == b"copen"
    id_text, size_text = args.split(b",")
    assert int(id_text) == msg_id and int(size_text) == value
    for number in (id_text, size_text.lstrip(b"-")):
        assert number == b"0" or not number.startswith(b"0")


@pytest.mark.parametrize(
    "call",
    [
        lambda: commands.encode_copen(-1, 5),
        lambda: commands.encode_copen(2**32, 5),
        lambda: commands.encode_copen(1, -4096),
        lambda: commands.encode_copen(1, 2**63),
        lambda: commands.encode_cull("a/b"),
        lambda: commands.encode_cull("x\ny"),
        lambda: commands.encode_cull("x\0y"),
        lambda: commands.encode_cull(" Dx"),
        lambda: commands.encode_cull("Dx "),
        lambda: commands.encode_cull(""),
        lambda: commands.encode_cull("."),
        lambda: commands.encode_cull(".."),
        lambda: commands.encode_cull("D" * 256),
        lambda: commands.encode_inuse("a/b"),
        lambda: commands.encode_tag(" padded"),
        lambda: commands.encode_tag("two\nlines"),
        lambda: commands.encode_dir(""),
        lambda: commands.encode_dir("/cache\t"),
        lambda: commands.encode_dir("/" + "d" * 4100),
        lambda: commands.encode_secctx(""),
        lambda: commands.encode_threshold("brun", 100),
        lambda: commands.encode_threshold("brun", -1),
        lambda: commands.encode_threshold("nope", 5),
    ],
)
def test_bad_command_arguments_are_refused(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        call()
