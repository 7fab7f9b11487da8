# PYTHON_ARGCOMPLETE_OK
"""``cachefilesctl``: the control command line. Sub-commands register here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from cachefilesd_py import __version__


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(
    name: str,
    help: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    COMMANDS[name] = Command(name, help, add_args, run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachefilesctl", description="control cachefilesd-py")
    p.add_argument("--version", action="version", version=f"cachefilesctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help)
        cmd.add_args(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    import argcomplete

    from cachefilesd_py.control import install, live  # noqa: F401  (register sub-commands)

    parser = build_parser()
    argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    # ``python -m`` runs this file as ``__main__``, a second copy of the module whose
    # COMMANDS no sub-command registers into: run the real module's main
    from cachefilesd_py.control.cli import main as real_main

    sys.exit(real_main())
