"""``bench_control --guest --against TREE``: the READ path before and after a change,
on the real 6.12 kernel (see ``bench/bench_control.py``). Guest only: it mounts.

One EROFS image holding a ``--size-mb`` file of random bytes; per run a fresh ext4
cache filesystem, a daemon started from one tree's code (its working directory is
that tree, so ``python -m`` imports that tree's package first), the image mounted over
fscache, a cold sequential read of the file in 1 MiB ``read()`` calls (page cache
dropped first), umount, the daemon stopped. The two trees alternate, and which goes
first alternates per round. Both daemons run with their control socket (the default
configuration ships it on); the metrics port is off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench.bench_ondemand import Bench, final_stats, timed_read
from tests.vm.rig import Daemon, mount_erofs, run


def _one(b: Bench, tree: Path) -> tuple[float, float, float]:
    cache = b.cache_fs()
    conf = b.work / f"d{b.n}.conf"
    conf.write_text(
        f"dir {cache}\ntag bench\nondemand\nsource * file://{b.blobs}/{{cookie}}\n"
        f"control_socket {b.work}/ctl{b.n}.sock\n"
    )
    d = Daemon(conf, b.work / f"d{b.n}.log", debug=False)
    here = os.getcwd()
    os.chdir(tree)
    try:
        d.start()
    finally:
        os.chdir(here)
    m = b.work / f"m{b.n}"
    try:
        mount_erofs(m, "bench.erofs")
        seconds = timed_read(m / "data.bin")
        run("umount", str(m))
    finally:
        d.stop()
        b.drop_cache_fs(cache)
    stats = final_stats(d)
    return (
        seconds,
        float(stats.get("read_p50_ms", 0.0)),  # type: ignore[arg-type]
        float(stats.get("read_p99_ms", 0.0)),  # type: ignore[arg-type]
    )


def guest_against(a: argparse.Namespace) -> None:
    from bench.bench_control import _print_before_after

    if not a.against:
        raise SystemExit("--guest needs --against TREE (the code before)")
    here = Path(__file__).resolve().parent.parent
    trees = {"before": Path(a.against).resolve(), "after": here}
    work = Path(tempfile.mkdtemp(prefix="bench-ctl-", dir="/tmp"))
    b = Bench(work, a.size_mb)
    runs: dict[str, dict[str, list[tuple[float, ...]]]] = {t: {"cold": []} for t in trees}
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for tree in order:
            runs[tree]["cold"].append(_one(b, trees[tree]))
    _print_before_after(
        f"6.12 guest, before ({trees['before']}) / after ({here}): cold sequential read of "
        f"{a.size_mb} MiB through EROFS over fscache, file://, {a.rounds} rounds",
        runs,
        ("cold",),
    )
    print("per run (s):", {t: [round(x[0], 3) for x in v["cold"]] for t, v in runs.items()})
    print(
        "MiB/s (median):",
        {
            t: round(a.size_mb / statistics.median(x[0] for x in v["cold"]), 1)
            for t, v in runs.items()
        },
    )
