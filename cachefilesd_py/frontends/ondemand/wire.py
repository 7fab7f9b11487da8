"""The on-demand wire format of ``/dev/cachefiles``: pure decode and encode.

Messages (``include/uapi/linux/cachefiles.h``, host byte order, no padding; see
shared/reference/ondemand-protocol.md §2.2–2.5)::

    struct cachefiles_msg {          struct cachefiles_open {       struct cachefiles_read {
        __u32 msg_id;                    __u32 volume_key_size;         __u64 off;
        __u32 opcode;  /* 0 1 2 */       __u32 cookie_key_size;         __u64 len;
        __u32 len;     /* total */       __u32 fd;                  };
        __u32 object_id;                 __u32 flags;
        __u8  data[];                    __u8  data[];  /* vkey\\0 ckey */
    };                               };

``volume_key_size`` counts the volume key's terminating NUL; ``cookie_key_size`` is the
exact length of the cookie key, which is raw bytes and **not** a C string. A READ and a
CLOSE have fixed lengths (32 and 16). Anything else is a :class:`KernelProtocolError`.

Commands are text, one per ``write()``: the kernel drops everything after the first
newline and keeps trailing spaces in the arguments, and it parses numbers with base
auto-detection, so a leading ``0`` would mean octal: numbers are never zero-padded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cachefilesd_py.errors import KernelProtocolError

HEADER = struct.Struct("=IIII")
assert HEADER.size == 16
OPEN = struct.Struct("=IIII")
assert OPEN.size == 16
READ = struct.Struct("=QQ")
assert READ.size == 16

OP_OPEN = 0
OP_CLOSE = 1
OP_READ = 2

#: ``CACHEFILES_MSG_MAX_SIZE``: a read buffer this large never gets EMSGSIZE
MSG_MAX_SIZE = 1024
#: the volume key is stored as a length byte + string: at most 255 chars + NUL
MAX_VOLUME_KEY_SIZE = 256
MAX_COOKIE_KEY_SIZE = 255
U32 = 2**32
U64 = 2**64


@dataclass(frozen=True)
class OpenRequest:
    msg_id: int
    object_id: int
    volume_key: bytes  #: without the trailing NUL
    cookie_key: bytes
    fd: int
    flags: int


@dataclass(frozen=True)
class ReadRequest:
    msg_id: int
    object_id: int
    offset: int
    length: int


@dataclass(frozen=True)
class CloseRequest:
    msg_id: int
    object_id: int


Request = OpenRequest | ReadRequest | CloseRequest


def decode(buf: bytes) -> Request:
    """Decode one message as returned by one ``read()`` of the device."""
    if len(buf) < HEADER.size:
        raise KernelProtocolError(f"message of {len(buf)} bytes is shorter than its header")
    msg_id, opcode, length, object_id = HEADER.unpack_from(buf)
    if length != len(buf):
        raise KernelProtocolError(f"header len {length} != {len(buf)} bytes read")
    if opcode == OP_OPEN:
        return _decode_open(buf, msg_id, object_id)
    if opcode == OP_READ:
        if length != HEADER.size + READ.size:
            raise KernelProtocolError(f"READ of {length} bytes, expected 32")
        offset, count = READ.unpack_from(buf, HEADER.size)
        if offset + count > U64 - 1:
            raise KernelProtocolError(f"READ range overflows: off={offset} len={count}")
        return ReadRequest(msg_id, object_id, offset, count)
    if opcode == OP_CLOSE:
        if length != HEADER.size:
            raise KernelProtocolError(f"CLOSE of {length} bytes, expected 16")
        return CloseRequest(msg_id, object_id)
    raise KernelProtocolError(f"unknown opcode {opcode}")


def _decode_open(buf: bytes, msg_id: int, object_id: int) -> OpenRequest:
    if len(buf) < HEADER.size + OPEN.size:
        raise KernelProtocolError(f"OPEN of {len(buf)} bytes is shorter than its payload")
    vks, cks, fd, flags = OPEN.unpack_from(buf, HEADER.size)
    start = HEADER.size + OPEN.size
    if not 1 <= vks <= MAX_VOLUME_KEY_SIZE:
        raise KernelProtocolError(f"OPEN volume_key_size {vks} out of range")
    if not 1 <= cks <= MAX_COOKIE_KEY_SIZE:
        raise KernelProtocolError(f"OPEN cookie_key_size {cks} out of range")
    if start + vks + cks != len(buf):
        raise KernelProtocolError(f"OPEN sizes {vks}+{cks} do not fill {len(buf)} bytes")
    volume = buf[start : start + vks]
    if volume[-1] != 0 or 0 in volume[:-1]:
        raise KernelProtocolError("OPEN volume key is not one NUL-terminated string")
    cookie = bytes(buf[start + vks : start + vks + cks])
    return OpenRequest(msg_id, object_id, bytes(volume[:-1]), cookie, fd, flags)


def encode_message(req: Request) -> bytes:
    """The bytes the kernel would send for ``req`` (used by the fake and by tests)."""
    if isinstance(req, OpenRequest):
        volume = req.volume_key + b"\0"
        payload = OPEN.pack(len(volume), len(req.cookie_key), req.fd, req.flags)
        body = payload + volume + req.cookie_key
        return HEADER.pack(req.msg_id, OP_OPEN, HEADER.size + len(body), req.object_id) + body
    if isinstance(req, ReadRequest):
        return HEADER.pack(req.msg_id, OP_READ, 32, req.object_id) + READ.pack(
            req.offset, req.length
        )
    return HEADER.pack(req.msg_id, OP_CLOSE, HEADER.size, req.object_id)


# -- commands --------------------------------------------------------------------------


def _arg(value: str, what: str) -> bytes:
    if not value or value != value.strip() or "\n" in value or "\0" in value:
        raise ValueError(f"{what} {value!r}: empty, padded, or holds a newline/NUL")
    return value.encode()


def _name(name: str) -> bytes:
    if "/" in name:
        raise ValueError(f"object name {name!r} holds a '/'")
    return _arg(name, "object name")


def encode_copen(msg_id: int, size_or_errno: int) -> bytes:
    """``copen <id>,<size>``; a negative value (-1..-4095) refuses the OPEN."""
    if not 0 <= msg_id < U32:
        raise ValueError(f"msg_id out of range: {msg_id}")
    if size_or_errno < -4095 or size_or_errno >= 2**63:
        raise ValueError(f"copen size out of range: {size_or_errno}")
    return b"copen %d,%d" % (msg_id, size_or_errno)


def encode_dir(path: str) -> bytes:
    return b"dir " + _arg(path, "dir")


def encode_tag(tag: str) -> bytes:
    return b"tag " + _arg(tag, "tag")


def encode_secctx(ctx: str) -> bytes:
    return b"secctx " + _arg(ctx, "secctx")


def encode_threshold(name: str, percent: int) -> bytes:
    if name not in {"brun", "bcull", "bstop", "frun", "fcull", "fstop"}:
        raise ValueError(f"not a threshold: {name}")
    if not 0 <= percent < 100:
        raise ValueError(f"{name} {percent}% out of range")
    return b"%s %d%%" % (name.encode(), percent)


def encode_bind(*, ondemand: bool) -> bytes:
    return b"bind ondemand" if ondemand else b"bind"


def encode_restore() -> bytes:
    return b"restore"


def encode_cull(name: str) -> bytes:
    return b"cull " + _name(name)


def encode_inuse(name: str) -> bytes:
    return b"inuse " + _name(name)
