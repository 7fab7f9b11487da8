"""The per-source online/offline state machine: tables for the rules, hypothesis for
the invariants (hysteresis holds, a dead path always wins, transitions chain)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.sources.online import (
    ConnectivityTracker,
    FailureKind,
    FetchFailed,
    FetchSucceeded,
    Hysteresis,
    Link,
    LinkChanged,
    LinkRemoved,
    Route,
    RouteResolved,
    Status,
)

S = "blobs"
ETH = Link(2, "eth0", up=True)
ETH_DOWN = Link(2, "eth0", up=False)
WLAN = Link(3, "wlan0", up=True)
VIA_ETH = Route(2, "eth0")
VIA_WLAN = Route(3, "wlan0")
REFUSED = FetchFailed(S, FailureKind.REFUSED)
TIMEOUT = FetchFailed(S, FailureKind.TIMEOUT)
OK = FetchSucceeded(S)


def tracker(failures: int = 3) -> ConnectivityTracker:
    t = ConnectivityTracker(Hysteresis(failures_to_offline=failures, probe_first=1, probe_max=8))
    t.add_source(S, 0.0)
    return t


def feed(t: ConnectivityTracker, *events: object, start: float = 1.0) -> list[tuple[str, str]]:
    """Apply events one second apart; the transitions as (new status, reason)."""
    out = []
    for i, ev in enumerate(events):
        for tr in t.apply(ev, start + i):  # type: ignore[arg-type]
            out.append((tr.new.value, tr.reason))
    return out


@pytest.mark.parametrize(
    ("events", "transitions", "final"),
    [
        ([], [], Status.UNKNOWN),
        ([LinkChanged(ETH)], [], Status.UNKNOWN),  # a link alone says nothing of the host
        (
            [LinkChanged(ETH), RouteResolved(S, VIA_ETH)],
            [("online", "route via eth0")],
            Status.ONLINE,
        ),
        (
            [LinkChanged(ETH), RouteResolved(S, VIA_ETH), LinkChanged(ETH_DOWN)],
            [("online", "route via eth0"), ("offline", "link eth0 down")],
            Status.OFFLINE,
        ),
        (
            [RouteResolved(S, VIA_ETH), LinkChanged(ETH_DOWN), LinkChanged(ETH)],
            [("online", "route via eth0"), ("offline", "link eth0 down"),
             ("online", "route via eth0")],
            Status.ONLINE,
        ),
        (
            [RouteResolved(S, None, "no route to host")],
            [("offline", "no route to host")],
            Status.OFFLINE,
        ),
        # the route moves to another device: the old device going down does not matter
        (
            [LinkChanged(ETH), LinkChanged(WLAN), RouteResolved(S, VIA_ETH),
             RouteResolved(S, VIA_WLAN), LinkChanged(ETH_DOWN)],
            [("online", "route via eth0")],
            Status.ONLINE,
        ),
        # the route's device disappears: the path is judged by the route alone until
        # the driver asks the kernel again
        (
            [LinkChanged(ETH), RouteResolved(S, VIA_ETH), LinkRemoved(2)],
            [("online", "route via eth0")],
            Status.ONLINE,
        ),
        # the kernel flushes a downed device's routes: the reason stays the link
        (
            [LinkChanged(ETH), RouteResolved(S, VIA_ETH), LinkChanged(ETH_DOWN),
             RouteResolved(S, None, "no route to 10.0.0.2 (network unreachable)")],
            [("online", "route via eth0"), ("offline", "link eth0 down")],
            Status.OFFLINE,
        ),
        # found by hypothesis: offline for no route, then a route through a device
        # that is down: the reason follows the truth
        (
            [RouteResolved(S, None), LinkChanged(ETH_DOWN), RouteResolved(S, VIA_ETH)],
            [("offline", "no route to host")],
            Status.OFFLINE,
        ),
        # hysteresis: two failures on a healthy path do not flap
        (
            [RouteResolved(S, VIA_ETH), TIMEOUT, TIMEOUT],
            [("online", "route via eth0")],
            Status.ONLINE,
        ),
        (
            [RouteResolved(S, VIA_ETH), TIMEOUT, REFUSED, TIMEOUT],
            [("online", "route via eth0"), ("offline", "3 fetches in a row failed (timeout)")],
            Status.OFFLINE,
        ),
        # a success in between resets the count
        (
            [RouteResolved(S, VIA_ETH), TIMEOUT, TIMEOUT, OK, TIMEOUT, TIMEOUT],
            [("online", "route via eth0")],
            Status.ONLINE,
        ),
        # the server answering beats everything, even a path said to be down
        (
            [RouteResolved(S, None, "no route to host"), OK],
            [("offline", "no route to host"), ("online", "fetch succeeded")],
            Status.ONLINE,
        ),
        # without any netlink fact, fetch outcomes alone decide
        ([TIMEOUT, TIMEOUT, TIMEOUT], [("offline", "3 fetches in a row failed (timeout)")],
         Status.OFFLINE),
        ([OK], [("online", "fetch succeeded")], Status.ONLINE),
    ],
)
def test_transitions(
    events: list[object], transitions: list[tuple[str, str]], final: Status
) -> None:
    t = tracker()
    assert feed(t, *events) == transitions
    assert t.status(S) is final


def test_the_reason_follows_the_path_while_offline() -> None:
    t = tracker()
    feed(t, RouteResolved(S, None), LinkChanged(ETH_DOWN), RouteResolved(S, VIA_ETH))
    assert t.state(S).reason == "link eth0 down"


def test_one_failure_suffices_when_configured() -> None:
    t = tracker(failures=1)
    assert feed(t, RouteResolved(S, VIA_ETH), REFUSED)[-1] == (
        "offline",
        "1 fetches in a row failed (connection refused)",
    )


def test_offline_by_path_admits_no_fetch_and_no_probe() -> None:
    t = tracker()
    feed(t, LinkChanged(ETH), RouteResolved(S, VIA_ETH), LinkChanged(ETH_DOWN))
    for now in (3.0, 10.0, 1000.0):
        assert not t.admit(S, now)
    feed(t, LinkChanged(ETH), start=1001)
    assert t.admit(S, 1002.0)


def test_offline_by_fetches_admits_one_probe_with_doubling_delay() -> None:
    t = tracker()
    feed(t, RouteResolved(S, VIA_ETH), TIMEOUT, TIMEOUT, TIMEOUT)  # offline at t=4
    assert t.state(S).probe_at == 5.0
    assert not t.admit(S, 4.5)
    assert t.admit(S, 5.0)
    assert not t.admit(S, 5.0)  # one probe only
    t.apply(TIMEOUT, 5.5)  # the probe failed: next in 2 s
    assert t.state(S).probe_at == 7.5
    t.apply(TIMEOUT, 7.5)
    t.apply(TIMEOUT, 11.5)
    t.apply(TIMEOUT, 19.5)  # capped at probe_max = 8
    assert t.state(S).probe_at == 27.5
    assert t.status(S) is Status.OFFLINE
    assert feed(t, OK, start=28) == [("online", "fetch succeeded")]
    assert t.admit(S, 28.0) and t.admit(S, 28.0)


def test_a_path_event_brings_the_probe_forward_without_declaring_online() -> None:
    t = tracker()
    feed(t, LinkChanged(ETH), RouteResolved(S, VIA_ETH), TIMEOUT, TIMEOUT, TIMEOUT)
    t.apply(TIMEOUT, 10.0)  # probe failed, next at 12
    assert t.state(S).probe_at == 12.0
    assert t.apply(RouteResolved(S, VIA_WLAN), 10.5) == []
    assert t.status(S) is Status.OFFLINE
    assert t.admit(S, 10.5)


def test_events_for_unknown_sources_are_ignored() -> None:
    t = tracker()
    assert t.apply(FetchSucceeded("other"), 1.0) == []
    assert t.sources() == (S,)


def test_hysteresis_is_validated() -> None:
    with pytest.raises(ValueError):
        Hysteresis(failures_to_offline=0)
    with pytest.raises(ValueError):
        Hysteresis(probe_first=5, probe_max=1)


# -- invariants --------------------------------------------------------------------------

links = st.builds(Link, st.sampled_from([2, 3]), st.just("x"), st.booleans())
routes = st.one_of(st.none(), st.builds(Route, st.sampled_from([2, 3]), st.just("x")))
events = st.one_of(
    st.builds(LinkChanged, links),
    st.builds(LinkRemoved, st.sampled_from([2, 3])),
    st.builds(RouteResolved, st.just(S), routes),
    st.just(OK),
    st.builds(FetchFailed, st.just(S), st.sampled_from(list(FailureKind))),
)


@settings(max_examples=300)
@given(st.lists(events, max_size=40))
def test_transitions_chain_and_match_the_state(evs: list[object]) -> None:
    t = tracker()
    last = Status.UNKNOWN
    for i, ev in enumerate(evs):
        for tr in t.apply(ev, float(i)):  # type: ignore[arg-type]
            assert tr.old is last and tr.new is not tr.old
            last = tr.new
        assert t.status(S) is last


@settings(max_examples=300)
@given(st.lists(events, max_size=40), st.sampled_from(list(FailureKind)))
def test_fewer_failures_than_the_threshold_never_take_a_healthy_path_offline(
    evs: list[object], kind: FailureKind
) -> None:
    t = tracker(failures=3)
    for i, ev in enumerate(evs):
        t.apply(ev, float(i))  # type: ignore[arg-type]
    n = len(evs)
    t.apply(LinkChanged(ETH), n)
    t.apply(RouteResolved(S, VIA_ETH), n + 1)
    t.apply(OK, n + 2)
    for j in range(2):
        t.apply(FetchFailed(S, kind), n + 3 + j)
        assert t.status(S) is Status.ONLINE
    t.apply(FetchFailed(S, kind), n + 5)
    assert t.status(S) is Status.OFFLINE


@settings(max_examples=300)
@given(st.lists(events, max_size=40))
def test_the_routes_link_going_down_always_takes_the_source_offline(evs: list[object]) -> None:
    t = tracker()
    for i, ev in enumerate(evs):
        t.apply(ev, float(i))  # type: ignore[arg-type]
    t.apply(RouteResolved(S, VIA_ETH), 100.0)
    t.apply(LinkChanged(ETH_DOWN), 101.0)
    assert t.status(S) is Status.OFFLINE
    assert t.state(S).reason == "link eth0 down"
    assert not t.admit(S, 1e9)
