"""Classic mode on the real kernel: 9p with ``cache=fscache`` fills a small cache past
``bcull``; the daemon culls it back while a reader keeps reading correct data; the
graveyard ends empty."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.rig import Daemon, run, sha256_file

pytestmark = pytest.mark.guest


def free_pct(path: Path) -> float:
    st = os.statvfs(path)
    return 100 * st.f_bavail / st.f_blocks


def test_classic_culls_a_9p_cache_back_to_run(
    workdir: Path, loop_fs: Callable[..., Path], daemon: Callable[[str], Daemon]
) -> None:
    share, tag = Path(os.environ["CACHEFILESD_9P_DIR"]), os.environ["CACHEFILESD_9P_TAG"]
    digests = {}
    for i in range(30):
        data = os.urandom(2 << 20)
        (share / f"f{i}.bin").write_bytes(data)
        digests[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
    run("umount", str(share))
    cache = loop_fs(32)
    d = daemon(
        f"dir {cache}\ntag classic\nbrun 40%\nbcull 30%\nbstop 10%\nfrun 10%\nfcull 7%\nfstop 3%\n"
    )
    d.start()
    mnt = workdir / "p9"
    mnt.mkdir()
    run("mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,cache=fscache", tag, str(mnt))
    try:
        held = open(mnt / "f0.bin", "rb")  # noqa: SIM115 - kept open on purpose
        lowest = 100.0
        for _round in range(2):
            for name, digest in digests.items():
                assert sha256_file(mnt / name) == digest, name
                lowest = min(lowest, free_pct(cache))
            run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        assert hashlib.sha256(held.read()).hexdigest() == digests["f0.bin"]
        deadline = time.monotonic() + 60
        while free_pct(cache) < 40 and time.monotonic() < deadline:
            time.sleep(0.5)
        held.close()
    finally:
        run("umount", str(mnt), check=False)
    assert d.stop() == 0
    stats = [e for e in d.read_events() if e.get("event") == "stats"][-1]
    assert lowest < 30, f"the cache never went below bcull (lowest free {lowest:.1f}%)"
    assert stats["culled"] > 0, stats
    assert free_pct(cache) >= 30, f"culling did not get back toward brun: {free_pct(cache)}"
    assert list((cache / "graveyard").iterdir()) == []
