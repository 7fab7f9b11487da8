"""The control socket's server: a Unix stream socket, one thread per exchange (bounded).

The protocol and the access rules are pure (``control/schema.py``); this module does
the I/O around them (``docs/control.md``):

- **Binding.** The socket path is bound when serving starts (a stale socket left by a
  previous worker is unlinked first, anything else at the path is refused), with mode
  0666: anyone may connect, so a caller who may not do something gets an error reply
  that says why instead of ``EACCES``. Whoever binds owns the path; :meth:`close`
  unlinks it only if it is still the socket it bound (a worker that took over may have
  re-created it).
- **Who is calling** comes from the kernel: ``SO_PEERCRED`` (pid, uid, gid at
  ``connect()``) and ``SO_PEERGROUPS`` (the supplementary groups), never from the
  request.
- **Never blocks the serving path.** The server has its own threads: one accepts,
  each connection gets a thread of its own, at most :data:`MAX_CONNECTIONS` at a time
  (one more is told ``busy`` and closed). A request must arrive within
  :data:`REQUEST_TIMEOUT` seconds and may be at most ``MAX_REQUEST_BYTES``; each reply
  line must be taken by the client within :data:`SEND_TIMEOUT`. A handler reads the
  daemon's state under the engine's leaf locks only, never holds them across I/O.
- **Bad input**: malformed, oversized, slow or unauthorised requests each get one
  error reply (when the socket still takes it), then the connection is closed. A
  handler that raises an unexpected exception gets ``internal`` and a log event.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from cachefilesd_py.control.schema import (
    MAX_REQUEST_BYTES,
    ControlError,
    ErrorCode,
    Peer,
    authorize,
    encode_error,
    encode_progress,
    encode_result,
    parse_request,
)

log = structlog.get_logger("control")

#: connections served at the same time; one more is answered ``busy``
MAX_CONNECTIONS = 8
#: seconds a client has to send its whole request
REQUEST_TIMEOUT = 5.0
#: seconds a client has to take each reply line
SEND_TIMEOUT = 10.0
#: seconds to wait for a client to finish sending after its reply was sent
LINGER_TIMEOUT = 0.2
#: Linux's SO_PEERGROUPS (4.13+); the socket module does not name it
SO_PEERGROUPS = 59

#: a handler gets the request's checked arguments and a way to send progress lines
Handler = Callable[[Mapping[str, Any], Callable[[Mapping[str, Any]], None]], Any]


def peer_of(conn: socket.socket) -> Peer:
    """The connecting process as the kernel recorded it."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: frozenset[int] = frozenset()
    try:
        # Python allows at most 1024 bytes: 256 groups; more gives ERANGE
        buf = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(buf) // 4}I", buf[: len(buf) // 4 * 4]))
    except OSError:
        # more than 256 groups: not guessed from /proc (the pid may be reused by
        # then); such a caller needs the control group as its primary group
        groups = frozenset()
    return Peer(pid, uid, gid, groups)


def _read_request(conn: socket.socket, deadline: float) -> bytes:
    """Bytes up to and including the first ``\\n`` (or to EOF), bounded in size and time."""
    buf = bytearray()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ControlError(ErrorCode.TIMEOUT, f"no whole request within {REQUEST_TIMEOUT} s")
        conn.settimeout(left)
        try:
            data = conn.recv(MAX_REQUEST_BYTES + 1 - len(buf))
        except TimeoutError:
            raise ControlError(
                ErrorCode.TIMEOUT, f"no whole request within {REQUEST_TIMEOUT} s"
            ) from None
        if not data:
            break
        buf += data
        if len(buf) > MAX_REQUEST_BYTES:
            raise ControlError(
                ErrorCode.TOO_LARGE, f"a request has at most {MAX_REQUEST_BYTES} bytes"
            )
    return bytes(buf[: buf.index(b"\n") + 1] if b"\n" in buf else buf)


class ControlServer:
    """Serves the control socket at ``path`` until :meth:`close`."""

    def __init__(
        self,
        path: str,
        handlers: Mapping[str, Handler],
        read_gid: int | None = None,
    ) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.read_gid = read_gid
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        #: exchanges answered, by outcome (ok / error code), for the metrics
        self.answered: dict[str, int] = {}
        self._count_lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> ControlServer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._bind(sock)
            sock.listen(16)
            sock.settimeout(0.5)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control.listening", path=self.path, read_gid=self.read_gid)
        return self

    def _bind(self, sock: socket.socket) -> None:
        parent = Path(self.path).parent
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(
                    errno.EEXIST, f"control socket path {self.path} exists and is not a socket"
                )
            os.unlink(self.path)  # a previous worker's: it may not have had the time
            log.info("control.stale_socket_removed", path=self.path)
        sock.bind(self.path)
        os.chmod(self.path, 0o666)
        st = os.lstat(self.path)
        self._ino = (st.st_dev, st.st_ino)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)

    # -- serving ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("control.accept_failed", error=str(exc))
                self._stop.wait(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse_busy(conn)
                continue
            try:
                threading.Thread(
                    target=self._serve_one, args=(conn,), name="control-conn", daemon=True
                ).start()
            except RuntimeError:
                self._slots.release()
                conn.close()

    def _refuse_busy(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            with contextlib.suppress(OSError):
                conn.sendall(
                    encode_error(
                        ControlError(ErrorCode.BUSY, f"{MAX_CONNECTIONS} requests in progress")
                    )
                )
        self._count("busy")

    def _count(self, outcome: str) -> None:
        with self._count_lock:
            self.answered[outcome] = self.answered.get(outcome, 0) + 1

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._exchange(conn)
        except Exception:  # the connection thread must end, whatever happened
            log.exception("control.connection_failed")
        finally:
            self._slots.release()

    def _send(self, conn: socket.socket, line: bytes) -> None:
        conn.settimeout(SEND_TIMEOUT)
        conn.sendall(line)

    def _exchange(self, conn: socket.socket) -> None:
        peer: Peer | None = None
        op = "?"
        try:
            peer = peer_of(conn)
            request = parse_request(_read_request(conn, time.monotonic() + REQUEST_TIMEOUT))
            op = request.op
            authorize(request.operation, peer, self.read_gid)
            handler = self.handlers.get(request.op)
            if handler is None:
                raise ControlError(
                    ErrorCode.UNAVAILABLE, f"'{request.op}' is not available in this mode"
                )

            def progress(fields: Mapping[str, Any]) -> None:
                self._send(conn, encode_progress(fields))

            result = handler(request.args, progress)
            line = encode_result(result)
            outcome = "ok"
        except ControlError as err:
            line = encode_error(err)
            outcome = err.code.value
            if err.code is ErrorCode.FORBIDDEN:
                log.warning(
                    "control.refused",
                    op=op,
                    uid=peer.uid if peer else None,
                    pid=peer.pid if peer else None,
                    reason=err.message,
                )
        except OSError as exc:  # the client went away (or stalled) mid-exchange
            log.info("control.client_lost", op=op, error=str(exc))
            self._count("client_lost")
            return
        except Exception as exc:
            log.exception("control.handler_failed", op=op)
            line = encode_error(ControlError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            outcome = ErrorCode.INTERNAL.value
        self._count(outcome)
        if op != "metrics":
            log.debug("control.answered", op=op, outcome=outcome, uid=peer.uid if peer else None)
        with contextlib.suppress(OSError):
            self._send(conn, line)
            _linger(conn)


def _linger(conn: socket.socket) -> None:
    """End the exchange so the client reads the reply: closing a Unix socket with
    unread bytes in it resets the connection, and the client would get ECONNRESET
    instead of the error reply (an oversized request leaves such bytes). So: shut our
    side, then take (and drop) what the client still sends, bounded in bytes and time."""
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(LINGER_TIMEOUT)
    left = 4 * MAX_REQUEST_BYTES
    while left > 0:
        data = conn.recv(min(left, 65536))
        if not data:
            return
        left -= len(data)
