"""A loopback HTTP/1.1 server for blobs, with faults on demand (stdlib only).

Serves in-memory blobs with correct ``HEAD``, ``Range`` → ``206``, ``Content-Range``,
``ETag`` and ``If-Match`` (→ 412). Faults are queued per path and each is used by one
request::

    with FaultServer({"blob": data}) as srv:
        srv.fault("blob", "500", times=2)
        url = srv.url + "/blob"

Fault kinds: ``500``/``503``/``404`` (status), ``reset`` (close the connection after
half the body), ``truncate`` (announce the full length, send half, close),
``bad-range`` (a wrong ``Content-Range``), ``full`` (``200`` with the whole blob
instead of ``206``), ``stall`` (wait ``stall_seconds``, or until ``unstall`` is set,
before answering), ``etag`` (answer with another ETag), ``long`` (one byte more than
asked).
"""

from __future__ import annotations

import re
import socket
import threading
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


class FaultServer:
    def __init__(self, blobs: dict[str, bytes], *, stall_seconds: float = 5.0) -> None:
        self.blobs = dict(blobs)
        self.etags = {name: f'"v1-{len(data)}"' for name, data in self.blobs.items()}
        self.stall_seconds = stall_seconds
        #: set it to let every stalled request (and every later one) go on at once
        self.unstall = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []
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

    def replace(self, name: str, data: bytes, etag: str) -> None:
        with self._lock:
            self.blobs[name], self.etags[name] = data, etag

    def _next_fault(self, name: str) -> str | None:
        with self._lock:
            queue = self._faults.get(name)
            return queue.popleft() if queue else None

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        name = h.path.lstrip("/")
        fault = self._next_fault(name)
        with self._lock:
            self.requests.append((h.command, name, h.headers.get("Range")))
            data, etag = self.blobs.get(name), self.etags.get(name)
        if fault == "stall":
            self.unstall.wait(self.stall_seconds)
            fault = None
        status = {"500": 500, "503": 503, "404": 404}.get(fault or "")
        if data is None or status:
            h.send_response(status or 404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if fault == "etag":
            etag = '"other"'
        if_match = h.headers.get("If-Match")
        if if_match and if_match != etag:
            h.send_response(412)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        rng = RANGE.match(h.headers.get("Range", ""))
        if head or not rng or fault == "full":
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("ETag", etag or "")
            h.send_header("Accept-Ranges", "bytes")
            h.end_headers()
            if not head:
                h.wfile.write(data)
            return
        start, end = int(rng.group(1)), min(int(rng.group(2)), len(data) - 1)
        body = data[start : end + 1]
        if fault == "long":
            body += b"X"
        h.send_response(206)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", etag or "")
        cr = f"bytes {start}-{end}/{len(data)}"
        if fault == "bad-range":
            cr = f"bytes {start + 4096}-{end + 4096}/{len(data)}"
        h.send_header("Content-Range", cr)
        h.end_headers()
        if fault in ("reset", "truncate"):
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            if fault == "reset":
                h.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


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
