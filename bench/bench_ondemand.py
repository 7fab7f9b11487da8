"""On-demand serving speed, measured in one guest run, side by side.

Run from the host (boots the test kernel):

    .venv/bin/python scripts/vmtest --timeout 1800 -- python -m bench.bench_ondemand [--size-mb 200]

It builds one EROFS image holding a ``--size-mb`` file of random bytes and times a
sequential ``read()`` of that file (1 MiB at a time, page cache dropped first) through:

- ``loop``: the image loop-mounted directly (``mount -o loop``): the physical limit here;
- ``cold file://``: EROFS over fscache, served by the daemon from ``file://``;
- ``warm``: the same mount again after umount/remount with a running daemon: all bytes
  come from the cache file, and the daemon must see zero READs;
- ``cold nginx``: served by the daemon from nginx on loopback;
- ``cold nginx +5ms``: the same with ``tc netem delay 5ms`` on loopback;

then 1000 random 4 KiB reads on cold data, from nginx and from ``file://``: p50 and p99
latency as the reader sees it, the bytes the daemon fetched for them, and the daemon's
own figures from its final ``stats`` line (READ service time from reading the request
off the device to completing it; source fetch time), which tell the daemon's share of
a miss from the kernel's.
Ratios are against the loop mount of the same run, since these machines are noisy.

``--chunk-sizes 64K,256K,1M`` adds a sweep: for each chunk size, a cold sequential read
from nginx without and with 5 ms netem delay, and the random reads, each on a fresh
cache (how the default chunk size was chosen).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.vm.rig import Daemon, mkfs_erofs, mount_erofs, run, start_nginx

T = TypeVar("T")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed_read(path: Path) -> float:
    drop_caches()
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - start


def final_stats(d: Daemon) -> dict[str, object]:
    """The daemon's last ``stats`` log line (empty if it logged none)."""
    stats = [e for e in d.read_events() if e.get("event") == "stats"]
    return stats[-1] if stats else {}


def reads_of(d: Daemon) -> int:
    return int(final_stats(d).get("reads", -1))  # type: ignore[call-overload]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def random_reads(path: Path, n: int, seed: int = 7) -> list[float]:
    drop_caches()
    size = path.stat().st_size
    rng = random.Random(seed)
    lat = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(n):
            off = rng.randrange(0, size // 4096) * 4096
            t = time.perf_counter()
            os.pread(fd, 4096, off)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return lat


class Bench:
    def __init__(self, work: Path, size_mb: int) -> None:
        self.work = work
        src = work / "src"
        src.mkdir()
        with open(src / "data.bin", "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(1 << 20))
        self.blobs = work / "blobs"
        self.blobs.mkdir()
        mkfs_erofs(self.blobs / "bench.erofs", src, "-Enoinline_data")
        self.n = 0
        #: room for the blob twice over, so no case culls
        self.cache_mb = size_mb * 2 + 64

    def cache_fs(self) -> Path:
        self.n += 1
        image = self.work / f"cache{self.n}.img"
        with open(image, "wb") as f:
            f.truncate(self.cache_mb << 20)
        run("mkfs.ext4", "-q", "-F", str(image))
        mnt = self.work / f"cache{self.n}"
        mnt.mkdir()
        run("mount", "-o", "loop", str(image), str(mnt))
        return mnt

    def drop_cache_fs(self, mnt: Path) -> None:
        """Unmount a cache filesystem and free its image: the guest's /tmp is RAM."""
        run("umount", str(mnt))
        (self.work / f"{mnt.name}.img").unlink()

    def cold(
        self, url: str, measure: Callable[[Path], T], *, extra: str = "", delay: str | None = None
    ) -> tuple[T, dict[str, object]]:
        """``measure(file)`` on a fresh mount with a fresh cache filesystem and daemon
        (``extra`` config lines; ``tc netem delay`` on loopback if ``delay``), all torn
        down afterwards; returns its result and the daemon's final stats."""
        cache = self.cache_fs()
        d = self.daemon(cache, url, extra)
        m = self.work / f"m{self.n}"
        if delay:
            run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", delay)
        try:
            mount_erofs(m, "bench.erofs")
            result = measure(m / "data.bin")
            run("umount", str(m))
        finally:
            if delay:
                run("tc", "qdisc", "del", "dev", "lo", "root", check=False)
            d.stop()
            self.drop_cache_fs(cache)
        return result, final_stats(d)

    def daemon(self, cache: Path, url: str, extra: str = "") -> Daemon:
        conf = self.work / f"d{self.n}.conf"
        conf.write_text(f"dir {cache}\ntag bench\nondemand\nsource * {url}/{{cookie}}\n{extra}")
        d = Daemon(conf, self.work / f"d{self.n}.log", debug=False)
        d.start()
        return d


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--random-reads", type=int, default=1000)
    ap.add_argument("--chunk-sizes", default="", help="sweep, e.g. 64K,256K,1M")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    b = Bench(work, args.size_mb)
    size = args.size_mb << 20
    rows: list[tuple[str, float, str]] = []

    mnt = work / "loop"
    mnt.mkdir()
    run("mount", "-t", "erofs", "-o", "loop,ro", str(b.blobs / "bench.erofs"), str(mnt))
    loop_s = timed_read(mnt / "data.bin")
    run("umount", str(mnt))
    rows.append(("loop mount (physical limit)", loop_s, ""))

    # cold from file://, then warm
    cache = b.cache_fs()
    d = b.daemon(cache, f"file://{b.blobs}")
    m = work / "m1"
    mount_erofs(m, "bench.erofs")
    cold_file = timed_read(m / "data.bin")
    run("umount", str(m))
    d.stop()
    d = b.daemon(cache, f"file://{b.blobs}")  # a restarted daemon, same cache
    mount_erofs(m, "bench.erofs")
    warm = timed_read(m / "data.bin")
    run("umount", str(m))
    d.stop()
    b.drop_cache_fs(cache)
    warm_reads = reads_of(d)
    rows.append(("cold, daemon from file://", cold_file, ""))
    rows.append(("warm re-read (remount)", warm, f"READs during warm: {warm_reads}"))

    web = start_nginx(b.blobs, work)
    results: dict[str, float] = {}
    for label, delay in (("cold, daemon from nginx", None), ("cold, nginx + netem 5ms", "5ms")):
        results[label], _ = b.cold(web.url, timed_read, delay=delay)
        rows.append((label, results[label], ""))

    def cold_random(path: Path) -> list[float]:
        return random_reads(path, args.random_reads)

    randoms: dict[str, tuple[list[float], dict[str, object]]] = {}
    for label, url in (("nginx", web.url), ("file://", f"file://{b.blobs}")):
        randoms[label] = b.cold(url, cold_random)

    sweep: list[tuple[int, float, float, list[float], dict[str, object]]] = []
    for chunk in (parse_size(x) for x in args.chunk_sizes.split(",") if x):
        extra = f"chunk_size {chunk}\n"
        seq, _ = b.cold(web.url, timed_read, extra=extra)
        seq_delay, _ = b.cold(web.url, timed_read, extra=extra, delay="5ms")
        rlat, stats = b.cold(web.url, cold_random, extra=extra)
        sweep.append((chunk, seq, seq_delay, rlat, stats))
    web.proc.terminate()

    print(
        f"\nfile size {args.size_mb} MiB; kernel {os.uname().release}; "
        f"{os.cpu_count()} vCPUs (QEMU TCG)\n"
    )
    print(f"| {'case':32} | {'seconds':>8} | {'MB/s':>8} | {'× loop':>7} | note |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 10}|{'-' * 9}|------|")
    for label, secs, note in rows:
        print(
            f"| {label:32} | {secs:8.2f} | {size / secs / 1e6:8.1f} | "
            f"{secs / loop_s:7.2f} | {note} |"
        )
    nodelay, delayed = results["cold, daemon from nginx"], results["cold, nginx + netem 5ms"]
    print(f"\nnginx +5ms keeps {100 * nodelay / delayed:.0f}% of the no-delay throughput")
    for label, (rlat, st) in randoms.items():
        qs = statistics.quantiles(rlat, n=100)
        fetched = int(st.get("bytes_fetched", -1))  # type: ignore[call-overload]
        print(
            f"{len(rlat)} random 4 KiB reads on cold data ({label}): "
            f"p50 {qs[49] * 1000:.2f} ms, p99 {qs[98] * 1000:.2f} ms; "
            f"fetched {fetched / 1e6:.1f} MB for {len(rlat) * 4096 / 1e6:.1f} MB read; "
            f"daemon: {st.get('reads')} READs served in p50 {st.get('read_p50_ms')} / "
            f"p99 {st.get('read_p99_ms')} ms, source fetches p50 {st.get('fetch_p50_ms')} / "
            f"p99 {st.get('fetch_p99_ms')} ms, cache writes p50 {st.get('write_p50_ms')} / "
            f"p99 {st.get('write_p99_ms')} ms; {st.get('checkpoint_n')} checkpoints, "
            f"p50 {st.get('checkpoint_p50_ms')} / p99 {st.get('checkpoint_p99_ms')} ms"
        )
    if sweep:
        print(f"\nchunk-size sweep (nginx, cold; {args.random_reads} random 4 KiB reads each):\n")
        print(
            "| chunk | seq × loop | seq +5ms × loop | rand p50 ms | rand p99 ms "
            "| rand MB fetched | daemon READ p50 / p99 ms | fetch p50 / p99 ms |"
        )
        print("|-------|------|------|------|------|------|------|------|")
        for chunk, seq, seq_delay, rlat, st in sweep:
            q = statistics.quantiles(rlat, n=100)
            fetched = int(st.get("bytes_fetched", -1))  # type: ignore[call-overload]
            print(
                f"| {chunk >> 10}K | {seq / loop_s:.2f} | {seq_delay / loop_s:.2f} | "
                f"{q[49] * 1000:.2f} | {q[98] * 1000:.2f} | {fetched / 1e6:.1f} | "
                f"{st.get('read_p50_ms')} / {st.get('read_p99_ms')} | "
                f"{st.get('fetch_p50_ms')} / {st.get('fetch_p99_ms')} |"
            )
    print(
        f"targets: cold file:// ≤ 3× loop ({cold_file / loop_s:.2f}), "
        f"cold nginx ≤ 3.5× ({nodelay / loop_s:.2f}), warm ≤ 1.25× ({warm / loop_s:.2f}) "
        f"with 0 READs ({warm_reads})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
