"""One ``read()`` of ``/dev/cachefiles`` → a request or ``KernelProtocolError``.

A decoded request must encode back to exactly the bytes read (``encode_message`` is
what the fake kernel sends), so the decoder neither invents nor drops a field.
"""

from __future__ import annotations

from cachefilesd_py.errors import KernelProtocolError
from cachefilesd_py.frontends.ondemand import wire

MAX_LEN = wire.MSG_MAX_SIZE


def TestOneInput(data: bytes) -> None:
    try:
        req = wire.decode(data)
    except KernelProtocolError:
        return
    assert isinstance(req, wire.OpenRequest | wire.ReadRequest | wire.CloseRequest)
    assert wire.encode_message(req) == data, req
