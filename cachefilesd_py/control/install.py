"""``cachefilesctl install``: put the files a ``pipx``/``pip`` installation carries
where systemd and man find them (the Debian package installs them itself).

- the unit, ``/etc/systemd/system/cachefilesd-py.service``, its ``ExecStart`` naming
  the ``cachefilesd-py`` of this installation (the tree's unit names
  ``/usr/local/bin/cachefilesd-py``). The unit sets ``ProtectHome=yes``: a daemon
  installed under ``/root`` or ``/home`` could not start, so that is refused;
- the sample configuration, ``/etc/cachefilesd.conf``, only if there is none (an
  existing file, such as cachefilesd's, is the administrator's and is kept);
- the tmpfiles.d entry for the cache directory, ``/etc/tmpfiles.d/cachefilesd-py.conf``;
- the D-Bus policy that lets the daemon own its name and send its signals on the system
  bus, ``/etc/dbus-1/system.d/org.cachefilesd_py.Cache1.conf``;
- the manual pages, below ``<prefix>/share/man``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from cachefilesd_py.control.cli import register
from cachefilesd_py.control.host_files import data_file

UNIT = "cachefilesd-py.service"
EXEC_START = re.compile(r"^(ExecStart=[-@:+!]*)(\S*/cachefilesd-py)(?=\s|$)", re.MULTILINE)
#: the other commands that run the daemon (``ExecReload=`` checks the configuration)
EXEC_OTHER = re.compile(
    r"^(Exec(?:Reload|StartPre|StartPost|Stop|StopPost)=[-@:+!]*)(\S*/cachefilesd-py)(?=\s|$)",
    re.MULTILINE,
)


def installed_daemon() -> Path:
    """The ``cachefilesd-py`` script of the environment this command runs from."""
    return Path(sysconfig.get_path("scripts")) / "cachefilesd-py"


def render_unit(text: str, daemon: Path) -> str:
    """The unit with ``ExecStart`` (and every other command running the daemon, such as
    the configuration check of ``ExecReload``) naming ``daemon``."""
    rendered, count = EXEC_START.subn(lambda m: m.group(1) + str(daemon), text)
    if count != 1:
        raise ValueError(f"the unit has {count} ExecStart= lines naming cachefilesd-py, not 1")
    return EXEC_OTHER.sub(lambda m: m.group(1) + str(daemon), rendered)


def install(root: Path, prefix: str, daemon: Path) -> list[str]:
    """Install the files below ``root``; what was done, one line each."""
    if not os.access(daemon, os.X_OK):
        raise FileNotFoundError(f"{daemon} is not an executable")
    if any(daemon.is_relative_to(p) for p in ("/root", "/home", "/run/user")):
        raise PermissionError(
            f"{daemon} is below a home directory, which the unit hides (ProtectHome=yes); "
            "install system-wide: PIPX_HOME=/opt/pipx PIPX_BIN_DIR=/usr/local/bin pipx install"
        )
    done: list[str] = []

    def put(name: str, dest: str, text: str | None = None, keep: bool = False) -> None:
        target = root / dest.lstrip("/")
        if keep and target.exists():
            done.append(f"kept      {dest} (already there)")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            shutil.copyfile(data_file(name), target)
        else:
            target.write_text(text)
        target.chmod(0o644)
        done.append(f"installed {dest}")

    unit = render_unit(data_file(UNIT).read_text(), daemon)
    put(UNIT, f"/etc/systemd/system/{UNIT}", unit)
    put("cachefilesd.conf", "/etc/cachefilesd.conf", keep=True)
    put("tmpfiles.conf", "/etc/tmpfiles.d/cachefilesd-py.conf")
    put("dbus-policy.conf", "/etc/dbus-1/system.d/org.cachefilesd_py.Cache1.conf")
    for page in ("cachefilesd-py.8", "cachefilesctl.8", "cachefilesd-py.conf.5"):
        put(page, f"{prefix}/share/man/man{page[-1]}/{page}")
    return done


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="/", help="install below this directory (default /)")
    p.add_argument("--prefix", default="/usr/local", help="for the manual pages")


def _run(args: argparse.Namespace) -> int:
    try:
        done = install(Path(args.root), args.prefix, installed_daemon())
    except (OSError, ValueError) as exc:
        print(f"cachefilesctl install: {exc}", file=sys.stderr)
        return 1
    print("\n".join(done))
    if args.root == "/":
        print(
            "next: systemd-tmpfiles --create cachefilesd-py.conf; systemctl daemon-reload;\n"
            "      edit /etc/cachefilesd.conf; systemctl enable --now cachefilesd-py"
        )
    return 0


register("install", "install the unit, sample configuration and manual pages", _args, _run)
