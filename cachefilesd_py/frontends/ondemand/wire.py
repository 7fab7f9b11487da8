"""The on-demand messages of ``/dev/cachefiles``: pure decode and encode.

Nothing here does I/O. :func:`decode` turns the bytes of one ``read()`` of the device
into a request value or raises :class:`KernelProtocolError`; :func:`encode_message` is
its inverse (for the fake kernel and tests). The text commands the daemon writes back
(``copen``, ``restore``, ...) are built by ``kernel/commands.py``. What the kernel
sends and when: ``docs/protocol-ondemand.md`` §2 (messages) and §3 (replies).

Messages (``include/uapi/linux/cachefiles.h``, unchanged since 5.19) are in host byte
order with no padding. ``read()`` returns exactly one whole message, so a message is
valid only if its header's ``len`` equals the number of bytes read:

- ``volume_key_size`` counts the volume key's terminating NUL (``strlen + 1``); the
  volume key is a C string of at most 255 characters (fscache stores its length in one
  byte), so the size is 1..256;
- ``cookie_key_size`` is the exact length of the cookie key, 1..255 bytes, which is
  netfs-defined binary data and **not** a C string (EROFS happens to use ASCII names);
- a READ is exactly 32 bytes and a CLOSE exactly 16; ``flags`` of OPEN is reserved (0)
  and not checked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from cachefilesd_py.errors import KernelProtocolError

# struct cachefiles_msg {
#     __u32 msg_id;      /* echo it in copen / READ_COMPLETE */
#     __u32 opcode;      /* enum cachefiles_opcode */
#     __u32 len;         /* total length, header included */
#     __u32 object_id;   /* the object's ondemand_id */
#     __u8  data[];
# };
HEADER: Final = struct.Struct("=IIII")
assert HEADER.size == 16

# struct cachefiles_open {
#     __u32 volume_key_size;   /* includes the trailing NUL */
#     __u32 cookie_key_size;   /* exact, no NUL */
#     __u32 fd;                /* anonymous fd, already installed in the reader */
#     __u32 flags;             /* reserved */
#     __u8  data[];            /* volume key \0, then cookie key */
# };
OPEN: Final = struct.Struct("=IIII")
assert OPEN.size == 16

# struct cachefiles_read {
#     __u64 off;
#     __u64 len;
# };
READ: Final = struct.Struct("=QQ")
assert READ.size == 16

# enum cachefiles_opcode
OP_OPEN: Final = 0
OP_CLOSE: Final = 1
OP_READ: Final = 2

#: ``CACHEFILES_MSG_MAX_SIZE``: a read buffer this large never gets EMSGSIZE
MSG_MAX_SIZE: Final = 1024
#: the volume key is stored as a length byte + string: at most 255 chars + NUL
MAX_VOLUME_KEY_SIZE: Final = 256
#: ``fscache_acquire_cookie`` refuses longer index keys
MAX_COOKIE_KEY_SIZE: Final = 255

OPEN_LEN_MIN: Final = HEADER.size + OPEN.size
READ_LEN: Final = HEADER.size + READ.size
CLOSE_LEN: Final = HEADER.size

U32_LIMIT: Final = 2**32
U64_LIMIT: Final = 2**64


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """OPEN: a cookie is being looked up; answer with ``copen`` (size or -errno).

    ``fd`` is an anonymous fd the kernel has already installed in this process,
    **without** FD_CLOEXEC; own it at once (``kernel.fd.OwnedFd``)."""

    msg_id: int
    object_id: int
    volume_key: bytes  #: without the trailing NUL
    cookie_key: bytes  #: raw bytes, may hold NULs
    fd: int
    flags: int


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """READ: fill ``[offset, offset+length)`` of the object's blob through its anon fd,
    then READ_COMPLETE ``msg_id`` on an fd *of the same object* (even on failure)."""

    msg_id: int
    object_id: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """CLOSE: the cookie was withdrawn. No reply; close the object's fds."""

    msg_id: int
    object_id: int


Request = OpenRequest | ReadRequest | CloseRequest


def decode(buf: bytes | bytearray | memoryview) -> Request:
    """Decode one message as returned by one ``read()`` of the device.

    Raises :class:`KernelProtocolError` (and nothing else) for any malformed input."""
    buf = bytes(buf)
    if len(buf) < HEADER.size:
        raise KernelProtocolError(f"message of {len(buf)} bytes is shorter than its header")
    msg_id, opcode, length, object_id = HEADER.unpack_from(buf)
    if length != len(buf):
        raise KernelProtocolError(f"header len {length} != {len(buf)} bytes read")
    if opcode == OP_OPEN:
        return _decode_open(buf, msg_id, object_id)
    if opcode == OP_READ:
        if length != READ_LEN:
            raise KernelProtocolError(f"READ of {length} bytes, expected {READ_LEN}")
        offset, count = READ.unpack_from(buf, HEADER.size)
        if offset + count >= U64_LIMIT:
            raise KernelProtocolError(f"READ range overflows u64: off={offset} len={count}")
        return ReadRequest(msg_id, object_id, offset, count)
    if opcode == OP_CLOSE:
        if length != CLOSE_LEN:
            raise KernelProtocolError(f"CLOSE of {length} bytes, expected {CLOSE_LEN}")
        return CloseRequest(msg_id, object_id)
    raise KernelProtocolError(f"unknown opcode {opcode}")


def _decode_open(buf: bytes, msg_id: int, object_id: int) -> OpenRequest:
    if len(buf) < OPEN_LEN_MIN:
        raise KernelProtocolError(f"OPEN of {len(buf)} bytes is shorter than its payload")
    vks, cks, fd, flags = OPEN.unpack_from(buf, HEADER.size)
    # Sizes first, so that absurd values are named before the length arithmetic.
    if not 1 <= vks <= MAX_VOLUME_KEY_SIZE:
        raise KernelProtocolError(f"OPEN volume_key_size {vks} out of range 1..256")
    if not 1 <= cks <= MAX_COOKIE_KEY_SIZE:
        raise KernelProtocolError(f"OPEN cookie_key_size {cks} out of range 1..255")
    if OPEN_LEN_MIN + vks + cks != len(buf):
        raise KernelProtocolError(
            f"OPEN sizes 32+{vks}+{cks} do not add up to its {len(buf)} bytes"
        )
    volume = buf[OPEN_LEN_MIN : OPEN_LEN_MIN + vks]
    if volume[-1] != 0:
        raise KernelProtocolError("OPEN volume key is not NUL-terminated")
    if 0 in volume[:-1]:
        raise KernelProtocolError("OPEN volume key holds a NUL before its end")
    cookie = buf[OPEN_LEN_MIN + vks :]
    return OpenRequest(msg_id, object_id, volume[:-1], cookie, fd, flags)


def encode_message(req: Request) -> bytes:
    """The bytes the kernel would send for ``req``: the inverse of :func:`decode`,
    used by the fake kernel and by tests. Refuses values the kernel cannot send."""
    if isinstance(req, OpenRequest):
        volume = req.volume_key + b"\0"
        if b"\0" in req.volume_key or len(volume) > MAX_VOLUME_KEY_SIZE:
            raise ValueError(f"volume key {req.volume_key!r} cannot be sent")
        if not 1 <= len(req.cookie_key) <= MAX_COOKIE_KEY_SIZE:
            raise ValueError(f"cookie key of {len(req.cookie_key)} bytes cannot be sent")
        payload = OPEN.pack(len(volume), len(req.cookie_key), req.fd, req.flags)
        body = payload + volume + req.cookie_key
        return HEADER.pack(req.msg_id, OP_OPEN, HEADER.size + len(body), req.object_id) + body
    if isinstance(req, ReadRequest):
        return HEADER.pack(req.msg_id, OP_READ, READ_LEN, req.object_id) + READ.pack(
            req.offset, req.length
        )
    return HEADER.pack(req.msg_id, OP_CLOSE, CLOSE_LEN, req.object_id)
