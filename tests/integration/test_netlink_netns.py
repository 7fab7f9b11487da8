"""The pyroute2 connectivity driver against the real kernel's rtnetlink, in two network
namespaces joined by a veth pair that this test creates and deletes (no interface of
the machine is touched). The driver runs as its own process inside the client
namespace (``python -m cachefilesd_py.sources.netlink``) and prints its transitions.

The time from ``ip link set down`` to the offline transition is measured and printed
(``-s`` shows it); ``bench/bench_offline.py`` repeats it and records the figures. The
waits here are generous: the tests check that the transition comes, and for what
reason, not how fast.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from cachefilesd_py.testing.netns import ConnectivityWatcher, VethPair, can_create_namespaces

pytestmark = pytest.mark.skipif(
    not can_create_namespaces(), reason="needs root and ip netns (iproute2)"
)

WAIT = 20.0  # s; far more than the driver needs, so a slow machine does not flake


@pytest.fixture
def net() -> Iterator[VethPair]:
    with VethPair.create() as pair:
        yield pair


@pytest.fixture
def watch(net: VethPair) -> Iterator[ConnectivityWatcher]:
    w = ConnectivityWatcher(
        net.argv_in(net.client_ns),
        [net.server_addr, "127.0.0.1", "10.254.254.254", "no-such-host.invalid"],
        sys.executable,
    )
    yield w
    w.close()


def test_initial_states(net: VethPair, watch: ConnectivityWatcher) -> None:
    up = watch.wait_for(net.server_addr, "online", WAIT)
    assert up is not None and up["reason"] == f"route via {net.client_if}"
    lo = watch.wait_for("127.0.0.1", "online", WAIT)
    assert lo is not None and lo["reason"] == "route via lo"
    nowhere = watch.wait_for("10.254.254.254", "offline", WAIT)
    assert nowhere is not None and "network unreachable" in str(nowhere["reason"])
    # a name that does not resolve is left to fetch outcomes: no verdict from netlink
    assert all(line.get("source") != "no-such-host.invalid" for line in watch.seen)


def test_client_link_down_then_up(net: VethPair, watch: ConnectivityWatcher) -> None:
    assert watch.wait_for(net.server_addr, "online", WAIT)
    t0 = time.monotonic()
    net.client_link(up=False)
    down = watch.wait_for(net.server_addr, "offline", WAIT)
    assert down is not None, "no offline transition after ip link set down"
    assert down["reason"] == f"link {net.client_if} down"
    print(f"\nlink down -> offline: {(float(down['at']) - t0) * 1000:.1f} ms")  # type: ignore[arg-type]
    net.client_link(up=True)
    assert watch.wait_for(net.server_addr, "online", WAIT)
    # the other sources never moved
    assert watch.wait_for("127.0.0.1", "offline", 0.5) is None


def test_peer_down_is_a_lost_carrier(net: VethPair, watch: ConnectivityWatcher) -> None:
    assert watch.wait_for(net.server_addr, "online", WAIT)
    t0 = time.monotonic()
    net.server_link(up=False)  # the client's end stays up, without a carrier
    down = watch.wait_for(net.server_addr, "offline", WAIT)
    assert down is not None and down["reason"] == f"link {net.client_if} down"
    print(f"\npeer down -> offline: {(float(down['at']) - t0) * 1000:.1f} ms")  # type: ignore[arg-type]
    net.server_link(up=True)
    assert watch.wait_for(net.server_addr, "online", WAIT)


def test_quick_flaps_end_in_the_right_state(net: VethPair, watch: ConnectivityWatcher) -> None:
    """Up and down faster than the kernel's linkwatch settles (its carrier events are
    coalesced): the driver re-reads the links on every change, so the last state wins."""
    assert watch.wait_for(net.server_addr, "online", WAIT)
    for _ in range(3):
        net.client_link(up=False)
        net.client_link(up=True)
        net.server_link(up=False)
        net.server_link(up=True)
    net.server_link(up=False)
    deadline = time.monotonic() + WAIT
    last = None
    while time.monotonic() < deadline:
        line = watch.next_line(0.5)
        if line.get("source") == net.server_addr:
            last = line
        elif not line and last is not None and last["new"] == "offline":
            break
    assert last is not None and last["new"] == "offline"


def test_address_removed_then_added(net: VethPair, watch: ConnectivityWatcher) -> None:
    assert watch.wait_for(net.server_addr, "online", WAIT)
    net.client_address(present=False)
    gone = watch.wait_for(net.server_addr, "offline", WAIT)
    assert gone is not None and "network unreachable" in str(gone["reason"])
    net.client_address(present=True)
    assert watch.wait_for(net.server_addr, "online", WAIT)


def test_a_route_appearing_brings_an_unroutable_host_online(
    net: VethPair, watch: ConnectivityWatcher
) -> None:
    assert watch.wait_for("10.254.254.254", "offline", WAIT)
    net.run_in(net.client_ns, "ip", "route", "add", "10.254.254.0/24", "via", net.server_addr)
    up = watch.wait_for("10.254.254.254", "online", WAIT)
    assert up is not None and up["reason"] == f"route via {net.client_if}"
    net.run_in(net.client_ns, "ip", "route", "add", "blackhole", "10.254.254.254/32")
    hole = watch.wait_for("10.254.254.254", "offline", WAIT)
    assert hole is not None and hole["reason"] == "no route to 10.254.254.254 (blackhole route)"
