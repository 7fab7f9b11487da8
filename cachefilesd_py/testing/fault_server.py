"""A loopback HTTP/1.1 server for blobs, with faults on demand (stdlib only).

Serves in-memory blobs with correct ``HEAD``, ``Range`` → ``206``, ``Content-Range``,
the validators of its ``validators`` mode, and their preconditions: ``If-Match``
(strong comparison, so a weak ETag never matches, as RFC 9110 says) and
``If-Unmodified-Since`` → 412. Faults are queued per path and each is used by one
request::

    with FaultServer({"blob": data}) as srv:
        srv.fault("blob", "500", times=2)
        url = srv.url + "/blob"

Validator modes (for every blob): ``etag`` (a strong ETag, the default), ``weak-etag``,
``last-modified``, ``etag+last-modified``, ``weak-etag+last-modified``, ``none``.
Last-Modified starts an hour in the past; :meth:`replace` can set a new one, so a
blob can be rewritten "in place" at the same size like an origin without ETags does.

Fault kinds: ``500``/``503``/``404`` (status), ``reset`` (close the connection after
half the body), ``truncate`` (announce the full length, send half, close),
``bad-range`` (a wrong ``Content-Range``), ``full`` (``200`` with the whole blob
instead of ``206``), ``stall`` (wait ``stall_seconds``, or until ``unstall`` is set,
before answering), ``etag``
(answer with another ETag), ``long`` (one byte more than asked), ``trickle`` (the
whole answer, status line and headers included, one byte every ``trickle_seconds``),
``trickle-body`` (headers at once, then the body one byte at a time), ``huge`` (a
``Content-Length`` of 2 PiB in a HEAD or 200), ``no-length`` (a HEAD without
``Content-Length``), ``redirect`` (302 to ``/moved``), ``flood`` (a ``200`` with a
``flood_bytes`` body of zeros, streamed, for any GET). ``sent`` counts the body bytes
the server managed to hand to the kernel, per path, so a test can tell how much of a
body a client actually pulled.

Credentials: set ``require_authorization`` (an exact ``Authorization`` value, e.g.
``"Bearer t0ken"``) and every request without it is answered ``auth_status`` (401 by
default, or 403) with no body, as an origin whose token expired or was revoked.
Either may be changed while serving (a token rotated upstream).
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import socket
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")
HUGE = 2 << 50  # 2 PiB
MODES = (
    "etag",
    "weak-etag",
    "last-modified",
    "etag+last-modified",
    "weak-etag+last-modified",
    "none",
)


class FaultServer:
    def __init__(
        self,
        blobs: dict[str, bytes],
        *,
        stall_seconds: float = 5.0,
        validators: str = "etag",
        trickle_seconds: float = 0.5,
        flood_bytes: int = 512 << 20,
        require_authorization: str | None = None,
        auth_status: int = 401,
    ) -> None:
        if validators not in MODES:
            raise ValueError(f"validators must be one of {MODES}")
        self.validators = validators
        self.blobs = dict(blobs)
        self.etags = {name: f'"v1-{len(data)}"' for name, data in self.blobs.items()}
        start = time.time() - 3600
        self.last_modified: dict[str, float] = dict.fromkeys(self.blobs, start)
        self.stall_seconds = stall_seconds
        #: set it to let every stalled request (and every later one) go on at once
        self.unstall = threading.Event()
        self.trickle_seconds = trickle_seconds
        self.flood_bytes = flood_bytes
        #: the ``Authorization`` value every request must carry (None: any request)
        self.require_authorization = require_authorization
        self.auth_status = auth_status
        self.requests: list[tuple[str, str, str | None]] = []
        #: every request's headers, in order (for tests of what a client sends)
        self.request_headers: list[dict[str, str]] = []
        self.sent: dict[str, int] = defaultdict(int)
        self._faults: dict[str, deque[str]] = defaultdict(deque)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                server._serve(self, head=True)

            def do_GET(self) -> None:
                server._serve(self, head=False)

            def handle(self) -> None:
                # the client went away (resets, deadlines): not news
                with contextlib.suppress(OSError):
                    super().handle()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def fault(self, name: str, kind: str, times: int = 1) -> None:
        with self._lock:
            self._faults[name].extend([kind] * times)

    def pending(self, name: str) -> int:
        """Faults queued for ``name`` and not used yet."""
        with self._lock:
            return len(self._faults.get(name, ()))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def replace(
        self,
        name: str,
        data: bytes,
        etag: str | None = None,
        *,
        last_modified: float | None = None,
    ) -> None:
        """Serve ``data`` as ``name`` from now on, with a new ETag (default: derived
        from the old one) and a new Last-Modified (default: one second later)."""
        with self._lock:
            old_lm = self.last_modified.get(name, time.time() - 3600)
            self.blobs[name] = data
            self.etags[name] = etag or f'"v{len(self.requests)}-{len(data)}-{id(data):x}"'
            self.last_modified[name] = old_lm + 1 if last_modified is None else last_modified

    def _next_fault(self, name: str) -> str | None:
        with self._lock:
            queue = self._faults.get(name)
            return queue.popleft() if queue else None

    # -- validators ------------------------------------------------------------------

    def _validators(self, name: str, fault: str | None) -> tuple[str | None, float | None]:
        etag: str | None = self.etags.get(name)
        lm: float | None = self.last_modified.get(name)
        mode = self.validators
        if fault == "etag":
            etag = '"other"'
        if "etag" not in mode:
            etag = None
        elif mode.startswith("weak") and etag is not None:
            etag = "W/" + etag
        if "last-modified" not in mode:
            lm = None
        return etag, lm

    @staticmethod
    def _precondition_failed(h: BaseHTTPRequestHandler, etag: str | None, lm: float | None) -> bool:
        if_match = h.headers.get("If-Match")
        if if_match is not None:
            # strong comparison: a weak tag never matches (RFC 9110 §13.1.1)
            return not (etag and not etag.startswith("W/") and if_match.strip() == etag)
        ius = h.headers.get("If-Unmodified-Since")
        if ius is not None and lm is not None:
            try:
                when = email.utils.parsedate_to_datetime(ius).timestamp()
            except (TypeError, ValueError):
                return False  # an invalid date is ignored
            return int(lm) > when
        return False

    # -- answers ---------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        name = h.path.lstrip("/")
        fault = self._next_fault(name)
        with self._lock:
            self.requests.append((h.command, name, h.headers.get("Range")))
            self.request_headers.append(dict(h.headers.items()))
            data = self.blobs.get(name)
            etag, lm = self._validators(name, fault)
        if fault == "stall":
            self.unstall.wait(self.stall_seconds)
            fault = None
        out = _Out(h, trickle=self.trickle_seconds if fault == "trickle" else 0.0)
        wanted = self.require_authorization
        if wanted is not None and h.headers.get("Authorization") != wanted:
            out.head(self.auth_status, {"Content-Length": "0"})
            return
        status = {"500": 500, "503": 503, "404": 404}.get(fault or "")
        if data is None or status:
            out.head(status or 404, {"Content-Length": "0"})
            return
        if fault == "redirect":
            out.head(302, {"Location": "/moved", "Content-Length": "0"})
            return
        validators = {}
        if etag:
            validators["ETag"] = etag
        if lm is not None:
            validators["Last-Modified"] = email.utils.formatdate(lm, usegmt=True)
        if self._precondition_failed(h, etag, lm):
            out.head(412, {"Content-Length": "0"})
            return
        if fault == "flood" and not head:
            out.head(200, {"Content-Length": str(self.flood_bytes), **validators})
            self._flood(h, name)
            return
        rng = RANGE.match(h.headers.get("Range", ""))
        if head or not rng or fault in ("full", "huge"):
            length = HUGE if fault == "huge" else len(data)
            headers = {"Content-Length": str(length), **validators, "Accept-Ranges": "bytes"}
            if fault == "no-length":
                del headers["Content-Length"]
            out.head(200, headers)
            if not head:
                self._body(out, name, data, trickle=False)
            return
        start, end = int(rng.group(1)), min(int(rng.group(2)), len(data) - 1)
        body = data[start : end + 1]
        if fault == "long":
            body += b"X"
        cr = f"bytes {start}-{end}/{len(data)}"
        if fault == "bad-range":
            cr = f"bytes {start + 4096}-{end + 4096}/{len(data)}"
        out.head(206, {"Content-Length": str(len(body)), **validators, "Content-Range": cr})
        if fault in ("reset", "truncate"):
            out.body(body[: len(body) // 2])
            h.wfile.flush()
            if fault == "reset":
                h.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._body(out, name, body, trickle=fault == "trickle-body")

    def _body(self, out: _Out, name: str, body: bytes, *, trickle: bool) -> None:
        if trickle:
            out.trickle = self.trickle_seconds
        out.body(body)
        with self._lock:
            self.sent[name] += len(body)

    def _flood(self, h: BaseHTTPRequestHandler, name: str) -> None:
        piece = bytes(1 << 16)
        left = self.flood_bytes
        try:
            while left > 0:
                n = min(left, len(piece))
                h.wfile.write(piece[:n])
                left -= n
                with self._lock:
                    self.sent[name] += n
        finally:
            h.close_connection = True

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Out:
    """Writes an answer at once, or one byte every ``trickle`` seconds."""

    def __init__(self, h: BaseHTTPRequestHandler, trickle: float) -> None:
        self.h = h
        self.trickle = trickle

    def head(self, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {self.h.responses.get(status, ('',))[0]}"]
        lines.append(f"Date: {self.h.date_time_string()}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def body(self, data: bytes) -> None:
        self.write(data)

    def write(self, data: bytes) -> None:
        if not self.trickle:
            self.h.wfile.write(data)
            return
        for i in range(len(data)):
            self.h.wfile.write(data[i : i + 1])
            self.h.wfile.flush()
            time.sleep(self.trickle)


def main() -> None:
    """Serve the files of a directory with faults from a spec: ``python -m
    cachefilesd_py.testing.fault_server DIR PORTFILE [name:kind:times ...]``."""
    import pathlib
    import sys

    root = pathlib.Path(sys.argv[1])
    blobs = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    srv = FaultServer(blobs, stall_seconds=float(3))
    for spec in sys.argv[3:]:
        name, kind, times = spec.split(":")
        srv.fault(name, kind, int(times))
    with srv:
        pathlib.Path(sys.argv[2]).write_text(srv.url)
        threading.Event().wait()


if __name__ == "__main__":
    main()
