"""A small sd_notify client: readiness, status, and the fd store.

Messages go as one datagram to ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract
socket); fds for the store travel as SCM_RIGHTS. Without ``$NOTIFY_SOCKET`` (not run
by systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, fds: list[int] | None = None) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        if fds:
            socket.send_fds(sock, [state.encode()], fds, address=addr)
        else:
            sock.sendto(state.encode(), addr)
    return True


def ready() -> bool:
    return notify("READY=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def fdstore(fd: int, name: str) -> bool:
    return notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def fdstore_remove(name: str) -> bool:
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def listen_fds() -> dict[str, int]:
    """Fds passed by systemd (``LISTEN_FDS`` from 3 up), by ``LISTEN_FDNAMES``."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    found = {}
    for i in range(count):
        fd = 3 + i
        os.set_inheritable(fd, False)
        found[names[i] if i < len(names) and names[i] else f"fd{fd}"] = fd
    return found
