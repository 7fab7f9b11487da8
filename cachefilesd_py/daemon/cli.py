"""``cachefilesd-py``: the daemon's command line, compatible with cachefilesd's.

    cachefilesd-py [-d]... [-s] [-n] [-N] [-f FILE] [-p PIDFILE] [-v]
                   [--check-config] [--log-format {auto,console,journal,json}]

As cachefilesd: without ``-n`` the daemon binds the cache first and goes to the
background only once that worked, so whoever started it (an init script) sees a failed
bind in the exit status; the background process writes the pidfile (``-p``; none with
``-n``). Logs go to syslog unless ``-s`` (then to stderr). Exit status: 0 fine, 1 OS
error, 2 configuration or option error, 3 internal error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from cachefilesd_py import __version__
from cachefilesd_py.config.load import load_config
from cachefilesd_py.errors import CachefilesdError, ConfigError


@dataclass(frozen=True)
class Options:
    debug: int = 0
    stderr: bool = False
    foreground: bool = False
    nocull: bool = False
    config_path: str = "/etc/cachefilesd.conf"
    pidfile: str = "/var/run/cachefilesd.pid"
    log_format: str = "auto"
    check_config: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> Options:
    p = _Parser(prog="cachefilesd-py", description="cachefiles daemon (classic and on-demand)")
    p.add_argument("-d", action="count", default=0, help="more debugging output (repeatable)")
    p.add_argument("-s", action="store_true", help="log to stderr instead of syslog")
    p.add_argument("-n", action="store_true", help="do not daemonise")
    p.add_argument("-N", action="store_true", help="disable culling")
    p.add_argument(
        "-f",
        default="/etc/cachefilesd.conf",
        metavar="FILE",
        help="configuration file (default %(default)s)",
    )
    p.add_argument(
        "-p",
        default="/var/run/cachefilesd.pid",
        metavar="PIDFILE",
        help="pid file, written only when daemonising (not with -n) (default %(default)s)",
    )
    p.add_argument(
        "-v", "--version", action="version", version=f"cachefilesd-py version {__version__}"
    )
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration, print it and exit"
    )
    p.add_argument("--log-format", choices=("auto", "console", "journal", "json"), default="auto")
    a = p.parse_args(argv)
    return Options(a.d, a.s, a.n, a.N, a.f, a.p, a.log_format, a.check_config)


def main(argv: list[str] | None = None) -> int:
    # first: before anything imports structlog (daemon/lean_imports.py says why)
    from cachefilesd_py.daemon.lean_imports import import_structlog

    import_structlog()
    opts = parse_args(argv)
    if opts.check_config:
        from cachefilesd_py.config.check import check_config_main

        return check_config_main(opts.config_path)
    try:
        cfg = load_config(opts.config_path)
    except ConfigError as exc:
        print(f"cachefilesd-py: {exc}", file=sys.stderr)
        return exc.exit_code
    from cachefilesd_py.daemon.logging import configure_logging

    configure_logging(opts.debug + (1 if cfg.debug else 0), opts.log_format, opts.stderr)
    import os

    import structlog

    if cfg.dir is not None and not os.path.isdir(cfg.dir):
        # before the imports a worker needs: a start that cannot work fails fast
        structlog.get_logger("daemon").error("fatal", error="Can't confirm cache location",
                                             dir=cfg.dir, status=1)
        print(f"cachefilesd-py: Can't confirm cache location: {cfg.dir}", file=sys.stderr)
        return 1

    from cachefilesd_py.daemon import start  # imports everything: workers fork from here

    log = structlog.get_logger("daemon")
    try:
        return start.run(cfg, opts)
    except CachefilesdError as exc:
        log.error("fatal", error=str(exc), status=exc.exit_code)
        print(f"cachefilesd-py: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        log.error("fatal", error=exc.strerror or str(exc), errno=exc.errno, status=1)
        print(f"cachefilesd-py: {exc.strerror or exc}: errno {exc.errno}", file=sys.stderr)
        return 1
    except Exception as exc:  # pragma: no cover - last resort
        log.exception("fatal", status=3)
        print(f"cachefilesd-py: Internal error: {exc!r}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
