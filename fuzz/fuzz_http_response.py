"""Raw HTTP answers from a loopback socket → ``HttpSource.identity`` and
``fetch_into``: the only outcomes allowed are a correct buffer or a ``SourceError``
(never one with reason ``unexpected``, which marks an exception the source did not
foresee), never another exception, never a wait past the deadline.

The input is a small script for a loopback server (see :func:`decode`):

- byte 0, flags: ``1`` send the answer in small pieces, ``2`` close the connection
  after each answer, ``4`` stall mid-answer past the deadline, bits 3-4 the body:
  0 exact, 1 one byte short, 2 one byte long, 3 one-byte chunks (when the head says
  ``Transfer-Encoding: chunked``, the body is sent in that coding, else as it is);
- bytes 1-2: which range to fetch (offset, length), inside the size the identity got;
- the rest: the answer heads as text, the HEAD answer and the GET answer separated by
  a NUL byte (one head serves both). ``{a}``, ``{b}``, ``{total}``, ``{len}``,
  ``{etag}``, ``{lm}``, ``{date}`` are replaced by the asked range, the blob size, the
  body length, validators and dates, so mutations of a correct answer stay near one.
  Lines end in CRLF unless the text has a CR of its own.

The server is a liar about everything but the bytes: a body always holds the blob's
bytes of the range its own ``Content-Range`` claims (or of the asked range, or the
whole blob for a 200). So a source that accepted a body for a wrong range, a wrong
length or a short read would return a wrong buffer, and the harness sees it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.http import HttpSource
from cachefilesd_py.sources.policy import Deadline, RetryPolicy
from cachefilesd_py.sources.validators import format_http_date
from cachefilesd_py.sources.watchdog import pool_manager
from cachefilesd_py.testing.pattern import pattern_bytes

MAX_LEN = 2048
#: derived inputs in ``tests/unit/test_fuzz_harnesses.py``: few, since a broken answer
#: costs its deadline; ``tests/integration/test_fuzz_http_response.py`` adds 100
#: mutations that know the script's layout
CI_EXAMPLES = 10
BLOB = pattern_bytes(7, 0, 10_000)
#: the deadline of every call (``FUZZ_HTTP_DEADLINE`` shortens it for long runs: most
#: mutated answers end by their deadline, so it sets the pace)
DEADLINE = float(os.environ.get("FUZZ_HTTP_DEADLINE", "0.5"))
#: how far past its deadline a call may return (scheduling, a retry's last step)
SLACK = 0.75
STALL = DEADLINE + 0.3

_RANGE = re.compile(rb"^range:\s*bytes=(\d+)-(\d+)\s*$", re.I | re.M)
_CLAIMED = re.compile(r"content-range:\s*bytes\s+(\d{1,9})-(\d{1,9})/", re.I)
_STATUS = re.compile(r"^HTTP/1\.[01] (\d{3})")
_CHUNKED = re.compile(r"^transfer-encoding:[ \t]*chunked[ \t]*\r?$", re.I | re.M)

CORRECT = (
    "HTTP/1.1 200 OK\nContent-Length: {total}\nETag: {etag}\nLast-Modified: {lm}\n"
    "Date: {date}\n\n\0HTTP/1.1 206 Partial Content\nContent-Range: bytes {a}-{b}/{total}\n"
    "Content-Length: {len}\nETag: {etag}\nLast-Modified: {lm}\nDate: {date}\n\n"
)


@dataclass(frozen=True)
class Script:
    pieces: bool
    close: bool
    stall: bool
    body: int  # 0 exact, 1 short, 2 long, 3 chunked
    offset_sel: int
    length_sel: int
    head_for_head: str
    head_for_get: str


def decode(data: bytes) -> Script:
    flags = data[0] if data else 0
    sel = data[1:3].ljust(2, b"\0")
    text = data[3:].decode("latin-1") or CORRECT
    parts = text.split("\0", 1)
    return Script(
        pieces=bool(flags & 1),
        close=bool(flags & 2),
        stall=bool(flags & 4),
        body=(flags >> 3) & 3,
        offset_sel=sel[0],
        length_sel=sel[1],
        head_for_head=parts[0],
        head_for_get=parts[-1],
    )


class _Server:
    """Answers every request of one input from its script, one connection at a time."""

    def __init__(self, script: Script, listener: socket.socket) -> None:
        self.script = script
        self.listener = listener
        self.stop = threading.Event()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conn = conn
            with conn:
                conn.settimeout(2.0)
                with contextlib.suppress(OSError):
                    self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        pending = b""
        while not self.stop.is_set():
            while b"\r\n\r\n" not in pending:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                pending += chunk
            request, pending = pending.split(b"\r\n\r\n", 1)
            self._answer(conn, request)
            if self.script.close:
                return

    def _answer(self, conn: socket.socket, request: bytes) -> None:
        head_request = request.startswith(b"HEAD ")
        m = _RANGE.search(request)
        a, b = (int(m.group(1)), int(m.group(2))) if m else (0, len(BLOB) - 1)
        template = self.script.head_for_head if head_request else self.script.head_for_get
        want = BLOB[a : b + 1]
        head = (
            template.replace("{a}", str(a))
            .replace("{b}", str(b))
            .replace("{total}", str(len(BLOB)))
            .replace("{len}", str(len(want)))
            .replace("{etag}", '"fz-1"')
            .replace("{lm}", format_http_date(int(time.time()) - 86400))
            .replace("{date}", format_http_date(int(time.time())))
        )
        if "\r" not in head:
            head = head.replace("\n", "\r\n")
        head = _head_only(head)
        body = b""
        if not head_request:
            claimed = _CLAIMED.search(head)
            status = _STATUS.match(head)
            if claimed:
                body = BLOB[int(claimed.group(1)) : int(claimed.group(2)) + 1]
            elif status and status.group(1) == "200":
                body = BLOB
            else:
                body = want
            if self.script.body == 1:
                body = body[:-1]
            elif self.script.body == 2:
                body = body + BLOB[:1]
            if _CHUNKED.search(head):  # the framing the head announces, never another
                size = 1 if self.script.body == 3 else 700
                body = (
                    b"".join(
                        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
                        for i in range(0, len(body), size)
                    )
                    + b"0\r\n\r\n"
                )
        out = head.encode("latin-1") + body
        if self.script.stall:
            conn.sendall(out[: len(out) // 2])
            time.sleep(STALL)
            out = out[len(out) // 2 :]
        if self.script.pieces:
            for i in range(0, len(out), 7):
                conn.sendall(out[i : i + 7])
        else:
            conn.sendall(out)


def _head_only(text: str) -> str:
    """``text`` up to the empty line that ends a head as ``http.client`` reads it (a
    line that is empty or a lone CR): bytes after it would be taken for the body, and
    the body is the server's honest part."""
    at = 0
    first = True
    while True:
        nl = text.find("\n", at)
        if nl < 0:
            return text  # no end of head: the client waits, the deadline ends it
        line = text[at:nl]
        if not first and line in ("", "\r"):
            return text[: nl + 1]
        first = False
        at = nl + 1


_listener = socket.socket()
_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
_listener.bind(("127.0.0.1", 0))
_listener.listen(8)
_listener.settimeout(0.05)
atexit.register(_listener.close)
URL = f"http://127.0.0.1:{_listener.getsockname()[1]}/blob"


def _timed(what: str, fn):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    try:
        return fn()
    except SourceError as exc:
        assert exc.reason != "unexpected", f"{what}: an exception the source did not foresee: {exc}"
        return exc
    finally:
        took = time.monotonic() - start
        assert took <= DEADLINE + SLACK, f"{what} took {took:.2f} s, deadline {DEADLINE} s"


def TestOneInput(data: bytes) -> None:
    script = decode(data)
    server = _Server(script, _listener)
    pm = pool_manager(maxsize=2)
    try:
        src = HttpSource(URL, pool=pm, retry=RetryPolicy(total=1, backoff=0.0), timeout=5)
        ident = _timed("identity", lambda: src.identity(Deadline.after(DEADLINE)))
        if isinstance(ident, SourceError) or ident.size == 0:
            return
        offset = script.offset_sel * ident.size // 256
        length = 1 + script.length_sel * 16 % min(4096, ident.size - offset)
        buf = bytearray(b"\xa5" * length)
        got = _timed(
            "fetch", lambda: src.fetch_into(offset, memoryview(buf), Deadline.after(DEADLINE))
        )
        if isinstance(got, SourceError):
            return
        assert offset + length <= len(BLOB), "accepted a range the server cannot have"
        assert bytes(buf) == BLOB[offset : offset + length], "wrong bytes reported good"
    finally:
        pm.clear()
        server.close()
