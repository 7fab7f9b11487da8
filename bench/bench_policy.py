"""Trace simulator: miss ratios of the cull policies on synthetic traces.

    .venv/bin/python -m bench.bench_policy [--accesses 200000] [--objects 10000]

Traces: Zipf popularity (alpha 0.8 and 1.0), and a scan-heavy trace (Zipf 1.0 with a
one-time sequential scan over fresh objects every 20 000 accesses). The cache holds
``--capacity`` (fraction) of the distinct objects; every object has the same size,
so object and byte miss ratios coincide. A miss admits the object and evicts victims
until the cache fits. Policies see exactly what the daemon sees in on-demand mode:
misses and re-opens (here: every access is a touch; a hit that the kernel would serve
silently is modelled as a touch, the optimistic case).
"""

from __future__ import annotations

import argparse
import bisect
import random
from collections.abc import Iterator

from cachefilesd_py.space.policy import POLICIES


def zipf_trace(n_objects: int, alpha: float, accesses: int, seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** alpha for i in range(n_objects)]
    total = sum(weights)
    cdf, acc = [], 0.0
    for w in weights:
        acc += w / total
        cdf.append(acc)
    perm = list(range(n_objects))
    rng.shuffle(perm)
    for _ in range(accesses):
        yield perm[min(bisect.bisect_left(cdf, rng.random()), n_objects - 1)]


def scan_trace(n_objects: int, accesses: int, seed: int) -> Iterator[int]:
    scan_id = n_objects
    for i, key in enumerate(zipf_trace(n_objects, 1.0, accesses, seed)):
        yield key
        if i % 20_000 == 19_999:
            for _ in range(n_objects // 5):
                yield scan_id
                scan_id += 1


def simulate(policy_name: str, trace: list[int], capacity: int) -> float:
    policy = POLICIES[policy_name]()
    cached: set[int] = set()
    misses = 0
    for key in trace:
        if key in cached:
            policy.touch(key)
            continue
        misses += 1
        policy.admit(key, 1)
        cached.add(key)
        while len(cached) > capacity:
            victim = next(policy.victims(lambda k: False))
            policy.remove(victim)
            cached.discard(victim)
    return misses / len(trace)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accesses", type=int, default=200_000)
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--capacity", type=float, default=0.1)
    args = ap.parse_args()
    cap = int(args.objects * args.capacity)
    traces = {
        "zipf 0.8": list(zipf_trace(args.objects, 0.8, args.accesses, 1)),
        "zipf 1.0": list(zipf_trace(args.objects, 1.0, args.accesses, 2)),
        "zipf 1.0 + scans": list(scan_trace(args.objects, args.accesses, 3)),
    }
    names = ["fifo", "lru", "s3fifo"]
    print(
        f"capacity {cap} objects ({args.capacity:.0%} of {args.objects}); "
        f"{args.accesses} accesses per trace\n"
    )
    print("| trace | " + " | ".join(names) + " | s3fifo vs lru |")
    print("|---|" + "---|" * (len(names) + 1))
    for label, trace in traces.items():
        ratios = {n: simulate(n, trace, cap) for n in names}
        cells = " | ".join(f"{ratios[n]:.4f}" for n in names)
        print(f"| {label} | {cells} | {ratios['s3fifo'] / ratios['lru']:.3f}× |")


if __name__ == "__main__":
    main()
