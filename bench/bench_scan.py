"""Building the cull candidate set of a 1,000,000-object cache tree.

    .venv/bin/python -m bench.bench_scan [--objects 1000000] [--tree DIR] [--limit 4096]

Creates (once; reused later) a cachefiles-layout tree of empty objects with spread
atimes: ``cache/I<volume>/@xx/D<name>``, 8 volumes × 256 fan-out directories, then
times one scan (``cachefilesd_py.space.scan.scan``) that keeps the ``--limit`` oldest
objects, and reports the process's peak RSS. Targets: ≤ 30 s and ≤ 150 MiB.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

from cachefilesd_py.space.scan import scan


def build(tree: Path, objects: int) -> None:
    stamp = tree / f".built-{objects}"
    if stamp.exists():
        return
    cache = tree / "cache"
    per_dir = -(-objects // (8 * 256))
    n = 0
    for v in range(8):
        for fan in range(256):
            d = cache / f"Ierofs,vol{v}" / f"@{fan:02x}"
            d.mkdir(parents=True, exist_ok=True)
            for _ in range(per_dir):
                if n >= objects:
                    break
                p = d / f"Dblob{n}"
                fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
                t = 1_600_000_000 + (n * 7919) % 10_000_000
                os.utime(p, (t, t))
                n += 1
    stamp.write_text(str(n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--tree", default=os.path.expanduser("~/.cache/cachefilesd-py/scan-tree"))
    ap.add_argument("--limit", type=int, default=4096)
    args = ap.parse_args()
    tree = Path(args.tree)
    t0 = time.perf_counter()
    build(tree, args.objects)
    built = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t1 = time.perf_counter()
    result = scan(str(tree / "cache"), args.limit)
    took = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"tree {tree} ({args.objects} objects; built/reused in {built:.1f} s)\n")
    print("| objects scanned | candidates kept | scan seconds | peak RSS MiB | RSS before |")
    print("|---|---|---|---|---|")
    print(
        f"| {result.objects} | {len(result.oldest)} | {took:.1f} | {rss / 1024:.1f} | "
        f"{rss_before / 1024:.1f} |"
    )
    print(
        f"\ntargets: ≤ 30 s ({'met' if took <= 30 else 'MISSED'}), "
        f"≤ 150 MiB ({'met' if rss / 1024 <= 150 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
