"""Whether each source's credentials are being rejected (HTTP 401 or 403).

An HTTP source answers ``401 Unauthorized`` when the request carried no valid
credentials and ``403 Forbidden`` when they are refused for the resource; in both
cases no fetch from that origin will succeed until the credentials change (the
``source_headers`` files, ``cachefilesctl credentials reload``). The source turns
such an answer into a :class:`~cachefilesd_py.errors.SourceError` whose reason is
``http-401`` or ``http-403`` (``sources/http.py``); the offline gate
(``engine/offline.py``), which every fetch and identity request passes, tells this
object the outcome of each one.

:class:`CredentialsWatch` keeps one bit of state per origin — rejected with a status,
or not — and calls ``on_change(origin, status)`` only on a transition: ``status`` is
the HTTP status when the credentials became rejected, None when a later fetch
succeeded. A hundred failing READs make one log line and one D-Bus signal, not a
hundred. :meth:`clear` forgets every rejection (after a credentials reload the next
fetch decides again) and reports nothing.

Frontend-independent: the daemon wires ``on_change`` to its log and D-Bus emitter.
Lock order: ``_lock`` is a leaf; ``on_change`` runs with it released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cachefilesd_py.errors import SourceError

#: the answers that mean "these credentials do not open this source"
REJECTED_STATUS = {"http-401": 401, "http-403": 403}


def rejected_status(exc: BaseException) -> int | None:
    """401 or 403 when ``exc`` is a source's answer of that status, else None."""
    if isinstance(exc, SourceError):
        return REJECTED_STATUS.get(exc.reason)
    return None


class CredentialsWatch:
    """Per-origin "credentials rejected" state (see the module docstring)."""

    def __init__(self, on_change: Callable[[str, int | None], None] | None = None) -> None:
        self.on_change = on_change
        self._lock = threading.Lock()
        self._rejected: dict[str, int] = {}
        self._seen: set[str] = set()

    def outcome(self, origin: str, exc: BaseException | None) -> None:
        """A fetch from ``origin`` ended: ``exc`` None when it succeeded. Errors other
        than a 401/403 answer say nothing about the credentials."""
        status = None if exc is None else rejected_status(exc)
        if exc is not None and status is None:
            return
        with self._lock:
            self._seen.add(origin)
            before = self._rejected.get(origin)
            if status is None:
                if before is None:
                    return
                del self._rejected[origin]
            else:
                if before is not None:
                    return
                self._rejected[origin] = status
        if self.on_change is not None:
            self.on_change(origin, status)

    def clear(self) -> list[str]:
        """Forget every rejection (credentials reloaded); the origins that had one."""
        with self._lock:
            cleared = sorted(self._rejected)
            self._rejected.clear()
        return cleared

    def status(self, origin: str) -> int | None:
        with self._lock:
            return self._rejected.get(origin)

    def describe(self, origin: str) -> str:
        """``"ok"`` or ``"rejected (HTTP 401)"``, for ``cachefilesctl status``."""
        status = self.status(origin)
        return "ok" if status is None else f"rejected (HTTP {status})"

    def origins(self) -> list[str]:
        """Every origin a fetch has told about (a success or a 401/403)."""
        with self._lock:
            return sorted(self._seen)
