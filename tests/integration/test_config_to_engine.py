"""What the configuration accepts, the engine can serve: settings built from a parsed
file (``daemon.app.engine_settings``) run against the fake kernel.

Regression (issue 10, item 12): ``source_chunk_size`` above 4 MiB passed
``--check-config`` while the engine's write buffers stayed 4 MiB (``max_run`` looked at
``chunk_size`` only), so every READ of a full chunk failed with ValueError in
``pwrite_direct``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.daemon.app import engine_settings
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.testing.fake_kernel import FakeCachefiles
from cachefilesd_py.testing.pattern import pattern_bytes


@pytest.mark.parametrize("chunk", ["8M", "64M"])
def test_largest_source_chunk_size_is_served(tmp_path: Path, chunk: str) -> None:
    blobs, cache = tmp_path / "blobs", tmp_path / "cache"
    blobs.mkdir()
    cache.mkdir()
    size = (64 << 20) + 12345 if chunk == "64M" else (24 << 20) + 12345
    data = pattern_bytes(3, 0, size)
    (blobs / "big.img").write_bytes(data)
    cfg = parse_config(
        f"dir {cache}\nondemand\nsource * file://{blobs}/{{cookie}}\n"
        f"source_chunk_size big/* {chunk}\nreadahead 0\nfetch_concurrency 2\n",
        "t.conf",
    )
    settings = engine_settings(cfg)
    assert settings.max_run >= max(r.size for r in cfg.source_chunk_sizes)
    fake = FakeCachefiles()
    engine = Engine(
        resolve=SourceResolver(cfg.sources).resolve,
        open_source=SourceFactory(SourceSettings(timeout=10)).open,
        presence=PresenceStore(cache / "cachefilesd-py" / "presence"),
        settings=settings,
    )
    driver = OnDemandDriver(fake, engine, cache, workers=2, fetch_timeout=10)
    driver.bind([b"dir " + str(cache).encode()])
    engine.start()
    stop = threading.Event()
    thread = threading.Thread(target=driver.serve, args=(stop, 0.05))
    thread.start()
    try:
        obj = fake.lookup(b"erofs,big", b"big.img")
        chunk_bytes = cfg.source_chunk_sizes[0].size
        # one full chunk, and the short tail chunk
        assert obj.read(chunk_bytes, chunk_bytes, timeout=60) == data[chunk_bytes : 2 * chunk_bytes]
        tail = size - size % chunk_bytes
        assert obj.read(tail, size - tail, timeout=60) == data[tail:]
    finally:
        stop.set()
        thread.join(30)
        driver.shutdown()
        fake.close()
