"""How fast a source is noticed offline: ``ip link set down`` → offline transition.

    .venv/bin/python -m bench.bench_offline [--rounds 20]

Needs root. Two network namespaces joined by a veth pair (made here, deleted at the
end; no interface of the machine is touched); the connectivity driver
(``sources/netlink.py``) runs as its own process in the client namespace, watching
the server's address. Each round cuts the link one way and restores it:

- ``client down``: ``ip link set <client end> down`` (the machine's own link);
- ``peer down``: the server end goes down, the client end loses its carrier.

Times are from just before the ``ip`` command starts to the transition's timestamp
(``time.monotonic()``, one clock for every namespace), so they include starting
``ip`` (a few ms). The table gives min / median / p90 / max in milliseconds.

``--settle S`` waits S seconds with the link up before each cut. It matters for the
carrier case: the kernel reports carrier changes from its linkwatch work, which runs
at most once a second for ordinary devices (a veth pair whose ends have the same
ifindex in their namespaces is one), so a carrier lost less than a second after the
previous link event is reported when that second is over. ``--settle 0`` shows that
worst case; the default (1.5 s) the usual one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from cachefilesd_py.testing.netns import ConnectivityWatcher, VethPair


def measure(net: VethPair, watch: ConnectivityWatcher, how: str, settle: float) -> float:
    cut = net.client_link if how == "client down" else net.server_link
    time.sleep(settle)
    watch.forget()
    t0 = time.monotonic()
    cut(up=False)
    down = watch.wait_for(net.server_addr, "offline", 30)
    if down is None:
        raise RuntimeError(f"{how}: no offline transition within 30 s")
    cut(up=True)
    if watch.wait_for(net.server_addr, "online", 30) is None:
        raise RuntimeError(f"{how}: not online again within 30 s")
    net.wait_reachable()
    return (float(down["at"]) - t0) * 1000  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--settle", type=float, default=1.5)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"client down": [], "peer down": []}
    with VethPair.create("cfb") as net:
        watch = ConnectivityWatcher(net.argv_in(net.client_ns), [net.server_addr], sys.executable)
        try:
            if watch.wait_for(net.server_addr, "online", 30) is None:
                raise RuntimeError("the source never came online")
            for _ in range(args.rounds):
                for how, times in results.items():
                    times.append(measure(net, watch, how, args.settle))
        finally:
            watch.close()
    print(f"settle {args.settle:g} s before each cut")
    print(f"{'link event':<12} {'rounds':>6} {'min':>8} {'median':>8} {'p90':>8} {'max':>8}  (ms)")
    for how, times in results.items():
        times.sort()
        p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
        print(
            f"{how:<12} {len(times):>6} {times[0]:>8.1f} {statistics.median(times):>8.1f}"
            f" {p90:>8.1f} {times[-1]:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
