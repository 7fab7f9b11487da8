"""The supervisor/worker control channel (daemon/channel.py)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.daemon.channel import (
    KINDS_FROM_SUPERVISOR,
    KINDS_FROM_WORKER,
    Channel,
    ChannelError,
    decode,
    encode,
)


def test_round_trip_over_a_socket_pair() -> None:
    a, b = Channel.pair()
    sup, wrk = Channel(a, KINDS_FROM_WORKER), Channel(b, KINDS_FROM_SUPERVISOR)
    assert wrk.send("heartbeat", loop_age=0.5, oldest_read=None, objects=3)
    assert wrk.send("serving")
    messages, eof = sup.drain()
    assert [m.kind for m in messages] == ["heartbeat", "serving"] and not eof
    assert messages[0].number("loop_age") == 0.5
    assert messages[0].number("oldest_read") is None
    assert sup.send("serve")
    got = wrk.receive(1.0)
    assert got is not None and got.kind == "serve"
    wrk.close()
    messages, eof = sup.drain()
    assert messages == [] and eof
    assert not sup.send("serve")  # the peer is gone: False, no exception
    sup.close()


def test_a_malformed_packet_is_skipped_and_counted() -> None:
    a, b = Channel.pair()
    sup = Channel(a, KINDS_FROM_WORKER)
    b.send(b"\xff not json")
    b.send(json.dumps({"kind": "serve"}).encode())  # a supervisor's kind, from a worker
    b.send(encode("prepared"))
    messages, _eof = sup.drain()
    assert [m.kind for m in messages] == ["prepared"]
    assert sup.malformed == 2
    a.close()
    b.close()


def test_numbers_must_be_finite_and_not_bool() -> None:
    m = decode(b'{"kind":"heartbeat","a":true,"b":"1","c":1e999,"d":2}', KINDS_FROM_WORKER)
    assert [m.number(k) for k in "abcd"] == [None, None, None, 2.0]


def test_unknown_kinds_are_refused_when_encoding() -> None:
    with pytest.raises(ChannelError):
        encode("restore")


@given(st.binary(max_size=5000))
def test_decode_raises_only_channel_error(data: bytes) -> None:
    with contextlib.suppress(ChannelError):
        decode(data, KINDS_FROM_WORKER)
