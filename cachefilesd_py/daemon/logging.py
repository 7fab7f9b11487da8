"""Structured logs through structlog.

- on a terminal: human-readable key=value lines, coloured when stderr is a terminal;
- when stderr is the systemd journal (``$JOURNAL_STREAM`` names stderr's device and
  inode): ``<N>event key=value`` lines with sd-daemon priority prefixes and no
  timestamps (the journal adds its own);
- ``json``: one JSON object per line (the guest tests read these);
- without ``-s``: syslog, ident ``cachefilesd-py``, facility daemon, as cachefilesd does
  (on a terminal too; the journal form on stderr where there is no ``/dev/log``).

Every line names its process's part in the process model (``proc``: supervisor,
serving, spare; docs/failover.md) once :func:`set_process` was called, and is written
with one ``write()``: the supervisor and its workers share stderr.

Values come from outside: a cookie or volume key is whatever bytes the netfs (and so
whoever made the image or the mount) chose, an error message may quote a URL or a
server's words. A newline in one would end the line, and for the journal the next line
would start with a priority prefix of the attacker's choosing (``<2>`` is critical); an
escape sequence would drive the reader's terminal. So in every text format (console,
journal, syslog) every event name, key and value goes through :func:`escape_text`:
backslash and every character that is not printable (controls, line and paragraph
separators, format characters such as bidi overrides) become backslash escapes
(``\\n``, ``\\x1b``, ``\\u202e``; a lone surrogate from undecodable bytes becomes the
byte, ``\\xff``), and a value that holds a space, ``"`` or ``=`` is double-quoted. A
traceback is one escaped value. One event is always exactly one line, and the only
``<N>`` prefix in the journal is the daemon's (a journal line is also kept shorter than
the length at which journald would cut it into records). JSON escapes by itself (``json.dumps``
escapes controls and everything outside ASCII).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Any, TextIO

import structlog

PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}

#: this process's part in the process model, added to every line (None: not yet known)
_process: str | None = None


def set_process(role: str | None) -> None:
    global _process
    _process = role


def _add_process(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _process is not None:
        event.setdefault("proc", _process)
        if _with_pid:
            event.setdefault("pid", os.getpid())
    return event


#: JSON lines carry the pid too (the journal and syslog record it themselves)
_with_pid = False


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def escape_text(text: str) -> str:
    """``text`` with backslash and every non-printable character backslash-escaped:
    printable on one line, and unambiguous (a backslash in the output always starts
    an escape)."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch.isprintable():
        return ch
    code = ord(ch)
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: the traceback's key reads better under this name
_RENAMED_KEYS = {"exception": "traceback"}


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else str(value)


def _escape_key(key: Any) -> str:
    text = escape_text(_as_text(key))
    return text.replace(" ", "\\x20").replace("=", "\\x3d").replace('"', "\\x22") or '""'


def _escape_value(value: Any) -> str:
    text = escape_text(_as_text(value))
    if text and not any(c in text for c in ' "='):
        return text
    return '"' + text.replace('"', '\\"') + '"'


def escape_values(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: every key and value of ``event`` as one-line text (see the
    module docstring); the event name escaped, not quoted."""
    safe: dict[str, Any] = {"event": escape_text(_as_text(event.pop("event", "")))}
    for key, value in event.items():
        name = _RENAMED_KEYS.get(key, key) if isinstance(key, str) else key
        safe[_escape_key(name)] = _escape_value(value)
    return safe


#: longest journal line, in bytes. journald cuts a longer stdout line every ``LineMax=``
#: bytes (48K by default) and parses a ``<N>`` prefix at the start of each piece, so a
#: value long enough to put ``<2>`` there would forge a record of its own. Longer lines
#: end in :data:`TRUNCATED` instead (a ``LineMax=`` set below this reopens the hole).
JOURNAL_LINE_MAX = 16 * 1024
TRUNCATED = "...[truncated]"


def _journal_renderer(_logger: Any, method: str, event: dict[str, Any]) -> str:
    """``<N>event key=value ...``: values already escaped by :func:`escape_values`,
    the line cut to :data:`JOURNAL_LINE_MAX` bytes."""
    prio = PRIORITY.get(method, 6)
    name = event.pop("event", "")
    event.pop("timestamp", None)
    rest = " ".join(f"{k}={v}" for k, v in event.items())
    line = f"<{prio}>{name} {rest}".rstrip()
    raw = line.encode("utf-8", "surrogateescape")
    if len(raw) <= JOURNAL_LINE_MAX:
        return line
    keep = raw[: JOURNAL_LINE_MAX - len(TRUNCATED)].decode("utf-8", "ignore")
    return keep + TRUNCATED


_LEVEL_COLOURS = {
    "critical": "\x1b[31;1m",
    "exception": "\x1b[31;1m",
    "error": "\x1b[31;1m",
    "warning": "\x1b[33;1m",
    "info": "\x1b[32;1m",
    "debug": "\x1b[34;1m",
}
_KEY_COLOUR, _RESET = "\x1b[36m", "\x1b[0m"


def console_renderer(colours: bool) -> Any:
    """``HH:MM:SS [level   ] event   key=value ...`` for a human at a terminal, values
    already escaped by :func:`escape_values`; the only escape sequences in a line are
    these colours (when ``colours``)."""

    def render(_logger: Any, method: str, event: dict[str, Any]) -> str:
        name = event.pop("event", "")
        stamp = event.pop("timestamp", "")
        level = event.pop("level", method)
        pairs = event.items()
        if colours:
            tag = f"{_LEVEL_COLOURS.get(level, '')}{level:<8}{_RESET}"
            rest = " ".join(f"{_KEY_COLOUR}{k}{_RESET}={v}" for k, v in pairs)
        else:
            tag = f"{level:<8}"
            rest = " ".join(f"{k}={v}" for k, v in pairs)
        return f"{stamp} [{tag}] {name:<30} {rest}".rstrip()

    return render


def _syslog_renderer(_logger: Any, _method: str, event: dict[str, Any]) -> str:
    """``event key=value ...``: the handler adds syslog's own priority and ident."""
    return _journal_renderer(_logger, _method, event).partition(">")[2]


def choose_format(fmt: str, use_stderr: bool) -> str:
    if fmt != "auto":
        return fmt
    if not use_stderr:
        return "syslog" if os.path.exists("/dev/log") else "journal"
    return "journal" if stderr_is_journal() else "console"


def configure_logging(
    level: int,
    fmt: str = "auto",
    use_stderr: bool = True,
    *,
    stream: TextIO | None = None,
    syslog_address: str = "/dev/log",
) -> str:
    """Set up structlog; ``level`` 0 is info, 1 or more is debug. Returns the format.

    ``stream`` (default: stderr) receives the console, journal and JSON lines;
    ``syslog_address`` is the syslog socket."""
    global _with_pid
    fmt = choose_format(fmt, use_stderr)
    _with_pid = fmt == "json"
    out = sys.stderr if stream is None else stream
    min_level = logging.DEBUG if level > 0 else logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_process,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors += [
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ]
    elif fmt == "console":
        processors += [
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            escape_values,
            console_renderer(colours=out.isatty()),
        ]
    elif fmt == "syslog":
        processors += [escape_values, _syslog_renderer]
    else:
        processors += [escape_values, _journal_renderer]
    if fmt == "syslog":
        handler = logging.handlers.SysLogHandler(
            syslog_address, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.ident = "cachefilesd-py: "
        syslog = logging.getLogger("cachefilesd-py")
        syslog.handlers[:] = [handler]
        syslog.setLevel(min_level)
        syslog.propagate = False
        structlog.configure(
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(min_level),
            # every structlog logger, whatever its name, writes to the syslog handler
            logger_factory=lambda *_names: syslog,
            cache_logger_on_first_use=False,
        )
    else:
        structlog.configure(
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(min_level),
            # one write() per line (print() writes the newline separately)
            logger_factory=structlog.WriteLoggerFactory(out),
            cache_logger_on_first_use=False,
        )
    return fmt
