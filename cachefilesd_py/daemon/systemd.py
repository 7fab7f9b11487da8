"""A small sd_notify client: readiness, status, the watchdog and the fd store.

Messages go as one datagram to ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract
socket); fds for the store travel as SCM_RIGHTS. Without ``$NOTIFY_SOCKET`` (not run
by systemd) every call is a no-op that returns False. Only the supervisor (the unit's
main process, ``NotifyAccess=main``) talks to systemd; workers drop these variables.

The fd store (docs/failover.md): ``FDSTORE=1`` + ``FDNAME=cachefiles`` + ``FDPOLL=0``
hands systemd a duplicate of the bound ``/dev/cachefiles`` fd. systemd keeps it while the
service restarts (crash, watchdog, ``systemctl restart``) and passes it back in
``LISTEN_FDS``/``LISTEN_FDNAMES``; ``systemctl stop`` and a unit that ends ``failed``
(start limit) close it, which unbinds the cache. ``FDPOLL=0``: systemd would drop a
stored fd on POLLHUP/POLLERR; the device never raises them, so it is told not to poll.
"""

from __future__ import annotations

import array
import os
import socket

import structlog

log = structlog.get_logger("systemd")

#: the name the bound device is stored under
DEVICE_FDNAME = "cachefiles"
#: the variables systemd sets for the main process only
_MAIN_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
              "LISTEN_FDNAMES")


def notify(state: str, fds: list[int] | None = None) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            if fds:
                # socket.send_fds() drops its address argument (CPython 3.11): sendmsg
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sock.sendmsg([state.encode()], rights, 0, addr)
            else:
                sock.sendto(state.encode(), addr)
    except OSError as exc:
        # systemd being re-executed or gone must not take the daemon down
        log.warning("systemd.notify_failed", state=state.split("\n", 1)[0], error=str(exc))
        return False
    return True


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def ready(status_text: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    return notify("RELOADING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between the pings systemd expects (``WatchdogSec=``), or None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


def fdstore(fd: int, name: str = DEVICE_FDNAME) -> bool:
    """Hand a duplicate of ``fd`` to systemd's fd store (FDPOLL=0: never dropped on HUP)."""
    return notify(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", [fd])


def fdstore_remove(name: str = DEVICE_FDNAME) -> bool:
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def listen_fds() -> dict[str, int]:
    """Fds passed by systemd (``LISTEN_FDS`` from 3 up), by ``LISTEN_FDNAMES``; they are
    made close-on-exec and the ``LISTEN_*`` variables removed, as sd_listen_fds(1) does."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    except ValueError:
        count = 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    found = {}
    for i in range(count):
        fd = 3 + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        found[names[i] if i < len(names) and names[i] else f"fd{fd}"] = fd
    return found


def forget_main_process_variables() -> None:
    """In a child of the main process: nothing it sends would be accepted
    (``NotifyAccess=main``), and the watchdog and passed fds are the parent's."""
    for var in _MAIN_ONLY:
        os.environ.pop(var, None)
