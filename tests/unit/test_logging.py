"""Log lines cannot be forged: whatever a value holds (a cookie key is attacker-chosen
bytes), every renderer writes exactly one line per event, and the journal's priority
prefix is the one the daemon chose."""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.daemon.logging import configure_logging, escape_text

FORGED = "img.erofs\n<2>kernel:cachefiles:forged-critical-line"


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def emitted(capsys: pytest.CaptureFixture[str], fmt: str, **values: object) -> list[str]:
    configure_logging(0, fmt, use_stderr=True)
    structlog.get_logger("t").warning("ondemand.open_failed", **values)
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("fmt", ["journal", "console", "json"])
def test_a_cookie_with_a_newline_cannot_forge_a_line(
    capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    # issue 10 item 5: the journal renderer quoted only values holding a space
    lines = emitted(capsys, fmt, cookie=FORGED, volume="erofs,v")
    assert len(lines) == 1, lines
    if fmt == "journal":
        assert lines[0].startswith("<4>ondemand.open_failed ")
        assert "<2>" not in lines[0].split(" ", 1)[0]


def journald_records(stream: str, line_max: int = 48 * 1024) -> list[str]:
    """What journald makes of a stdout stream: a record per line, and a record per
    ``line_max`` bytes of a longer line (``LineMax=``, 48K by default), each of which
    gets its own ``<N>`` prefix parsed (systemd's journald-stream.c)."""
    records = []
    for line in stream.encode().split(b"\n"):
        while len(line) > line_max:
            records.append(line[:line_max].decode(errors="replace"))
            line = line[line_max:]
        if line:
            records.append(line.decode(errors="replace"))
    return records


def test_a_long_value_cannot_forge_a_record_where_journald_splits_the_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """journald cuts a line at ``LineMax`` and reads a priority prefix at the start of
    each piece: a value long enough to put ``<2>`` there forged a critical record."""
    configure_logging(0, "journal", use_stderr=True)
    prefix = len("<4>source.failed error=")
    forged = "a" * (48 * 1024 - prefix) + "<2>forged-critical" + "b" * 20_000
    structlog.get_logger("t").warning("source.failed", error=forged)
    records = journald_records(capsys.readouterr().err)
    assert len(records) == 1
    assert records[0].startswith("<4>source.failed error=aaa")
    assert records[0].endswith("...[truncated]")


@pytest.mark.parametrize("fmt", ["journal", "console"])
def test_keys_event_names_and_tracebacks_are_escaped_too(
    capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    configure_logging(0, fmt, use_stderr=True)
    log = structlog.get_logger("t")
    log.warning("evil\n<0>event", **{"k\ney": "v", "a b=c": "\x1b[2J"})
    try:
        raise ValueError(FORGED)
    except ValueError:
        log.exception("source.failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert "\x1b" not in "".join(lines)


# -- any value, any key, any event name: one printable line -----------------------------

values = st.one_of(
    st.text(),
    st.binary(),
    st.integers(),
    st.none(),
    st.builds(ValueError, st.text()),
)
events = st.dictionaries(st.text(min_size=1), values, max_size=4)


def unescape(text: str) -> str:
    """The inverse of ``escape_text``: proves the escaping is unambiguous."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        kind = text[i + 1]
        if kind in "\\nrt":
            out.append({"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}[kind])
            i += 2
            continue
        width = {"x": 2, "u": 4, "U": 8}[kind]
        code = int(text[i + 2 : i + 2 + width], 16)
        out.append(chr(0xDC00 + code if kind == "x" and code >= 0x80 else code))
        i += 2 + width
    return "".join(out)


@given(st.text())
def test_escape_text_is_printable_and_reversible(text: str) -> None:
    escaped = escape_text(text)
    assert escaped.isprintable()
    assert unescape(escaped) == text


@pytest.mark.parametrize("fmt", ["journal", "console", "json"])
def test_any_event_is_exactly_one_printable_line(fmt: str) -> None:
    stream = io.StringIO()
    configure_logging(0, fmt, use_stderr=True, stream=stream)
    log = structlog.get_logger("t")

    @settings(max_examples=300, deadline=None)
    @given(st.text(), events)
    def check(event: str, kv: dict[str, object]) -> None:
        stream.seek(0)
        stream.truncate()
        for reserved in ("event", "level", "timestamp"):  # structlog sets these itself
            kv.pop(reserved, None)
        log.warning(event, **kv)
        out = stream.getvalue()
        assert out.endswith("\n") and out.count("\n") == 1
        line = out[:-1]
        if fmt == "json":
            decoded = json.loads(line)
            assert decoded["event"] == event
            for key, value in kv.items():
                if isinstance(value, str):
                    assert decoded[key] == value
            return
        assert line.isprintable(), line
        if fmt == "journal":
            assert line.startswith("<4>" + escape_text(event))
        for value in kv.values():
            if isinstance(value, str) and value:
                assert escape_text(value).replace('"', '\\"') in line

    check()


def test_syslog_gets_one_datagram_per_event_escaped_with_its_own_priority(
    tmp_path: Path,
) -> None:
    address = tmp_path / "log"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(address))
    sink.settimeout(5)
    try:
        configure_logging(0, "syslog", use_stderr=False, syslog_address=str(address))
        structlog.get_logger("presence").warning("ondemand.open_failed", cookie=FORGED)
        structlog.get_logger("engine").info("presence.bound", blob="v/c")
        first, second = sink.recv(65536), sink.recv(65536)
    finally:
        sink.close()
        logging.getLogger("cachefilesd-py").handlers.clear()
    # <28>: facility daemon (3) * 8 + warning (4); <30>: info (6)
    assert first.startswith(b"<28>cachefilesd-py: ondemand.open_failed cookie=img.erofs\\n<2>")
    assert second.startswith(b"<30>cachefilesd-py: presence.bound blob=v/c")
    for datagram in (first, second):
        assert b"\n" not in datagram
        assert datagram.rstrip(b"\0").decode().isprintable()
