"""The client side of the control socket (``control/schema.py`` has the protocol)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Mapping
from typing import Any

from cachefilesd_py.control.schema import (
    MAX_REPLY_BYTES,
    ControlError,
    ErrorCode,
    Progress,
    encode_request,
    parse_reply,
)

#: where the daemon listens unless ``control_socket`` says otherwise
DEFAULT_SOCKET = "/run/cachefilesd-py/control.sock"


def call(
    path: str,
    op: str,
    /,
    *,
    timeout: float = 60.0,
    on_progress: Callable[[Mapping[str, Any]], None] | None = None,
    **args: Any,
) -> Any:
    """Run ``op`` on the daemon listening at ``path`` and return its result; an error
    reply (or no daemon) raises :class:`ControlError`. ``path`` and ``op`` are
    positional only: ``args`` are the operation's and may be named so (``pin``'s
    ``path``)."""
    line = encode_request(op, **args)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as exc:
        raise ControlError(ErrorCode.UNAVAILABLE, str(exc)) from None
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise ControlError(
                ErrorCode.UNAVAILABLE,
                f"no daemon answers at {path} ({exc.strerror or exc}); is cachefilesd-py "
                "running, and is control_socket the same path?",
            ) from None
        try:
            # a daemon that refuses at once (busy) may close before taking the request:
            # its reply is still there to read
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line)
            reader = sock.makefile("rb")
            while True:
                reply_line = reader.readline(MAX_REPLY_BYTES + 1)
                if not reply_line:
                    raise ControlError(ErrorCode.FAILED, "the daemon closed without a reply")
                reply = parse_reply(reply_line)
                if isinstance(reply, Progress):
                    if on_progress is not None:
                        on_progress(reply.fields)
                    continue
                if not reply.ok:
                    assert reply.error is not None
                    raise reply.error
                return reply.result
        except TimeoutError:
            raise ControlError(ErrorCode.TIMEOUT, f"no reply within {timeout} s") from None
        except OSError as exc:
            raise ControlError(ErrorCode.FAILED, f"connection lost: {exc}") from None
