"""The control protocol (``control/schema.py``): tables of requests and their answers,
hypothesis over arbitrary bytes and JSON, access rules, the presence map folding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.control.presence_map import EMPTY, FULL, LEGEND, draw, fold, glyph
from cachefilesd_py.control.schema import (
    MAX_REQUEST_BYTES,
    OPERATIONS,
    PROTOCOL_VERSION,
    ControlError,
    ErrorCode,
    Peer,
    Progress,
    Reply,
    authorize,
    encode_error,
    encode_progress,
    encode_request,
    encode_result,
    parse_reply,
    parse_request,
)


def line(doc: object) -> bytes:
    return json.dumps(doc).encode() + b"\n"


VALID = [
    ({"v": 1, "op": "status"}, "status", {}),
    ({"v": 1, "op": "status", "args": {}}, "status", {}),
    ({"v": 1, "op": "blobs", "args": {"limit": 5}}, "blobs", {"limit": 5}),
    ({"v": 1, "op": "blobs"}, "blobs", {"limit": 0}),
    (
        {"v": 1, "op": "show", "args": {"blob": "erofs,a/b"}},
        "show",
        {"blob": "erofs,a/b", "width": 64},
    ),
    (
        {"v": 1, "op": "prefetch", "args": {"blob": "v/c", "offset": 4096}},
        "prefetch",
        {"blob": "v/c", "offset": 4096, "length": 0},
    ),
    ({"v": 1, "op": "cull_plan"}, "cull_plan", {}),
    ({"v": 1, "op": "reload"}, "reload", {}),
]


@pytest.mark.parametrize(("doc", "op", "args"), VALID)
def test_valid_requests(doc: dict[str, object], op: str, args: dict[str, object]) -> None:
    req = parse_request(line(doc))
    assert req.op == op
    assert dict(req.args) == args


INVALID: list[tuple[bytes, ErrorCode]] = [
    (b"", ErrorCode.MALFORMED),
    (b"\n", ErrorCode.MALFORMED),
    (b"status\n", ErrorCode.MALFORMED),
    (b"\xff\xfe{}\n", ErrorCode.MALFORMED),
    (b"[1, 2]\n", ErrorCode.MALFORMED),
    (line({"op": "status"}), ErrorCode.MALFORMED),  # no version
    (line({"v": "1", "op": "status"}), ErrorCode.MALFORMED),
    (line({"v": True, "op": "status"}), ErrorCode.MALFORMED),
    (line({"v": 2, "op": "status"}), ErrorCode.UNSUPPORTED_VERSION),
    (line({"v": 0, "op": "status"}), ErrorCode.UNSUPPORTED_VERSION),
    (line({"v": 1}), ErrorCode.MALFORMED),
    (line({"v": 1, "op": 7}), ErrorCode.MALFORMED),
    (line({"v": 1, "op": "rm -rf"}), ErrorCode.UNKNOWN_OP),
    (line({"v": 1, "op": "status", "extra": 1}), ErrorCode.MALFORMED),
    (line({"v": 1, "op": "status", "args": []}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "status", "args": {"x": 1}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "show", "args": {}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "show", "args": {"blob": ""}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "show", "args": {"blob": "a\0b"}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "show", "args": {"blob": "x" * 600}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "show", "args": {"blob": 5}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "show", "args": {"blob": "a/b", "width": 3}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "blobs", "args": {"limit": True}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "blobs", "args": {"limit": -1}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "blobs", "args": {"limit": 1.5}}), ErrorCode.BAD_ARGS),
    (line({"v": 1, "op": "blobs", "args": {"limit": 2**64}}), ErrorCode.BAD_ARGS),
    (b'{"v": 1, "op": "status", "op": "reload"}\n', ErrorCode.MALFORMED),  # duplicate key
    (b'{"v": NaN, "op": "status"}\n', ErrorCode.MALFORMED),
    (b'{"v": 1, "op": "status"}\n{"v": 1, "op": "reload"}\n', ErrorCode.MALFORMED),
    (b'{"v": 1, "op": "status", "args": {"a": [[[[[1]]]]]}}\n', ErrorCode.MALFORMED),
    (b"[" * 3000 + b"]" * 3000, ErrorCode.MALFORMED),
    (b"{" + b" " * MAX_REQUEST_BYTES + b"}\n", ErrorCode.TOO_LARGE),
]


@pytest.mark.parametrize(("raw", "code"), INVALID)
def test_invalid_requests(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(ControlError) as e:
        parse_request(raw)
    assert e.value.code is code
    assert e.value.message


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2 * MAX_REQUEST_BYTES))
def test_any_bytes_parse_or_control_error(raw: bytes) -> None:
    try:
        req = parse_request(raw)
    except ControlError:
        return
    assert req.op in OPERATIONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 2, "1"]), "op": st.sampled_from([*OPERATIONS, "x"])},
        optional={
            "args": st.dictionaries(
                st.sampled_from(["blob", "limit", "width", "offset", "length", "z"]), json_values
            )
        },
    )
)
def test_json_requests_parse_or_control_error(doc: dict[str, object]) -> None:
    try:
        req = parse_request(line(doc))
    except ControlError as err:
        assert err.code in ErrorCode
        return
    # what parses was well-typed: every argument of the table present, of its type
    for name, spec in req.operation.args.items():
        assert type(req.args[name]) is spec.kind or (req.args[name] is None and not spec.required)


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=100).filter(lambda s: "\0" not in s),
    st.integers(0, 2**62),
    st.integers(0, 2**62),
)
def test_encode_request_round_trips(blob: str, offset: int, length: int) -> None:
    raw = encode_request("prefetch", blob=blob, offset=offset, length=length)
    req = parse_request(raw)
    assert dict(req.args) == {"blob": blob, "offset": offset, "length": length}


def test_encode_request_checks_like_the_daemon() -> None:
    with pytest.raises(ControlError) as e:
        encode_request("show", blob="")
    assert e.value.code is ErrorCode.BAD_ARGS
    with pytest.raises(ControlError):
        encode_request("nope")


def test_replies_round_trip() -> None:
    assert parse_reply(encode_result({"a": [1, 2]})) == Reply(True, {"a": [1, 2]})
    assert parse_reply(encode_result({"x": float("nan")})) == Reply(True, {"x": None})
    err = parse_reply(encode_error(ControlError(ErrorCode.FORBIDDEN, "no")))
    assert isinstance(err, Reply) and not err.ok
    assert err.error is not None and err.error.code is ErrorCode.FORBIDDEN
    assert parse_reply(encode_progress({"done": 1})) == Progress({"done": 1})
    for bad in (b"{}", b"nope", line({"v": PROTOCOL_VERSION}), line({"v": 9, "ok": True})):
        with pytest.raises(ControlError):
            parse_reply(bad)


def test_unknown_error_code_from_a_newer_daemon_is_kept_as_internal() -> None:
    reply = parse_reply(line({"v": 1, "ok": False, "error": {"code": "new", "message": "m"}}))
    assert isinstance(reply, Reply) and reply.error is not None
    assert reply.error.code is ErrorCode.INTERNAL and reply.error.message == "m"


ROOT = Peer(1, 0, 0)
MEMBER = Peer(2, 1000, 1000, frozenset({50}))
PRIMARY = Peer(3, 1001, 50)
STRANGER = Peer(4, 1002, 1002, frozenset({7}))

ACCESS = [
    # (peer, read group, op, allowed)
    (ROOT, None, "reload", True),
    (ROOT, None, "status", True),
    (MEMBER, 50, "status", True),
    (MEMBER, 50, "show", True),
    (MEMBER, 50, "cull_plan", True),
    (MEMBER, 50, "metrics", True),
    (MEMBER, 50, "cull", False),
    (MEMBER, 50, "prefetch", False),
    (MEMBER, 50, "reload", False),
    (PRIMARY, 50, "blobs", True),
    (PRIMARY, 50, "reload", False),
    (STRANGER, 50, "status", False),
    (MEMBER, None, "status", False),
    (MEMBER, 51, "status", False),
]


@pytest.mark.parametrize(("peer", "gid", "op", "allowed"), ACCESS)
def test_access_rules(peer: Peer, gid: int | None, op: str, allowed: bool) -> None:
    if allowed:
        authorize(OPERATIONS[op], peer, gid)
        return
    with pytest.raises(ControlError) as e:
        authorize(OPERATIONS[op], peer, gid)
    assert e.value.code is ErrorCode.FORBIDDEN
    assert f"uid {peer.uid}" in e.value.message


def test_every_mutating_operation_is_root_only() -> None:
    mutating = {name for name, op in OPERATIONS.items() if op.mutating}
    assert mutating == {
        "cull",
        "prefetch",
        "reload",
        "pin",
        "unpin",
        "offline_policy",
        "credentials_reload",
        "resolve",
    }


# -- presence map --------------------------------------------------------------------


def bits_of(present: set[int], n: int) -> bytes:
    out = bytearray((n + 7) // 8)
    for i in present:
        out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def test_fold_table() -> None:
    assert fold(b"", 0, 10) == []
    assert fold(bits_of({0, 1, 2, 3}, 4), 4, 10) == [(1, 1)] * 4
    assert fold(bits_of({0, 1}, 8), 8, 2) == [(2, 4), (0, 4)]
    assert fold(bits_of(set(range(9)) - {4}, 9), 9, 3) == [(3, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError):
        fold(b"\x00", 9, 3)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 3000).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)), st.integers(1, 200))
    )
)
def test_fold_counts_every_chunk_once(case: tuple[int, set[int], int]) -> None:
    n, present, width = case
    cells = fold(bits_of(present, n), n, width)
    assert len(cells) == min(n, width)
    assert sum(c for _p, c in cells) == n
    assert sum(p for p, _c in cells) == len(present)
    # a cell is drawn full only when every chunk in it is present
    start = 0
    for p, c in cells:
        assert (glyph(p, c) == FULL) == all(i in present for i in range(start, start + c))
        assert (glyph(p, c) == EMPTY) == all(i not in present for i in range(start, start + c))
        start += c


def test_draw_wraps_and_ends_with_the_legend() -> None:
    lines = draw([(1, 1)] * 10 + [(0, 1)] * 10, columns=8)
    assert lines[:3] == [FULL * 8, FULL * 2 + EMPTY * 6, EMPTY * 4]
    assert lines[-1] == LEGEND


def test_png_decodes_to_the_cells() -> None:
    """The PNG's header, CRCs and pixels, read back by hand (zlib, struct)."""
    import struct
    import zlib

    from cachefilesd_py.control.presence_map import png

    cells = [(4, 4), (0, 4), (2, 4)]
    data = png(cells, columns=2, cell_px=5)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + n
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (width, height, depth, colour) == (10, 10, 8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width

    def pixel(x: int, y: int) -> bytes:
        return raw[y * stride + 1 + 3 * x : y * stride + 4 + 3 * x]

    full, empty, part = pixel(0, 0), pixel(5, 0), pixel(0, 5)
    assert full == bytes((0x1B, 0x9E, 0x3E)) and empty == bytes((0xD0, 0xD0, 0xD0))
    assert part not in (full, empty)
    assert pixel(4, 0) == b"\xff\xff\xff" and pixel(5, 5) == b"\xff\xff\xff"  # grid, padding
