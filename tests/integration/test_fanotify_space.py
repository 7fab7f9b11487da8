"""Culling in fanotify mode (frontends/fanotify/space.py) with the real engine, file
source, presence store and cache file, against the stand-in group of
test_fanotify_driver.py. The real kernel runs the same paths in
tests/vm/test_fanotify_frontend_guest.py (a cache over its cap, re-read identical)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.frontends.fanotify.images import TREE_NAME
from cachefilesd_py.frontends.fanotify.space import FanotifyCuller
from cachefilesd_py.space.caps import Caps, CullRules
from cachefilesd_py.space.policy import make_policy
from tests.integration.test_fanotify_driver import CHUNK, SIZE, Rig

NCHUNKS = -(-SIZE // CHUNK)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def fill_all(rig: Rig) -> None:
    fd = rig.event(0, SIZE)
    assert rig.answer() == (fd, wire.FAN_ALLOW, 0)
    presence = rig.served.blob.presence
    assert presence is not None and presence.bitmap.count() == NCHUNKS


def holes(path: Path) -> list[int]:
    """Chunks of ``path`` that are wholly a hole (for the test's own check only)."""
    out = []
    with open(path, "rb") as f:
        fd = f.fileno()
        for i in range(NCHUNKS):
            try:
                data = os.lseek(fd, i * CHUNK, os.SEEK_DATA)
            except OSError:
                data = SIZE
            if data >= min(SIZE, (i + 1) * CHUNK):
                out.append(i)
    return out


def culler_for(rig: Rig, max_bytes: int) -> FanotifyCuller:
    return FanotifyCuller(
        tree=rig.cache / TREE_NAME,
        presence=rig.engine.presence,
        leases=rig.engine.leases,
        rules=CullRules(Caps(max_bytes=max_bytes)),
        policy=make_policy("lru"),
        limits_need=lambda: 0,
        served=lambda: {rig.served.key: rig.served},
        keep_head_bytes=CHUNK,
    )


def test_culler_culls_idle_blobs_whole_and_never_touches_the_mounted_one(rig: Rig) -> None:
    """Over ``cache_max_bytes``: a cache file no mount reads is removed with its
    sidecar; the served (mounted) one is left whole — no bit cleared, no hole punched —
    even though the cap is still exceeded, and the pass says so once."""
    fill_all(rig)
    tree = rig.cache / TREE_NAME
    idle = tree / "imgs" / "old.erofs"
    idle.write_bytes(os.urandom(4 * CHUNK))
    idle_key = BlobKey.named("imgs", "old.erofs")
    sidecar = rig.engine.presence.sidecar_path(idle_key)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_bytes(b"x")
    os.utime(idle, (1, 1))  # older than the served file
    used = (os.stat(rig.served.path).st_blocks + os.stat(idle).st_blocks) * 512
    culler = culler_for(rig, used - 6 * CHUNK)  # more than the idle file frees
    culler.opened(rig.served.key, SIZE)
    with capture_logs() as logs:
        result = culler.cull_pass()
        again = culler.cull_pass()
    assert result.tally.culled == 1 and result.tally.trimmed == 0, result.tally
    assert not idle.exists() and not sidecar.exists()
    presence = rig.served.blob.presence
    assert presence is not None and presence.bitmap.count() == NCHUNKS
    assert holes(rig.served.path) == []
    assert again.needed and again.tally.trimmed == 0
    events = [e["event"] for e in logs]
    assert events.count("fanotify.over_limit_mounted") == 1, events


def test_the_limit_met_again_is_said_once(rig: Rig) -> None:
    fill_all(rig)
    used = os.stat(rig.served.path).st_blocks * 512
    culler = culler_for(rig, used - CHUNK)
    with capture_logs() as logs:
        culler.cull_pass()
        culler.rules = CullRules(Caps(max_bytes=used + CHUNK))
        culler.cull_pass()
        culler.cull_pass()
    events = [e["event"] for e in logs if e["event"].startswith("fanotify.")]
    assert events == ["fanotify.over_limit_mounted", "fanotify.within_limits"], events
    assert holes(rig.served.path) == []
