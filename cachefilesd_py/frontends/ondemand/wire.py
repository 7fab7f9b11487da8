"""The on-demand wire format of ``/dev/cachefiles``: pure decode and encode.

Nothing here does I/O. :func:`decode` turns the bytes of one ``read()`` of the device
into a request value or raises :class:`KernelProtocolError`; the ``encode_*`` functions
build the text commands the daemon ``write()``\\ s. Reference:
shared/reference/ondemand-protocol.md §1.2–1.3 (commands) and §2.2–2.5 (messages).

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

Commands are text, one per ``write()``. The kernel cuts the buffer at the first
newline, so a second command after a newline is silently dropped while the write still
"succeeds"; it keeps trailing spaces in the arguments (``dir /x `` names another
directory); and it parses numbers with base auto-detection, so a leading ``0`` would
mean octal. Hence the encoders: no newline, no surrounding whitespace, numbers never
zero-padded, and every argument checked before it can reach the kernel.
"""

from __future__ import annotations

import os
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
#: the kernel refuses writes longer than PAGE_SIZE - 1 (EOPNOTSUPP); 4095 is the
#: smallest such limit on any architecture
MAX_COMMAND_LENGTH: Final = 4095
#: ``NAME_MAX``: the longest name ``cull``/``inuse`` can look up
NAME_MAX: Final = 255

OPEN_LEN_MIN: Final = HEADER.size + OPEN.size
READ_LEN: Final = HEADER.size + READ.size
CLOSE_LEN: Final = HEADER.size

U32_LIMIT: Final = 2**32
U64_LIMIT: Final = 2**64
#: copen's size is parsed with ``kstrtol``: a signed 64-bit ``long``
LONG_MAX: Final = 2**63 - 1
#: ``IS_ERR_VALUE``: -4095..-1 are errnos; anything lower makes copen fail with EINVAL
MAX_ERRNO: Final = 4095

THRESHOLDS: Final = frozenset({"brun", "bcull", "bstop", "frun", "fcull", "fstop"})


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


# -- commands --------------------------------------------------------------------------


def _command(word: bytes, arg: bytes | None = None) -> bytes:
    cmd = word if arg is None else word + b" " + arg
    if len(cmd) > MAX_COMMAND_LENGTH:
        raise ValueError(f"command of {len(cmd)} bytes exceeds {MAX_COMMAND_LENGTH}")
    return cmd


def _text_arg(value: str | bytes, what: str) -> bytes:
    raw = os.fsencode(value)
    if not raw or raw != raw.strip() or b"\n" in raw or b"\0" in raw:
        raise ValueError(f"{what} {value!r}: empty, padded with whitespace, or holds NUL/newline")
    return raw


def _object_name(name: str | bytes) -> bytes:
    raw = _text_arg(name, "object name")
    if b"/" in raw:
        raise ValueError(f"object name {name!r} holds a '/' (names are relative to the cwd)")
    if raw in (b".", b"..") or len(raw) > NAME_MAX:
        raise ValueError(f"object name {name!r} cannot be looked up")
    return raw


def _check_msg_id(msg_id: int) -> None:
    if not 0 <= msg_id < U32_LIMIT:
        raise ValueError(f"msg_id out of range: {msg_id}")


def encode_copen(msg_id: int, size_or_negative_errno: int) -> bytes:
    """``copen <id>,<size>``: accept an OPEN with the blob's size in bytes (0..2**63-1),
    or refuse it with a negative errno (-4095..-1). Decimal, never zero-padded."""
    _check_msg_id(msg_id)
    value = size_or_negative_errno
    if not -MAX_ERRNO <= value <= LONG_MAX:
        raise ValueError(f"copen value out of range: {value}")
    return _command(b"copen", b"%d,%d" % (msg_id, value))


def encode_dir(path: str | bytes) -> bytes:
    """``dir <path>``: the cache root (absolute; resolved when ``bind`` runs)."""
    return _command(b"dir", _text_arg(path, "dir"))


def encode_tag(tag: str | bytes) -> bytes:
    """``tag <name>``: the FS-Cache cache name (default ``CacheFiles``)."""
    return _command(b"tag", _text_arg(tag, "tag"))


def encode_secctx(context: str | bytes) -> bytes:
    """``secctx <label>``: the LSM context the module acts as."""
    return _command(b"secctx", _text_arg(context, "secctx"))


def encode_threshold(name: str, percent: int) -> bytes:
    """``brun|bcull|bstop|frun|fcull|fstop <N>%``. The kernel checks each value against
    the current others (stop < cull < run < 100), so the caller orders them."""
    if name not in THRESHOLDS:
        raise ValueError(f"not a threshold: {name!r}")
    if not 0 <= percent < 100:
        raise ValueError(f"{name} {percent}% out of range 0..99")
    return _command(name.encode(), b"%d%%" % percent)


def encode_bind(*, ondemand: bool) -> bytes:
    """``bind`` (classic) or ``bind ondemand``."""
    return _command(b"bind", b"ondemand" if ondemand else None)


def encode_restore() -> bytes:
    """``restore`` (6.8+): mark every outstanding request new again."""
    return _command(b"restore")


def encode_cull(name: str | bytes) -> bytes:
    """``cull <name>``: the name is looked up in the writer's current directory."""
    return _command(b"cull", _object_name(name))


def encode_inuse(name: str | bytes) -> bytes:
    """``inuse <name>``: 0 = not in use, EBUSY = in use, ENOENT/ESTALE = absent."""
    return _command(b"inuse", _object_name(name))
