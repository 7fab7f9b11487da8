"""Structured logs through structlog.

- on a terminal: human-readable, coloured key=value lines;
- when stderr is the systemd journal (``$JOURNAL_STREAM`` names stderr's device and
  inode): ``<N>event key=value`` lines with sd-daemon priority prefixes and no
  timestamps (the journal adds its own);
- ``json``: one JSON object per line (the guest tests read these);
- otherwise (no ``-s``, not the journal): syslog, ident ``cachefilesd-py``, facility
  daemon, as cachefilesd does.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Any

import structlog

PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}


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
    if stderr_is_journal():
        return "journal"
    if use_stderr or sys.stderr.isatty():
        return "console"
    return "syslog" if os.path.exists("/dev/log") else "journal"


def configure_logging(level: int, fmt: str = "auto", use_stderr: bool = True) -> str:
    """Set up structlog; ``level`` 0 is info, 1 or more is debug. Returns the format."""
    fmt = choose_format(fmt, use_stderr)
    min_level = logging.DEBUG if level > 0 else logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
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
        structlog.configure(
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(min_level),
            logger_factory=structlog.stdlib.LoggerFactory(),
            cache_logger_on_first_use=False,
        )
    else:
        structlog.configure(
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(min_level),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=False,
        )
    return fmt
