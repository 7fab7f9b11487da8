"""What the control socket and metrics cost the READ path, side by side in one run.

    .venv/bin/python -m bench.bench_control [--size-mb 32] [--rounds 5] [--scrape-every 0.1]

The daemon's on-demand stack on the fake kernel (``testing/fake_kernel.py``), a
``file://`` source, a fresh cache per run; each run reads the whole blob cold, in
128 KiB reads, through the fake kernel (so every READ goes through the daemon's
driver, engine, source and cache write). Two arms, alternated within each round:

- ``off``: no control socket, no metrics;
- ``scraped``: the control socket and metrics running, and a scraper thread asking
  for the Prometheus text (and ``status``) every ``--scrape-every`` seconds over the
  socket — 150 times Prometheus' default scrape rate at 0.1 s.

Printed: the median wall time per arm, the ratio, and the daemon's own READ service
p50/p99 per arm. Also the cost of one ``LatencyHistogram.record`` (the only change on
the READ path: it now keeps the sum of the durations too) against the same method
without the sum, in the same process.

Before/after a change of the serving code, side by side in one session:

    .venv/bin/python -m bench.bench_control --against /tmp/base [--rounds 8]

where ``/tmp/base`` is a checkout of the code before (``git archive BASE | tar -x -C
/tmp/base``). Each round runs this bench once (``--rounds 1``, a fresh process) in
this tree and once in the other, alternating which goes first, and prints the median
of each arm per tree and the ratios after/before.

In the 6.12 guest (real kernel, real daemon processes, the same before/after
alternation; the control socket and metrics on in both, as shipped):

    /work/helpers/bin/guest-run --memory 2G -- python -m bench.bench_control \
        --guest --against /tmp/base [--size-mb 32] [--rounds 4]

Each run is a fresh cache filesystem and daemon (started from the tree's code), an
EROFS image mounted over fscache, a cold sequential read of a ``--size-mb`` file in
1 MiB ``read()`` calls, then the daemon's own READ service p50/p99 from its final
``stats`` line.
"""

from __future__ import annotations

import argparse
import bisect
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path
from typing import Any

from cachefilesd_py.config.load import load_config
from cachefilesd_py.control.client import call
from cachefilesd_py.counters import LabelledCounts
from cachefilesd_py.daemon.app import Daemon, engine_settings
from cachefilesd_py.daemon.control import serve_control
from cachefilesd_py.engine.latency import BOUNDS, LatencyHistogram
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.testing.fake_kernel import FakeCachefiles
from cachefilesd_py.testing.pattern import pattern_bytes

READ = 128 * 1024


def one_run(root: Path, blob: Path, controlled: bool, scrape_every: float) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(dir=root))
    sock = str(cache / "ctl.sock")
    conf = cache / "c.conf"
    conf.write_text(
        f"dir {cache}\ntag b\nondemand\nsource * file://{blob.parent}/{{cookie}}\n"
        f"chunk_size 256K\nreadahead 0\ncontrol_socket {sock if controlled else 'none'}\n"
    )
    config = load_config(str(conf))
    daemon = Daemon(config, str(conf), nocull=True)
    fake = FakeCachefiles()
    engine = Engine(
        resolve=SourceResolver(config.sources).resolve,
        open_source=SourceFactory(SourceSettings(retries=1, timeout=10)).open,
        presence=PresenceStore(cache / "cachefilesd-py" / "presence"),
        settings=engine_settings(config),
    )
    driver = OnDemandDriver(fake, engine, cache, workers=4, fetch_timeout=10)
    driver.bind([b"dir " + str(cache).encode(), b"tag b"])
    engine.start()
    control = None
    stop = threading.Event()
    scrapes = [0]
    if controlled:

        def collect() -> dict[str, object]:
            return {**vars(driver.stats), **vars(engine.filler.stats)}

        control = serve_control(daemon, "ondemand", collect, engine, driver)

        def scraper() -> None:
            while not stop.wait(scrape_every):
                call(sock, "metrics")
                call(sock, "status")
                scrapes[0] += 1

        threading.Thread(target=scraper, daemon=True).start()
    serving = threading.Event()
    thread = threading.Thread(target=driver.serve, args=(serving, 0.05))
    thread.start()
    size = blob.stat().st_size
    began = time.perf_counter()
    obj = fake.lookup(b"erofs,img", blob.name.encode())
    for off in range(0, size, READ):
        obj.read(off, min(READ, size - off))
    elapsed = time.perf_counter() - began
    stop.set()
    if control is not None:
        control.close()
    serving.set()
    thread.join(30)
    p50, p99 = driver.read_times.quantile(0.5), driver.read_times.quantile(0.99)
    driver.shutdown()
    fake.close()
    return {"s": elapsed, "p50": p50 or 0.0, "p99": p99 or 0.0, "scrapes": scrapes[0]}


class _RecordWithoutSum(LatencyHistogram):
    """``record`` as it was before the metrics (no sum): the reference for the cost."""

    def record(self, seconds: float) -> None:
        index = bisect.bisect_left(BOUNDS, max(0.0, seconds))
        with self._lock:
            self._counts[index] += 1
            self._total += 1


_ROW = re.compile(r"^(off|scraped)\s+([\d.]+)\s+[\d.]+\s+([\d.]+)\s+([\d.]+)")


def _tree_round(tree: Path, a: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    """One round of this bench run by ``tree``'s own code, in a fresh process:
    ``{arm: (seconds, READ p50 ms, READ p99 ms)}``."""
    proc = subprocess.run(
        [
            sys.executable,
            *("-m", "bench.bench_control", "--rounds", "1", "--size-mb", str(a.size_mb)),
            *("--scrape-every", str(a.scrape_every)),
        ],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    out = {}
    for line in proc.stdout.splitlines():
        m = _ROW.match(line)
        if m:
            out[m[1]] = (float(m[2]), float(m[3]), float(m[4]))
    return out


def _print_before_after(
    title: str, runs: dict[str, dict[str, list[tuple[float, ...]]]], arms: tuple[str, ...]
) -> None:
    print(title)
    print(
        "{:<8} {:<7} {:>9} {:>12} {:>12}".format(
            "arm", "tree", "median s", "READ p50 ms", "READ p99 ms"
        )
    )
    med: dict[tuple[str, str], float] = {}
    for arm in arms:
        for tree in ("before", "after"):
            rows = runs[tree][arm]
            med[arm, tree] = statistics.median(r[0] for r in rows)
            print(
                f"{arm:<8} {tree:<7} {med[arm, tree]:>9.3f} "
                f"{statistics.median(r[1] for r in rows):>12.3f} "
                f"{statistics.median(r[2] for r in rows):>12.3f}"
            )
    for arm in arms:
        print(f"ratio after/before ({arm}): {med[arm, 'after'] / med[arm, 'before']:.3f}")


def against(a: argparse.Namespace) -> None:
    here = Path(__file__).resolve().parent.parent
    trees = {"before": Path(a.against).resolve(), "after": here}
    runs: dict[str, dict[str, list[tuple[float, ...]]]] = {
        t: {"off": [], "scraped": []} for t in trees
    }
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for tree in order:
            for arm, row in _tree_round(trees[tree], a).items():
                runs[tree][arm].append(row)
    _print_before_after(
        f"before ({trees['before']}) / after ({here}): cold read of {a.size_mb} MiB in "
        f"{READ // 1024} KiB reads, fake kernel, file://, {a.rounds} rounds of one run "
        "per arm and tree, alternated",
        runs,
        ("off", "scraped"),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scrape-every", type=float, default=0.1)
    ap.add_argument("--against", metavar="TREE", help="before/after against another checkout")
    ap.add_argument("--guest", action="store_true", help="in the guest: real kernel and daemon")
    a = ap.parse_args()
    if a.guest:
        from bench.bench_control_guest import guest_against

        guest_against(a)
        return
    if a.against:
        against(a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        blobs = root / "blobs"
        blobs.mkdir()
        blob = blobs / "img"
        blob.write_bytes(pattern_bytes(3, 0, a.size_mb << 20))
        results: dict[str, list[dict[str, Any]]] = {"off": [], "scraped": []}
        for r in range(a.rounds):
            order = ("off", "scraped") if r % 2 == 0 else ("scraped", "off")
            for arm in order:
                results[arm].append(one_run(root, blob, arm == "scraped", a.scrape_every))
    print(
        f"cold read of {a.size_mb} MiB in {READ // 1024} KiB reads, fake kernel, file://, "
        f"{a.rounds} rounds, scrape every {a.scrape_every} s"
    )
    head = ("arm", "median s", "MiB/s", "READ p50 ms", "READ p99 ms", "scrapes")
    print("{:<8} {:>9} {:>8} {:>12} {:>12} {:>8}".format(*head))
    med = {}
    for arm, runs in results.items():
        med[arm] = statistics.median(x["s"] for x in runs)
        print(
            f"{arm:<8} {med[arm]:>9.3f} {a.size_mb / med[arm]:>8.1f} "
            f"{statistics.median(x['p50'] for x in runs) * 1000:>12.3f} "
            f"{statistics.median(x['p99'] for x in runs) * 1000:>12.3f} "
            f"{sum(x['scrapes'] for x in runs):>8}"
        )
    print(f"ratio scraped/off: {med['scraped'] / med['off']:.3f}")
    n = 200_000
    new_h, old_h = LatencyHistogram(), _RecordWithoutSum()
    t_new = t_old = float("inf")
    for _ in range(5):  # interleaved, best of each
        t_old = min(t_old, timeit.timeit(lambda: old_h.record(0.0012), number=n) / n)
        t_new = min(t_new, timeit.timeit(lambda: new_h.record(0.0012), number=n) / n)
    print(
        f"LatencyHistogram.record: {t_new * 1e9:.0f} ns with sum, {t_old * 1e9:.0f} ns without "
        f"(ratio {t_new / t_old:.3f})"
    )
    # what the per-source counters and the last use add: one LabelledCounts.add per
    # fetched run, one time.time() per READ that reaches the engine
    counts = LabelledCounts()
    t_add = min(
        timeit.timeit(lambda: counts.add("file:///srv/blobs/{cookie}", 262144), number=n) / n
        for _ in range(5)
    )
    t_clock = min(timeit.timeit(time.time, number=n) / n for _ in range(5))
    p50 = statistics.median(x["p50"] for x in results["off"])
    print(
        "added per READ (one fetched run): "
        f"LabelledCounts.add {t_add * 1e9:.0f} ns + time.time() "
        f"{t_clock * 1e9:.0f} ns = {(t_add + t_clock) / p50 * 100:.3f} % of the READ p50"
    )


if __name__ == "__main__":
    main()
