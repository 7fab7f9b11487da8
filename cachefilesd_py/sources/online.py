"""Is a source reachable? A pure, per-source online/offline state machine.

Two kinds of evidence drive it, both fed in by drivers; the machine does no I/O and
reads no clock (every call takes ``now``, in seconds of ``time.monotonic()``):

- **Netlink facts** (``sources/netlink.py`` translates the kernel's rtnetlink
  broadcasts): which route and output device the kernel would use to reach the source's
  host (:class:`RouteResolved`, the answer of an ``RTM_GETROUTE`` query asked again
  whenever an address or route changes), and whether a device is up
  (:class:`LinkChanged`, from ``RTM_NEWLINK``/``RTM_DELLINK``). The path to a host is
  *up* when the kernel has a route to it and that route's device is administratively
  up with a carrier (``IFF_UP`` and ``IFF_LOWER_UP``; the loopback device only needs
  ``IFF_UP``). A path going down takes the source offline at once: this is how going
  offline is noticed within a second without polling anything.
- **Fetch outcomes** (:class:`FetchSucceeded`, :class:`FetchFailed` with a
  :class:`FailureKind`): a fetch that could not reach the server (connection refused,
  host or network unreachable, connect or read timeout). These are noisy — one
  timeout on a healthy link is usually one slow answer — so a source goes offline on
  fetch failures only after ``failures_to_offline`` of them in a row, with no success
  in between (the hysteresis). Any success resets the count and brings the source
  online, whatever the path said: the server answering is the strongest evidence.

An offline source is not fetched from, except for a **probe**: when the path is up
(the server, not the network, seemed gone), one fetch is allowed at ``probe_at``,
with the delay doubling from ``probe_first`` up to ``probe_max`` after each failed
probe. A path coming back up (a link up, a new route) makes the source online at
once; the next fetch is its probe in effect, and a failure there counts as usual.

Every change of state is returned as a :class:`Transition` with a human-readable
reason, for the log, systemd's ``STATUS=`` and the D-Bus signals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class Status(enum.Enum):
    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"


class FailureKind(enum.Enum):
    """Fetch failures that say the server could not be reached (others — an HTTP
    error status, a short body — prove it is reachable and count as reachability)."""

    REFUSED = "connection refused"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Route:
    """The kernel's answer to "how do I reach this host": the output device."""

    ifindex: int
    ifname: str = ""
    local: bool = False  # an address of this machine (RTN_LOCAL), served over loopback


@dataclass(frozen=True)
class Link:
    ifindex: int
    ifname: str
    up: bool  # IFF_UP and (IFF_LOWER_UP or loopback)


# -- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkChanged:
    link: Link


@dataclass(frozen=True)
class LinkRemoved:
    ifindex: int


@dataclass(frozen=True)
class RouteResolved:
    """The route to ``source``'s host, or None with ``why`` (no route, name unknown)."""

    source: str
    route: Route | None
    why: str = ""


@dataclass(frozen=True)
class FetchSucceeded:
    source: str


@dataclass(frozen=True)
class FetchFailed:
    source: str
    kind: FailureKind


Event = LinkChanged | LinkRemoved | RouteResolved | FetchSucceeded | FetchFailed


# -- outputs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    source: str
    old: Status
    new: Status
    reason: str
    at: float


@dataclass(frozen=True)
class Hysteresis:
    failures_to_offline: int = 3
    probe_first: float = 1.0
    probe_max: float = 60.0

    def __post_init__(self) -> None:
        if self.failures_to_offline < 1:
            raise ValueError("failures_to_offline must be at least 1")
        if not 0 < self.probe_first <= self.probe_max:
            raise ValueError("need 0 < probe_first <= probe_max")


@dataclass(frozen=True)
class SourceState:
    status: Status = Status.UNKNOWN
    reason: str = "no evidence yet"
    since: float = 0.0
    route: Route | None = None
    last_route: Route | None = None  # the last route seen (to say why it went away)
    route_known: bool = False  # a RouteResolved came in (else the path is not judged)
    route_why: str = ""
    failures: int = 0  # consecutive fetch failures
    last_failure: FailureKind | None = None
    probe_at: float | None = None  # offline on fetch evidence: when one probe may go
    probe_delay: float = 0.0


@dataclass
class ConnectivityTracker:
    """The state of every source; ``apply`` an event, get the transitions it caused."""

    hysteresis: Hysteresis = field(default_factory=Hysteresis)
    _sources: dict[str, SourceState] = field(default_factory=dict)
    _links: dict[int, Link] = field(default_factory=dict)

    # -- queries ------------------------------------------------------------------------

    def sources(self) -> tuple[str, ...]:
        return tuple(self._sources)

    def state(self, source: str) -> SourceState:
        return self._sources[source]

    def status(self, source: str) -> Status:
        return self._sources[source].status

    def may_fetch(self, source: str, now: float) -> bool:
        """Whether a fetch from ``source`` would be admitted now (a query only)."""
        st = self._sources[source]
        if st.status is not Status.OFFLINE:
            return True
        return st.probe_at is not None and now >= st.probe_at

    def admit(self, source: str, now: float) -> bool:
        """Claim the right to fetch from ``source`` now. Online (and not yet judged)
        sources admit every fetch; an offline one admits only its due probe, and only
        once: the next probe is not due before another ``probe_delay`` (a failure of
        this one doubles the delay from there)."""
        if not self.may_fetch(source, now):
            return False
        st = self._sources[source]
        if st.status is Status.OFFLINE:
            self._sources[source] = replace(st, probe_at=now + st.probe_delay)
        return True

    # -- changes ------------------------------------------------------------------------

    def add_source(self, source: str, now: float) -> None:
        self._sources.setdefault(source, SourceState(since=now))

    def apply(self, event: Event, now: float) -> list[Transition]:
        if isinstance(event, LinkChanged):
            self._links[event.link.ifindex] = event.link
            return self._rejudge_paths(now, only_ifindex=event.link.ifindex)
        if isinstance(event, LinkRemoved):
            self._links.pop(event.ifindex, None)
            return self._rejudge_paths(now, only_ifindex=event.ifindex)
        st = self._sources.get(event.source)
        if st is None:
            return []
        if isinstance(event, RouteResolved):
            st = replace(
                st,
                route=event.route,
                last_route=event.route or st.last_route,
                route_known=True,
                route_why=event.why,
            )
            self._sources[event.source] = st
            return self._rejudge(event.source, now)
        if isinstance(event, FetchSucceeded):
            st = replace(st, failures=0, last_failure=None, probe_at=None, probe_delay=0.0)
            self._sources[event.source] = st
            return self._set(event.source, Status.ONLINE, "fetch succeeded", now)
        return self._fetch_failed(event, st, now)

    # -- internals ----------------------------------------------------------------------

    def _path(self, st: SourceState) -> tuple[bool | None, str]:
        """(up?, why): None when nothing is known about the path yet."""
        if not st.route_known:
            return None, ""
        if st.route is None:
            # the kernel drops a device's routes when it goes down: say so
            gone = st.last_route
            link = self._links.get(gone.ifindex) if gone is not None else None
            if gone is not None and link is not None and not link.up:
                return False, f"link {gone.ifname or link.ifname} down"
            return False, st.route_why or "no route to host"
        link = self._links.get(st.route.ifindex)
        name = st.route.ifname or (link.ifname if link else f"if{st.route.ifindex}")
        if link is None:
            # a route through a device we have not heard of: trust the route
            return True, f"route via {name}"
        if not link.up:
            return False, f"link {name} down"
        return True, f"route via {name}"

    def _rejudge_paths(self, now: float, only_ifindex: int) -> list[Transition]:
        out: list[Transition] = []
        for source, st in self._sources.items():
            if st.route is not None and st.route.ifindex == only_ifindex:
                out += self._rejudge(source, now)
        return out

    def _rejudge(self, source: str, now: float) -> list[Transition]:
        st = self._sources[source]
        up, why = self._path(st)
        if up is None:
            return []
        if not up:
            # the network says no: no probes, they could not get through
            self._sources[source] = replace(st, probe_at=None, probe_delay=0.0)
            return self._set(source, Status.OFFLINE, why, now)
        if st.status is Status.OFFLINE and st.probe_at is not None:
            # offline because the server did not answer over a healthy path: a path
            # event does not change that, but is a good moment to try again
            self._sources[source] = replace(st, probe_at=min(st.probe_at, now))
            return []
        self._sources[source] = replace(st, failures=0, last_failure=None)
        return self._set(source, Status.ONLINE, why, now)

    def _fetch_failed(self, event: FetchFailed, st: SourceState, now: float) -> list[Transition]:
        h = self.hysteresis
        failures = st.failures + 1
        up, _why = self._path(st)
        if st.status is Status.OFFLINE:
            if up is False:
                # already offline for the path's sake: nothing new
                self._sources[event.source] = replace(st, failures=failures)
                return []
            delay = min(h.probe_max, max(h.probe_first, st.probe_delay * 2))
            self._sources[event.source] = replace(
                st,
                failures=failures,
                last_failure=event.kind,
                probe_at=now + delay,
                probe_delay=delay,
            )
            return []
        st = replace(st, failures=failures, last_failure=event.kind)
        self._sources[event.source] = st
        if failures < h.failures_to_offline:
            return []
        self._sources[event.source] = replace(
            st, probe_at=now + h.probe_first, probe_delay=h.probe_first
        )
        reason = f"{failures} fetches in a row failed ({event.kind.value})"
        return self._set(event.source, Status.OFFLINE, reason, now)

    def _set(self, source: str, new: Status, reason: str, now: float) -> list[Transition]:
        st = self._sources[source]
        if st.status is new:
            if st.reason != reason:
                self._sources[source] = replace(st, reason=reason)
            return []
        self._sources[source] = replace(st, status=new, reason=reason, since=now)
        return [Transition(source, st.status, new, reason, now)]
