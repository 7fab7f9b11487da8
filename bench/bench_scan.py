"""Building the cull candidate set of a 1,000,000-object cache tree.

    .venv/bin/python -m bench.bench_scan [--objects 1000000] [--tree DIR] [--limit 4096]

Creates (once; reused later) a cachefiles-layout tree of empty objects with spread
atimes: ``cache/I<volume>/@xx/D<name>``, 8 volumes × 256 fan-out directories, then
times one scan (``cachefilesd_py.space.scan.scan``) that keeps the ``--limit`` oldest
objects, and reports the process's peak RSS. Targets: ≤ 30 s and ≤ 150 MiB.

With ``--index`` it then builds the classic driver's inotify index of the same tree
(``space/tree_index.py``) and times a pass from it (``stat`` only, no directory read);
RSS is then the walk's and the index's together. Run in a separate process for the
index's own figures.
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
    ap.add_argument("--index", action="store_true", help="also time the inotify index")
    ap.add_argument("--index-only", action="store_true", help="time only the index")
    args = ap.parse_args()
    tree = Path(args.tree)
    t0 = time.perf_counter()
    build(tree, args.objects)
    built = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"tree {tree} ({args.objects} objects; built/reused in {built:.1f} s)\n")
    print("| how | objects | candidates kept | seconds | peak RSS MiB | RSS before |")
    print("|---|---|---|---|---|---|")
    took, rss = 0.0, 0
    if not args.index_only:
        t1 = time.perf_counter()
        result = scan(str(tree / "cache"), args.limit)
        took = time.perf_counter() - t1
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row("full walk (scan)", result.objects, len(result.oldest), took, rss, rss_before)
    if args.index or args.index_only:
        from cachefilesd_py.space.tree_index import TreeIndex

        t2 = time.perf_counter()
        index = TreeIndex(str(tree / "cache"))
        built_in = time.perf_counter() - t2
        rss_i = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row(
            "index: build (walk + watches)",
            index.known_objects(),
            0,
            built_in,
            rss_i,
            rss or rss_before,
        )
        t3 = time.perf_counter()
        from_index = index.scan(args.limit)
        pass_s = time.perf_counter() - t3
        rss_p = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row(
            "index: one pass (stat only)",
            from_index.objects,
            len(from_index.oldest),
            pass_s,
            rss_p,
            rss_i,
        )
        index.close()
    if not args.index_only:
        print(
            f"\ntargets for the walk: ≤ 30 s ({'met' if took <= 30 else 'MISSED'}), "
            f"≤ 150 MiB ({'met' if rss / 1024 <= 150 else 'MISSED'})"
        )


def row(how: str, objects: int, kept: int, seconds: float, rss: int, before: int) -> None:
    mib, before_mib = rss / 1024, before / 1024
    print(f"| {how} | {objects} | {kept} | {seconds:.1f} | {mib:.1f} | {before_mib:.1f} |")


if __name__ == "__main__":
    main()
