"""The control channel between the supervisor and one worker.

A ``SOCK_SEQPACKET`` socket pair per worker, made before the fork: each message is one
packet (no framing to get wrong), and the supervisor's end reads EOF as soon as the
worker is gone. Messages are small JSON objects with a ``kind``:

worker → supervisor
    ``prepared``   a spare has built everything that needs no kernel state
    ``serving``    the worker reads requests now (after the supervisor's ``restore``)
    ``heartbeat``  every second while serving: ``loop_age`` (seconds since the request
                   loop last went round; None in classic mode, whose loop runs cull
                   passes inline), ``oldest_read`` (age of the oldest READ being
                   served), ``objects``, ``culling``, ``reads`` (READs completed)
supervisor → worker
    ``serve``      take over: start reading ``/dev/cachefiles``
    ``exit``       a spare that is no longer wanted (reload, stop)

Decoding is strict and never raises anything but :class:`ChannelError`: a worker is
trusted code, but a bug there must not take the supervisor down.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any

KINDS_FROM_WORKER = frozenset({"prepared", "serving", "heartbeat"})
KINDS_FROM_SUPERVISOR = frozenset({"serve", "exit"})
MAX_MESSAGE = 4096


class ChannelError(ValueError):
    pass


@dataclass(frozen=True)
class Message:
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def number(self, name: str) -> float | None:
        """A numeric field, or None when absent, null or not a finite number."""
        value = self.fields.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return float(value)


def encode(kind: str, **fields: Any) -> bytes:
    if kind not in KINDS_FROM_WORKER | KINDS_FROM_SUPERVISOR:
        raise ChannelError(f"unknown message kind {kind!r}")
    data = json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ChannelError(f"message too long: {len(data)} bytes")
    return data


def decode(data: bytes, allowed: frozenset[str]) -> Message:
    if len(data) > MAX_MESSAGE:
        raise ChannelError(f"message too long: {len(data)} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise ChannelError("not a message object")
    kind = obj.pop("kind")
    if kind not in allowed:
        raise ChannelError(f"unexpected message kind {kind!r}")
    return Message(kind, obj)


class Channel:
    """One end of a worker's control socket pair."""

    def __init__(self, sock: socket.socket, allowed: frozenset[str]) -> None:
        self.sock = sock
        self._allowed = allowed
        self.malformed = 0

    @staticmethod
    def pair() -> tuple[socket.socket, socket.socket]:
        """(supervisor end, worker end); both close-on-exec."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return a, b

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, kind: str, **fields: Any) -> bool:
        """Send without blocking; False if the peer is gone or not reading."""
        try:
            self.sock.send(encode(kind, **fields), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except (BlockingIOError, BrokenPipeError, ConnectionError, OSError):
            return False
        return True

    def drain(self) -> tuple[list[Message], bool]:
        """Every message waiting, without blocking, and whether the peer is gone.
        Malformed packets are skipped (their count is in :attr:`malformed`)."""
        messages: list[Message] = []
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE + 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return messages, False
            except OSError:
                return messages, True
            if not data:
                return messages, True
            try:
                messages.append(decode(data, self._allowed))
            except ChannelError:
                self.malformed += 1

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message; None at EOF (the peer is gone). Raises ``TimeoutError``
        after ``timeout`` seconds and :class:`ChannelError` for a malformed packet."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_MESSAGE + 1)
        except TimeoutError:
            raise
        except (ConnectionError, OSError):
            return None
        if not data:
            return None
        return decode(data, self._allowed)

    def close(self) -> None:
        self.sock.close()
