"""The connectivity driver: rtnetlink broadcasts in, online/offline transitions out.

The kernel tells every process subscribed to an rtnetlink multicast group about each
change of links (``RTNLGRP_LINK``: ``RTM_NEWLINK`` with the device's flags whenever
they change — ``IFF_UP`` on ``ip link set up/down``, ``IFF_LOWER_UP`` when the carrier
comes or goes, e.g. the peer of a veth pair going down — and ``RTM_DELLINK``),
addresses (``RTNLGRP_IPV4_IFADDR``/``IPV6_IFADDR``) and routes
(``RTNLGRP_IPV4_ROUTE``/``IPV6_ROUTE``). One thread of this driver sleeps in
``select()`` on such a socket (pyroute2's ``IPRoute().bind()``) and wakes only when the
kernel has news: nothing is polled, so a link going down reaches the state machine
within the time it takes to read one message.

For each source host (resolved once with ``getaddrinfo``: an IP literal or a name),
the driver asks the kernel which route reaches it (``RTM_GETROUTE``, the question
``ip route get ADDR`` asks; pyroute2's ``IPRoute().route('get', dst=...)``): the
answer names the output device (``RTA_OIF``) and the route type (``RTN_LOCAL`` for an
address of this machine, served over loopback; ``RTN_UNREACHABLE``, ``RTN_BLACKHOLE``,
``RTN_PROHIBIT``, or an ``ENETUNREACH``/``EHOSTUNREACH`` error when there is no way
there). It asks again after every address or route change — a changed address or
route can move or remove the path — and feeds the answers, the link changes and the
engine's fetch outcomes to :class:`~cachefilesd_py.sources.online.ConnectivityTracker`.

A host whose name does not resolve (DNS may be one of the things that are offline) is
not judged by the network: fetch outcomes alone decide for it, and its name is
resolved again, off the event thread, after each network change.

Admin-down drops the device's IPv4 routes (the kernel flushes them), while a lost
carrier keeps them (marked ``linkdown``): both normally arrive first as an
``RTM_NEWLINK`` without ``IFF_UP`` or ``IFF_LOWER_UP``. The kernel sends carrier
changes through its linkwatch work, which coalesces them: a carrier lost shortly after
a device came up can show up only as a route message, so every route or address event
also re-reads the links (one dump), never trusting the last flags seen.

Run ``python -m cachefilesd_py.sources.netlink HOST...`` to watch the transitions the
driver sees (one JSON object per line, with the monotonic time): a diagnostic for
operators, and the probe the tests run inside network namespaces.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.sources.online import (
    ConnectivityTracker,
    Event,
    FailureKind,
    FetchFailed,
    FetchSucceeded,
    Hysteresis,
    Link,
    LinkChanged,
    Route,
    RouteResolved,
    SourceState,
    Status,
    Transition,
)

log = structlog.get_logger("sources.netlink")

# <linux/rtnetlink.h> multicast groups (the RTMGRP_* bit masks of the legacy bind)
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)

# <linux/if.h> device flags
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_LOWER_UP = 0x10000

# <linux/rtnetlink.h> route types
RTN_LOCAL = 2
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RTN_PROHIBIT = 8
ROUTE_ERRORS = {
    errno.EINVAL: "blackhole route",
    errno.EHOSTUNREACH: "unreachable route",
    errno.EACCES: "prohibited route",
    errno.ENETUNREACH: "network unreachable",
}
NO_WAY = {RTN_BLACKHOLE: "blackhole route", RTN_UNREACHABLE: "unreachable route",
          RTN_PROHIBIT: "prohibited route"}

# <linux/rtnetlink.h> message types that ring the doorbell
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
WATCHED = {RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE}
NLMSG_HDR = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid

Resolver = Callable[[str], list[str]]


def resolve_host(host: str) -> list[str]:
    """The addresses of ``host`` (an IP literal resolves to itself), IPv4 first."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    addrs = [str(info[4][0]) for info in infos]
    return sorted(dict.fromkeys(addrs), key=lambda a: ":" in a)


def link_from_message(msg: Any) -> Link:
    flags = int(msg["flags"])
    name = msg.get_attr("IFLA_IFNAME") or f"if{msg['index']}"
    carrier = bool(flags & IFF_LOWER_UP) or bool(flags & IFF_LOOPBACK)
    return Link(int(msg["index"]), str(name), up=bool(flags & IFF_UP) and carrier)


def failure_kind(exc: BaseException) -> FailureKind | None:
    """Whether a fetch error says the server could not be reached, and how: walks the
    chain of causes (urllib3 wraps the socket error) for refused, unreachable and
    timed-out connections. None for everything else (the server answered)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError):
            return FailureKind.REFUSED
        if isinstance(cur, OSError) and cur.errno in (
            errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN
        ):
            return FailureKind.UNREACHABLE
        if isinstance(cur, TimeoutError) or "Timeout" in type(cur).__name__:
            return FailureKind.TIMEOUT
        cur = cur.__cause__ or cur.__context__
    return None


def _open_iproute() -> Any:
    """A pyroute2 socket for questions (dumps, ``route get``), subscribed to nothing."""
    try:
        return IPRoute(groups=0)
    except TypeError:  # pyroute2 releases whose constructor takes no groups
        return IPRoute()


class NetlinkConnectivity:
    """Online/offline state of the sources in ``hosts`` (source name → host), kept
    up to date by rtnetlink events and fetch outcomes. Thread-safe.

    ``on_transition`` is called for every change (from the event thread or from the
    thread that reported a fetch outcome), outside the lock.
    """

    def __init__(
        self,
        hosts: Mapping[str, str],
        *,
        on_transition: Callable[[Transition], None] | None = None,
        hysteresis: Hysteresis | None = None,
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hosts = dict(hosts)
        self.on_transition = on_transition
        self.resolver = resolver
        self.clock = clock
        self._tracker = ConnectivityTracker(hysteresis or Hysteresis())
        self._lock = threading.Lock()
        self._addrs: dict[str, list[str]] = {}
        self._links: dict[int, Link] = {}
        self._wake_r: OwnedFd | None = None
        self._wake_w: OwnedFd | None = None
        self._thread: threading.Thread | None = None
        self._resolving = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._reroute = threading.Event()
        self._failed: BaseException | None = None
        now = clock()
        for source in self.hosts:
            self._tracker.add_source(source, now)

    # -- the engine's side ----------------------------------------------------------------

    def status(self, source: str) -> Status:
        with self._lock:
            return self._tracker.status(source)

    def state(self, source: str) -> SourceState:
        with self._lock:
            return self._tracker.state(source)

    def may_fetch(self, source: str) -> bool:
        """Whether a fetch from ``source`` would be admitted now (a query: no probe
        is used up)."""
        with self._lock:
            return self._tracker.may_fetch(source, self.clock())

    def admit(self, source: str) -> bool:
        """Whether to attempt a fetch from ``source`` now (see ``ConnectivityTracker.admit``)."""
        with self._lock:
            return self._tracker.admit(source, self.clock())

    def fetch_succeeded(self, source: str) -> None:
        self._apply([FetchSucceeded(source)])

    def fetch_failed(self, source: str, exc: BaseException) -> None:
        """Report a failed fetch; errors that prove the server reachable count as
        reachability (an HTTP 503 is an answer)."""
        kind = failure_kind(exc)
        self._apply([FetchSucceeded(source) if kind is None else FetchFailed(source, kind)])

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the event thread and wait until it is subscribed, knows the links and
        has asked for every resolved host's route. Every netlink socket is opened and
        used by that one thread only (pyroute2 0.9's synchronous ``IPRoute`` keeps its
        transport per thread), and subscribing comes first, so that nothing that
        happens during the initial questions is missed."""
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_r, self._wake_w = OwnedFd(r), OwnedFd(w)
        self._thread = threading.Thread(target=self._run, name="netlink", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError("netlink: the event thread did not start")
        if self._failed is not None:
            err = self._failed
            self.stop()
            raise err

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for owned in (self._wake_r, self._wake_w):
            if owned is not None:
                owned.close()
        self._wake_r = self._wake_w = None

    def __enter__(self) -> NetlinkConnectivity:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        with contextlib.suppress(OSError), self._wake_w.borrow() as fd:
            os.write(fd, b"x")

    def _apply(self, events: Iterable[Event]) -> None:
        transitions: list[Transition] = []
        with self._lock:
            now = self.clock()
            for ev in events:
                transitions += self._tracker.apply(ev, now)
        for tr in transitions:
            log.info(
                "source." + tr.new.value, source=tr.source, reason=tr.reason, was=tr.old.value
            )
            if self.on_transition is not None:
                self.on_transition(tr)

    def _resolve(self, source: str, host: str) -> bool:
        try:
            addrs = self.resolver(host)
        except OSError as exc:
            log.warning("source.unresolved", source=source, host=host, error=str(exc))
            return False
        if not addrs:
            return False
        with self._lock:
            self._addrs[source] = addrs
        return True

    def _route_to(self, query: Any, addr: str) -> tuple[Route | None, str]:
        try:
            answer = query.route("get", dst=addr)
        except NetlinkError as exc:
            # the kernel answers a question towards a blackhole route with EINVAL, an
            # unreachable one with EHOSTUNREACH, a prohibit one with EACCES
            what = ROUTE_ERRORS.get(exc.code, os.strerror(exc.code))
            return None, f"no route to {addr} ({what})"
        if not answer:
            return None, f"no route to {addr}"
        msg = answer[0]
        rtype = int(msg["type"])
        if rtype in NO_WAY:
            return None, f"{NO_WAY[rtype]} to {addr}"
        oif = msg.get_attr("RTA_OIF")
        if oif is None:
            return None, f"no output device towards {addr}"
        link = self._links.get(int(oif))
        name = link.ifname if link else f"if{oif}"
        return Route(int(oif), name, local=rtype == RTN_LOCAL), ""

    def _routes(self, query: Any) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            addrs = dict(self._addrs)
        for source, candidates in addrs.items():
            why = ""
            for addr in candidates:
                route, why = self._route_to(query, addr)
                if route is not None:
                    events.append(RouteResolved(source, route))
                    break
            else:
                events.append(RouteResolved(source, None, why))
        return events

    def _links_now(self, query: Any) -> list[Event]:
        events: list[Event] = []
        for msg in query.get_links():
            link = link_from_message(msg)
            self._links[link.ifindex] = link
            events.append(LinkChanged(link))
        return events

    def _resolve_missing_later(self) -> None:
        """Resolve the names that did not resolve, off the event thread (a DNS timeout
        must not delay link events); the event thread asks for their routes when woken."""
        with self._lock:
            missing = {s: h for s, h in self.hosts.items() if s not in self._addrs}
        if not missing or not self._resolving.acquire(blocking=False):
            return

        def work() -> None:
            try:
                if any([self._resolve(s, h) for s, h in missing.items()]):
                    self._reroute.set()
                    self._wake()
            finally:
                self._resolving.release()

        threading.Thread(target=work, name="netlink-resolve", daemon=True).start()

    def _run(self) -> None:
        bell = query = None
        try:
            bell = open_doorbell()
            query = _open_iproute()
            self._apply(self._links_now(query))
            for source, host in self.hosts.items():
                self._resolve(source, host)
            self._apply(self._routes(query))
        except Exception as exc:  # handed to start()
            self._failed = exc
            self._ready.set()
            if bell is not None:
                bell.close()
            if query is not None:
                query.close()
            return
        self._ready.set()
        try:
            self._loop(bell, query)
        finally:
            bell.close()
            query.close()

    def _loop(self, bell: socket.socket, query: Any) -> None:
        assert self._wake_r is not None
        wake_fd = self._wake_r.fileno()
        while not self._stop.is_set():
            ready, _, _ = select.select([bell.fileno(), wake_fd], [], [])
            if self._stop.is_set():
                return
            if wake_fd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_fd, 4096)
            rang = bell.fileno() in ready and ring_count(bell) > 0
            if rang or self._reroute.is_set():
                self._reroute.clear()
                # links first: a link going down decides at once, before the route
                # questions
                self._apply(self._links_now(query))
                self._apply(self._routes(query))
            if rang:
                self._resolve_missing_later()


def open_doorbell() -> socket.socket:
    """A non-blocking rtnetlink socket subscribed to link, address and route changes.

    Its messages are used as a doorbell only: on any of them the driver reads the
    current truth (a dump of the links, a route question per host) through pyroute2.
    Rebuilding state from dumps never acts on a stale message, and survives the
    kernel dropping broadcasts when the socket's buffer overflows (``ENOBUFS``).
    The socket is the standard library's rather than pyroute2's
    ``IPRoute().bind()``: pyroute2 0.9's synchronous ``get()`` parses every datagram
    that is waiting but may return only part of them, keeping the rest in a queue
    that ``select()`` cannot see, so a link-down message could sit there until the
    next change (seen while building this driver).
    """
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        socket.NETLINK_ROUTE,
    )
    try:
        sock.bind((0, GROUPS))
    except OSError:
        sock.close()
        raise
    return sock


def ring_count(bell: socket.socket) -> int:
    """Read every waiting datagram; how many link/address/route messages they held
    (an overrun counts as one: something changed, the dumps will tell what)."""
    count = 0
    while True:
        try:
            data = bell.recv(65536)
        except BlockingIOError:
            return count
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            log.warning("netlink.overrun", error=str(exc))
            count += 1
            continue
        count += sum(1 for kind in message_types(data) if kind in WATCHED)


def message_types(data: bytes) -> list[int]:
    """The ``nlmsg_type`` of each netlink message in a datagram (the walk is bounded
    by the datagram's size; a malformed header ends it)."""
    kinds = []
    pos = 0
    while pos + NLMSG_HDR.size <= len(data):
        length, kind = NLMSG_HDR.unpack_from(data, pos)[:2]
        if length < NLMSG_HDR.size:
            break
        kinds.append(kind)
        pos += (length + 3) & ~3
    return kinds


def main(argv: list[str] | None = None) -> int:
    """Watch the given hosts; print each transition as JSON (``at`` is monotonic time)."""
    hosts = list(sys.argv[1:] if argv is None else argv)
    if not hosts:
        print("usage: python -m cachefilesd_py.sources.netlink HOST...", file=sys.stderr)
        return 2

    def show(tr: Transition) -> None:
        print(json.dumps({"source": tr.source, "old": tr.old.value, "new": tr.new.value,
                          "reason": tr.reason, "at": tr.at}), flush=True)

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with NetlinkConnectivity({h: h for h in hosts}, on_transition=show):
        print(json.dumps({"ready": True, "at": time.monotonic()}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
