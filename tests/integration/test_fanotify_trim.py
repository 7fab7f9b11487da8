"""Trimming and culling in fanotify mode (frontends/fanotify/trim.py, space.py) with the
real engine, file source, presence store and cache file, against the stand-in group of
test_fanotify_driver.py. The real kernel runs the same paths in
tests/vm/test_fanotify_frontend_guest.py (a cache over its cap, re-read identical)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.frontends.fanotify.images import TREE_NAME
from cachefilesd_py.frontends.fanotify.space import FanotifyCuller
from cachefilesd_py.frontends.fanotify.trim import TrimTarget, trim_served
from cachefilesd_py.space.caps import Caps, CullRules
from cachefilesd_py.space.plan import Outcome
from cachefilesd_py.space.policy import make_policy
from tests.integration.test_fanotify_driver import CHUNK, SIZE, Rig, cached

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


def target(rig: Rig, unsilenced: list[bool] | None = None) -> TrimTarget:
    presence = rig.served.blob.presence
    assert presence is not None
    return TrimTarget(
        rig.served.path,
        presence,
        rig.served.guard,
        SIZE,
        lambda: None if unsilenced is None else unsilenced.append(True),
    )


def holes(path: Path) -> list[int]:
    """Chunks of ``path`` that are wholly a hole."""
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


def no_bit_over_a_hole(rig: Rig) -> None:
    """The invariant a trim must keep: a set bit never stands over wrong bytes."""
    presence = rig.served.blob.presence
    assert presence is not None
    for i in range(NCHUNKS):
        if presence.is_present(i):
            end = min(SIZE, (i + 1) * CHUNK)
            assert cached(rig, i * CHUNK, end - i * CHUNK) == rig.data[i * CHUNK : end], i


def test_live_trim_forgets_durably_punches_and_the_next_read_fills_again(rig: Rig) -> None:
    fill_all(rig)
    unsilenced: list[bool] = []
    outcome, freed = trim_served(
        rig.engine.presence, target(rig, unsilenced), 3 * CHUNK, settle=0, keep_head_bytes=CHUNK
    )
    assert outcome is Outcome.TRIMMED and freed >= 3 * CHUNK
    assert unsilenced == [True]  # the ignore mark goes before anything else
    presence = rig.served.blob.presence
    assert presence is not None
    gone = [i for i in range(NCHUNKS) if not presence.is_present(i)]
    assert gone == [7, 8, 9, 10]  # from the tail (the last chunk is short), never the head
    assert holes(rig.served.path) == gone
    # durable: the sidecar on disk says the same as memory
    saved = rig.engine.presence.load_bound(rig.served.key, rig.served.path)
    assert saved is not None and saved.bitmap.count() == NCHUNKS - 4
    no_bit_over_a_hole(rig)
    fetched = rig.engine.filler.stats.chunks_fetched
    fd = rig.event(9 * CHUNK, 4096)
    assert rig.answer() == (fd, wire.FAN_ALLOW, 0)
    assert rig.engine.filler.stats.chunks_fetched == fetched + 1
    assert cached(rig, 9 * CHUNK, CHUNK) == rig.data[9 * CHUNK : 10 * CHUNK]
    no_bit_over_a_hole(rig)


def test_a_read_during_the_trim_waits_and_is_filled_after_the_punch(rig: Rig) -> None:
    """An event on a chunk whose bit was just cleared arrives while the trim settles:
    its fill is parked (no answer yet), and runs after the punch, so the bytes it
    writes are not punched away under a set bit."""
    fill_all(rig)
    result: list[tuple[Outcome, int]] = []
    trimmer = threading.Thread(
        target=lambda: result.append(
            trim_served(
                rig.engine.presence, target(rig), 3 * CHUNK, settle=1.0, keep_head_bytes=CHUNK
            )
        )
    )
    trimmer.start()
    deadline = time.monotonic() + 10
    presence = rig.served.blob.presence
    assert presence is not None
    while presence.is_present(10) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not presence.is_present(10)  # the bits are gone, the punch not yet
    fd = rig.event(10 * CHUNK, 4096)
    rig.kernel_end.settimeout(0.3)
    with pytest.raises(TimeoutError):
        rig.kernel_end.recv(64)  # parked: not answered while the trim runs
    trimmer.join(20)
    assert result and result[0][0] is Outcome.TRIMMED
    assert rig.answer() == (fd, wire.FAN_ALLOW, 0)
    assert presence.is_present(10)
    assert cached(rig, 10 * CHUNK, SIZE - 10 * CHUNK) == rig.data[10 * CHUNK :]
    no_bit_over_a_hole(rig)


def test_a_trim_waits_for_a_running_fill(rig: Rig) -> None:
    guard = rig.served.guard
    assert guard.enter_fill(lambda: None)  # a fill runs
    assert not guard.begin_trim(0.1)  # it did not finish: no trim, nothing changed
    assert not guard.trimming
    guard.exit_fill()
    assert guard.begin_trim(0.1)
    resumed: list[int] = []
    assert not guard.enter_fill(lambda: resumed.append(1))  # parked during the trim
    guard.end_trim()
    assert resumed == [1]


def test_culler_culls_idle_blobs_whole_and_trims_the_mounted_one(rig: Rig) -> None:
    """Over ``cache_max_bytes``: a cache file no mount reads is removed with its
    sidecar; the served (mounted) one is only trimmed, live."""
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
    culler = FanotifyCuller(
        tree=tree,
        presence=rig.engine.presence,
        leases=rig.engine.leases,
        rules=CullRules(Caps(max_bytes=used - 6 * CHUNK)),
        policy=make_policy("lru"),
        limits_need=lambda: 0,
        served=lambda: {rig.served.key: rig.served},
        unsilence=lambda _s: None,
        settle=0,
        keep_head_bytes=CHUNK,
    )
    culler.opened(rig.served.key, SIZE)
    result = culler.cull_pass()
    assert result.tally.culled == 1 and result.tally.trimmed == 1, result.tally
    assert not idle.exists() and not sidecar.exists()
    assert rig.served.path.exists()
    assert result.tally.freed_bytes >= 6 * CHUNK
    no_bit_over_a_hole(rig)
    again = culler.cull_pass()
    assert not again.needed


def test_the_punch_waits_for_answers_decided_from_the_old_bits(rig: Rig) -> None:
    """The reader thread looked a range up in the bitmap (present) and has not written
    its answer yet: the trim clears the bits but does not punch until that answer is
    out (seen on 7.3 under load: answers written >0.5 s after the lookup)."""
    fill_all(rig)
    guard = rig.served.guard
    epoch = guard.begin_allow()  # a lookup before the bits go, answer not written
    result: list[tuple[Outcome, int]] = []
    trimmer = threading.Thread(
        target=lambda: result.append(
            trim_served(
                rig.engine.presence, target(rig), 3 * CHUNK, settle=0, keep_head_bytes=CHUNK
            )
        )
    )
    trimmer.start()
    presence = rig.served.blob.presence
    assert presence is not None
    deadline = time.monotonic() + 10
    while presence.is_present(10) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    assert not presence.is_present(10) and holes(rig.served.path) == []  # not punched yet
    assert not result
    guard.end_allow(epoch)  # the answer is written
    trimmer.join(20)
    assert result and result[0][0] is Outcome.TRIMMED
    assert holes(rig.served.path) == [7, 8, 9, 10]
