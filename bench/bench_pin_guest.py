"""How long a pin of a 200 MB EROFS image takes on the real 6.12 kernel, against a
cold read of the same image, side by side in one guest run. Guest only: it mounts.

    .venv/bin/python scripts/vmtest --memory 2G --timeout 1800 -- \
        python -m bench.bench_pin_guest [--size-mb 200] [--rounds 2]

One EROFS image holding a ``--size-mb`` file of random bytes (``bench_ondemand``'s),
nginx on loopback, a fresh ext4 cache filesystem and daemon per run, shipped defaults
(1 MiB chunks, 4 MiB read-ahead). Arms, alternated within each round:

- ``pin``: the image mounted, then ``pin`` of the whole image over the control socket
  (``cachefilesctl pin --image``: its metadata first, then the data behind ``/``),
  timed until the reply; then the file is read once (page cache dropped) and the
  daemon must have served no READ for it;
- ``read``: the image mounted, the file read cold in 1 MiB ``read()`` calls (every
  miss a READ the daemon serves): the same bytes through the kernel.

Printed: median seconds and MiB/s per arm, and pin/read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_ondemand import Bench, timed_read
from cachefilesd_py.control.client import call
from tests.vm.rig import mount_erofs, run, start_nginx

BLOB = "erofs,bench.erofs/bench.erofs"


def pin_once(b: Bench, url: str) -> tuple[float, int, float]:
    """(seconds of the pin, READs the daemon served for the read after it, that
    read's seconds)."""
    cache = b.cache_fs()
    sock = b.work / f"ctl{b.n}.sock"
    d = b.daemon(cache, url, f"control_socket {sock}\n")
    m = b.work / f"m{b.n}"
    try:
        mount_erofs(m, "bench.erofs")
        began = time.perf_counter()
        reply = call(str(sock), "pin", blob=BLOB, path="/", timeout=1200)
        pinned = time.perf_counter() - began
        assert all(x["present_pct"] == 100.0 for x in reply["blobs"]), reply
        reads_before = int(call(str(sock), "stats")["counters"]["reads"])
        after = timed_read(m / "data.bin")
        reads = int(call(str(sock), "stats")["counters"]["reads"]) - reads_before
        run("umount", str(m))
    finally:
        d.stop()
        b.drop_cache_fs(cache)
    return pinned, reads, after


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pin-", dir="/tmp"))
    b = Bench(work, args.size_mb)
    web = start_nginx(b.blobs, work)
    pins: list[float] = []
    reads: list[float] = []
    after: list[tuple[int, float]] = []
    for r in range(args.rounds):
        for arm in ("pin", "read") if r % 2 == 0 else ("read", "pin"):
            if arm == "pin":
                seconds, n, t = pin_once(b, web.url)
                pins.append(seconds)
                after.append((n, t))
            else:
                seconds, _stats = b.cold(web.url, timed_read)
                reads.append(seconds)
            print(f"round {r + 1} {arm}: {seconds:.2f} s", flush=True)
    mib = args.size_mb
    p, rd = statistics.median(pins), statistics.median(reads)
    print(f"\n{args.size_mb} MiB image (1 file), nginx on loopback, {args.rounds} rounds")
    print("| arm | median s | MiB/s | runs (s) |")
    print("|---|---|---|---|")
    for label, median, runs in (("pin (whole image)", p, pins), ("cold read", rd, reads)):
        listed = ", ".join(f"{x:.2f}" for x in runs)
        print(f"| {label} | {median:.2f} | {mib / median:.1f} | {listed} |")
    print(f"pin/read {p / rd:.2f}")
    for n, t in after:
        print(f"read after the pin: {t:.2f} s, READs served for it: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
