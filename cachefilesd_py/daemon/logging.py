"""Structured logs through structlog.

- on a terminal: human-readable, coloured key=value lines;
- when stderr is the systemd journal (``$JOURNAL_STREAM`` names stderr's device and
  inode): ``<N>event key=value`` lines with sd-daemon priority prefixes and no
  timestamps (the journal adds its own);
- ``json``: one JSON object per line (the guest tests read these);
- without ``-s``: syslog, ident ``cachefilesd-py``, facility daemon, as cachefilesd does
  (on a terminal too; the journal form on stderr where there is no ``/dev/log``).

Every line names its process's part in the process model (``proc``: supervisor,
serving, spare; docs/failover.md) once :func:`set_process` was called, and is written
with one ``write()``: the supervisor and its workers share stderr.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Any

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


def _journal_renderer(_logger: Any, method: str, event: dict[str, Any]) -> str:
    prio = PRIORITY.get(method, 6)
    name = event.pop("event", "")
    event.pop("timestamp", None)
    rest = " ".join(
        f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}" for k, v in event.items()
    )
    return f"<{prio}>{name} {rest}".rstrip()


def choose_format(fmt: str, use_stderr: bool) -> str:
    if fmt != "auto":
        return fmt
    if not use_stderr:
        return "syslog" if os.path.exists("/dev/log") else "journal"
    return "journal" if stderr_is_journal() else "console"


def configure_logging(level: int, fmt: str = "auto", use_stderr: bool = True) -> str:
    """Set up structlog; ``level`` 0 is info, 1 or more is debug. Returns the format."""
    global _with_pid
    fmt = choose_format(fmt, use_stderr)
    _with_pid = fmt == "json"
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
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ]
    else:
        processors += [_journal_renderer]
    if fmt == "syslog":
        handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
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
            logger_factory=structlog.WriteLoggerFactory(sys.stderr),
            cache_logger_on_first_use=False,
        )
    return fmt
