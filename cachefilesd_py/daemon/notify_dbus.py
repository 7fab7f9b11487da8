"""D-Bus signals for what needs a person's attention, on the system bus.

Interface ``org.cachefilesd_py.Cache1`` on object ``/org/cachefilesd_py/Cache1``; the
daemon asks for the bus name of the same spelling (``packaging/dbus/`` lets root own
it and everyone receive its signals). Signals (D-Bus signatures in brackets):

- ``SourceOffline(source s, reason s)``, ``SourceOnline(source s, reason s)``: the
  connectivity tracker's transitions (``sources/online.py``);
- ``ReadWaiting(volume s, cookie s, offset t, length t, cap_seconds d)``: a READ of
  missing bytes is held until its source is back (``wait`` offline policy);
- ``Conflict(volume s, cookie s, cached s, upstream s)``: a blob changed upstream
  while cached (the two version tokens, ``size:etag``);
- ``CredentialsRejected(source s, status q)``: the source answered 401 or 403.

Watch them with ``dbus-monitor --system "interface='org.cachefilesd_py.Cache1'"``.

The library is jeepney (pure Python, no dependencies, a blocking I/O module that fits
the daemon's threads). Emitting never blocks or fails the caller: ``emit`` puts the
message in a bounded queue (the oldest is dropped when it is full, and counted) and
one sender thread owns the connection. When no bus runs (a container, an initramfs,
the test guest) the sender logs one line and tries again at most every
``retry_seconds``, on the next signal.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from jeepney import DBusAddress, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, Proxy, open_dbus_connection

log = structlog.get_logger("daemon.notify_dbus")

BUS_NAME = "org.cachefilesd_py.Cache1"
INTERFACE = "org.cachefilesd_py.Cache1"
OBJECT_PATH = "/org/cachefilesd_py/Cache1"

SIGNATURES = {
    "SourceOffline": "ss",
    "SourceOnline": "ss",
    "ReadWaiting": "ssttd",
    "Conflict": "ssss",
    "CredentialsRejected": "sq",
}

REQUEST_NAME_DO_NOT_QUEUE = 4
PRIMARY_OWNER = 1
ALREADY_OWNER = 4


class DbusNotifier:
    """Sends the signals above on ``bus`` (``"SYSTEM"``, ``"SESSION"`` or an address
    such as ``unix:path=/run/dbus/system_bus_socket``)."""

    def __init__(
        self,
        bus: str = "SYSTEM",
        *,
        queue_size: int = 256,
        retry_seconds: float = 30.0,
        own_name: bool = True,
        connect: Callable[[str], DBusConnection] = open_dbus_connection,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.retry_seconds = retry_seconds
        self.own_name = own_name
        self._connect = connect
        self._clock = clock
        self._queue: collections.deque[tuple[str, tuple[Any, ...]]] = collections.deque(
            maxlen=queue_size
        )
        self._cond = threading.Condition()
        self._stopping = False
        self._conn: DBusConnection | None = None
        self._next_try = 0.0
        self._said_unavailable = False
        self.sent = 0
        self.dropped = 0
        self._addr = DBusAddress(OBJECT_PATH, interface=INTERFACE)
        self._thread = threading.Thread(target=self._run, name="dbus-notify", daemon=True)
        self._thread.start()

    # -- the signals ---------------------------------------------------------------------

    def source_offline(self, source: str, reason: str) -> None:
        self.emit("SourceOffline", source, reason)

    def source_online(self, source: str, reason: str) -> None:
        self.emit("SourceOnline", source, reason)

    def read_waiting(
        self, volume: str, cookie: str, offset: int, length: int, cap_seconds: float
    ) -> None:
        self.emit("ReadWaiting", volume, cookie, offset, length, float(cap_seconds))

    def conflict(self, volume: str, cookie: str, cached: str, upstream: str) -> None:
        self.emit("Conflict", volume, cookie, cached, upstream)

    def credentials_rejected(self, source: str, status: int) -> None:
        self.emit("CredentialsRejected", source, status)

    def emit(self, member: str, *args: Any) -> None:
        """Queue a signal; returns at once, whatever the bus does."""
        if member not in SIGNATURES:
            raise ValueError(f"unknown signal {member}")
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append((member, args))
            self._cond.notify()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty (sent or dropped); for tests and shutdown."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not self._queue

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(10)

    # -- the sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                member, args = self._queue[0]
            conn = self._connection()
            if conn is None:
                with self._cond:  # no bus: what is queued now is lost, counted
                    self.dropped += len(self._queue)
                    self._queue.clear()
                    self._cond.notify_all()
                continue
            try:
                conn.send(new_signal(self._addr, member, SIGNATURES[member], args))
                self.sent += 1
            except Exception as exc:  # the bus went away: drop the connection, go on
                log.warning("dbus.send_failed", signal=member, error=str(exc))
                self._drop_connection()
                self.dropped += 1
            with self._cond:
                if self._queue and self._queue[0] == (member, args):
                    self._queue.popleft()
                self._cond.notify_all()
        self._drop_connection()

    def _connection(self) -> DBusConnection | None:
        if self._conn is not None:
            return self._conn
        now = self._clock()
        if now < self._next_try:
            return None
        try:
            conn = self._connect(self.bus)
        except Exception as exc:  # no bus, no socket, refused
            self._next_try = now + self.retry_seconds
            if not self._said_unavailable:
                log.info("dbus.unavailable", bus=self.bus, error=str(exc))
                self._said_unavailable = True
            return None
        self._said_unavailable = False
        if self.own_name:
            self._request_name(conn)
        self._conn = conn
        return conn

    def _request_name(self, conn: DBusConnection) -> None:
        try:
            bus = Proxy(message_bus, conn, timeout=5)
            (code,) = bus.RequestName(BUS_NAME, REQUEST_NAME_DO_NOT_QUEUE)
        except Exception as exc:  # refused by policy: signals still go out
            log.info("dbus.name_not_owned", name=BUS_NAME, error=str(exc))
            return
        if code not in (PRIMARY_OWNER, ALREADY_OWNER):
            log.info("dbus.name_not_owned", name=BUS_NAME, code=code)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
