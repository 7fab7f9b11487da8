"""How long a pin of a large blob takes, against reading the same blob cold, in one run.

    .venv/bin/python -m bench.bench_pin [--size-mb 200] [--rounds 3] [--source http|file]

The daemon's on-demand stack on the fake kernel (``testing/fake_kernel.py``), the
blob served by a loopback HTTP server (``testing/fault_server.py``, no faults) or a
``file://`` directory, the shipped defaults (1 MiB chunks, 4 MiB stream read-ahead),
a fresh cache per run. Arms, alternated within each round:

- ``pin``: the kernel has the blob open (an OPEN, no READ yet); ``cachefilesctl pin``
  over the control socket preloads all of it (4 MiB steps through ``Engine.ensure``,
  written through the object's anonymous fd);
- ``read``: the kernel reads the whole blob cold, in 128 KiB reads (every miss a
  READ the daemon serves, with read-ahead), the reference for the same bytes.

Printed: the median wall time and MiB/s per arm, and the ratio pin/read.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cachefilesd_py.config.load import load_config
from cachefilesd_py.control.client import call
from cachefilesd_py.daemon.app import Daemon, engine_settings, ondemand_figures, source_settings
from cachefilesd_py.daemon.control import serve_control
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.testing.fake_kernel import FakeCachefiles
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

READ = 128 * 1024


def one_run(root: Path, source: str, size: int, arm: str) -> float:
    cache = Path(tempfile.mkdtemp(dir=root))
    sock = str(cache / "ctl.sock")
    conf = cache / "c.conf"
    conf.write_text(f"dir {cache}\ntag b\nondemand\nsource * {source}\ncontrol_socket {sock}\n")
    config = load_config(str(conf))
    daemon = Daemon(config, str(conf), nocull=True)
    factory = SourceFactory(source_settings(config))
    daemon._factory = factory
    fake = FakeCachefiles()
    engine = Engine(
        resolve=SourceResolver(config.sources).resolve,
        open_source=factory.open,
        presence=PresenceStore(cache / "cachefilesd-py" / "presence"),
        settings=engine_settings(config),
    )
    driver = OnDemandDriver(fake, engine, cache, workers=config.fetch_concurrency)
    driver.bind([b"dir " + str(cache).encode(), b"tag b"])
    engine.start()
    control = serve_control(
        daemon, "ondemand", lambda: ondemand_figures(driver, engine), engine, driver
    )
    stop = threading.Event()
    thread = threading.Thread(target=driver.serve, args=(stop, 0.05))
    thread.start()
    try:
        obj = fake.lookup(b"erofs,img", b"img")
        began = time.perf_counter()
        if arm == "pin":
            reply = call(sock, "pin", blob="erofs,img/img", timeout=3600.0)
            assert reply["present_pct"] == 100.0, reply
        else:
            for off in range(0, size, READ):
                obj.read(off, min(READ, size - off))
        elapsed = time.perf_counter() - began
        assert engine.filler.stats.bytes_fetched >= size
    finally:
        control.close()
        stop.set()
        thread.join(30)
        driver.shutdown()
        factory.close()
        fake.close()
        shutil.rmtree(cache, ignore_errors=True)
    return elapsed


@contextlib.contextmanager
def serving(kind: str, root: Path, data: bytes) -> Iterator[str]:
    if kind == "file":
        (root / "blobs").mkdir()
        (root / "blobs" / "img").write_bytes(data)
        yield f"file://{root}/blobs/{{cookie}}"
        return
    with FaultServer({"img": data}) as srv:
        yield srv.url + "/{cookie}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--source", choices=("http", "file"), default="http")
    a = ap.parse_args()
    size = a.size_mb << 20
    data = pattern_bytes(7, 0, size)
    root = Path(tempfile.mkdtemp(prefix="bench-pin-"))
    times: dict[str, list[float]] = {"pin": [], "read": []}
    try:
        with serving(a.source, root, data) as source:
            for r in range(a.rounds):
                arms = ("pin", "read") if r % 2 == 0 else ("read", "pin")
                for arm in arms:
                    times[arm].append(one_run(root, source, size, arm))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{a.size_mb} MiB blob, {a.source} source, {a.rounds} rounds")
    print(f"{'arm':<6} {'median s':>9} {'MiB/s':>8}   runs")
    for arm, ts in times.items():
        med = statistics.median(ts)
        print(f"{arm:<6} {med:>9.2f} {a.size_mb / med:>8.1f}   {', '.join(f'{t:.2f}' for t in ts)}")
    ratio = statistics.median(times["pin"]) / statistics.median(times["read"])
    print(f"pin/read: {ratio:.2f}")


if __name__ == "__main__":
    main()
