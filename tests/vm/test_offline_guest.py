"""Disconnected operation, phase 1, on the real 6.12 kernel: nginx in another network
namespace behind a veth pair (``remote_nginx``), the connectivity driver in the
guest's own namespace (where the daemon runs).

The time from ``ip link set down`` to the offline transition is measured in the
guest and written to ``$CACHEFILESD_VM_RESULTS/offline-detect.txt`` (and printed);
``docs/benchmarks.md`` records it. The waits are generous: the test checks that the
transition comes and why; the figure is the measurement.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import urllib3

from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.http import HttpSource
from cachefilesd_py.sources.netlink import failure_kind
from cachefilesd_py.sources.online import FailureKind
from cachefilesd_py.sources.policy import Deadline, RetryPolicy
from cachefilesd_py.testing.netns import InProcessWatcher
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.vm.remote import RemoteNginx

pytestmark = pytest.mark.guest

WAIT = 30.0


def record(line: str) -> None:
    print(line)
    results = os.environ.get("CACHEFILESD_VM_RESULTS")
    if results:
        with open(Path(results) / "offline-detect.txt", "a") as f:
            f.write(line + "\n")


def fetch(url: str, n: int = 4096, timeout: float = 60.0) -> bytes:
    src = HttpSource(url, pool=urllib3.PoolManager(), retry=RetryPolicy(total=0),
                     timeout=timeout)
    buf = bytearray(n)
    src.fetch_into(0, memoryview(buf), Deadline.after(timeout))
    return bytes(buf)


def test_link_down_takes_the_source_offline_and_up_brings_it_back(
    workdir: Path, remote_nginx: Callable[[Path], RemoteNginx]
) -> None:
    root = workdir / "blobs"
    root.mkdir()
    data = pattern_bytes(5, 0, 1 << 20)
    (root / "blob").write_bytes(data)
    remote = remote_nginx(root)
    url = f"{remote.url}/blob"
    assert fetch(url) == data[:4096]

    # the driver in this process: the guest's own namespace, where the daemon runs
    watch = InProcessWatcher([remote.host])
    try:
        assert watch.wait_for(remote.host, "online", WAIT)
        for round_ in range(3):
            t0 = time.monotonic()
            remote.link(up=False)
            down = watch.wait_for(remote.host, "offline", WAIT)
            assert down is not None, "no offline transition after ip link set down"
            assert down["reason"] == f"link {remote.net.client_if} down"
            record(f"guest link down -> offline: {(float(down['at']) - t0) * 1000:.1f} ms"  # type: ignore[arg-type]
                   f" (round {round_ + 1})")
            # what the engine would see if it fetched anyway: unreachable
            with pytest.raises(SourceError) as info:
                fetch(url)
            assert failure_kind(info.value) is FailureKind.UNREACHABLE
            remote.link(up=True)
            assert watch.wait_for(remote.host, "online", WAIT)
            assert fetch(url) == data[:4096]

        t0 = time.monotonic()
        remote.peer(up=False)  # the far end goes: the guest's end loses its carrier
        down = watch.wait_for(remote.host, "offline", WAIT)
        assert down is not None and down["reason"] == f"link {remote.net.client_if} down"
        record(f"guest peer down -> offline: {(float(down['at']) - t0) * 1000:.1f} ms")  # type: ignore[arg-type]
        remote.peer(up=True)
        assert watch.wait_for(remote.host, "online", WAIT)
    finally:
        watch.close()


def test_a_blob_changed_upstream_has_a_new_identity(
    workdir: Path, remote_nginx: Callable[[Path], RemoteNginx]
) -> None:
    root = workdir / "blobs"
    root.mkdir()
    (root / "blob").write_bytes(pattern_bytes(6, 0, 100_000))
    remote = remote_nginx(root)
    pool = urllib3.PoolManager()
    before = HttpSource(f"{remote.url}/blob", pool=pool).identity(Deadline.after(5))
    remote.link(up=False)
    remote.change_blob("blob", pattern_bytes(7, 0, 120_000))
    remote.link(up=True)
    after = HttpSource(f"{remote.url}/blob", pool=pool).identity(Deadline.after(5))
    assert (before.size, after.size) == (100_000, 120_000)
    assert before.etag and after.etag and before.etag != after.etag
