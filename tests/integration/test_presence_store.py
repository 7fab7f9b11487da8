"""Sidecars on real files with real xattrs: binding, distrust, and crashes between
every two durable steps (borg's crash tests, in spirit)."""

from __future__ import annotations

import errno
import os
import resource
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.kernel import durable
from cachefilesd_py.presence import format as fmt
from cachefilesd_py.presence import store as store_module
from cachefilesd_py.presence.store import BINDING_XATTR, BlobPresence, PresenceStore
from cachefilesd_py.presence.verify import verify
from cachefilesd_py.testing.sidecars import reseal

KEY = BlobKey(b"erofs,img", b"img")
CHUNK = 4096
SIZE = 10 * CHUNK + 100


def source_bytes(off: int, n: int) -> bytes:
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(off, off + n))


def write_chunks(cache_file: Path, first: int, count: int) -> None:
    with open(cache_file, "r+b") as f:
        for i in range(first, first + count):
            off = i * CHUNK
            f.seek(off)
            f.write(source_bytes(off, min(CHUNK, SIZE - off)))


@pytest.fixture
def cache(tmp_path: Path) -> tuple[PresenceStore, Path]:
    store = PresenceStore(tmp_path / "presence")
    cache_file = tmp_path / "Dimg"
    with open(cache_file, "wb") as f:
        f.truncate(SIZE)
    return store, cache_file


class Crash(Exception):
    pass


def test_bind_then_reload_is_trusted(cache: tuple[PresenceStore, Path]) -> None:
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    assert not bp.trusted
    write_chunks(f, 2, 3)
    bp.note_written(2, 3)
    store.bind(bp, f)
    again = store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)
    assert again.trusted and again.bitmap.present_runs(0, 11) == [(2, 3)]
    report = verify(again, f, source_bytes)
    assert report.ok and report.present == 3 and report.lagging == 0


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda store, f: os.removexattr(f, BINDING_XATTR), "no binding"),
        (lambda store, f: os.setxattr(f, BINDING_XATTR, b"00" * 16), "another sidecar"),
        (lambda store, f: store.sidecar_path(KEY).write_bytes(b"BOOM"), "corrupt"),
        (lambda store, f: store.sidecar_path(KEY).unlink(), "missing"),
    ],
)
def test_broken_binding_is_a_miss(cache, mutate, reason) -> None:  # type: ignore[no-untyped-def]
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    write_chunks(f, 0, 2)
    bp.note_written(0, 2)
    store.bind(bp, f)
    mutate(store, f)
    again = store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)
    assert not again.trusted, reason
    assert again.bitmap.count() == 0


@pytest.mark.parametrize("changed", [("size",), ("unfillable chunk",), ("token",), ("key",)])
def test_mismatched_blob_is_a_miss(cache, changed) -> None:  # type: ignore[no-untyped-def]
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    bp.note_written(0, 1)
    store.bind(bp, f)
    size, token, key = SIZE, "t1", KEY
    fits: Callable[[int], bool] = lambda _chunk: True  # noqa: E731
    if changed == ("size",):
        size += 1
    elif changed == ("unfillable chunk",):
        fits = lambda chunk: chunk > CHUNK  # noqa: E731 - the buffers no longer hold it
    elif changed == ("token",):
        token = "t2"
    else:
        key = BlobKey(b"erofs,img", b"other")
        os.rename(store.sidecar_path(KEY), store.sidecar_path(key))
    again = store.load(key, f, size, token, chunk_size=CHUNK, chunk_size_ok=fits)
    assert not again.trusted and again.bitmap.count() == 0


def test_a_changed_chunk_size_keeps_the_sidecars_own(cache) -> None:  # type: ignore[no-untyped-def]
    """The admin changed ``chunk_size``: a blob with a trusted sidecar keeps the chunk
    size its sidecar records (and its bits); only new blobs get the new size."""
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    write_chunks(f, 2, 3)
    bp.note_written(2, 3)
    store.bind(bp, f)
    again = store.load(KEY, f, SIZE, "t1", chunk_size=4 * CHUNK)
    assert again.trusted
    assert again.geometry.chunk_size == CHUNK
    assert again.bitmap.present_runs(0, again.geometry.nchunks) == [(2, 3)]
    assert verify(again, f, source_bytes).ok
    fresh = store.load(BlobKey(b"erofs,img", b"new"), f, SIZE, "t1", chunk_size=4 * CHUNK)
    assert not fresh.trusted and fresh.geometry.chunk_size == 4 * CHUNK


@pytest.mark.parametrize(
    "point",
    [
        "checkpoint.before_syncfs",
        "checkpoint.after_syncfs",
        "save.before_rename",
        "bind.before_xattr",
    ],
)
def test_crash_at_every_step_never_lets_a_bit_lead_its_data(cache, point) -> None:  # type: ignore[no-untyped-def]
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    write_chunks(f, 0, 4)
    bp.note_written(0, 4)
    store.bind(bp, f)  # chunks 0..3 durable and bound
    # more data written, then a crash at `point` while persisting it
    write_chunks(f, 6, 2)
    bp.note_written(6, 2)

    def hook(name: str) -> None:
        if name == point:
            raise Crash(name)

    durable.set_crash_hook(hook)
    try:
        with pytest.raises(Crash):
            store.bind(bp, f) if point == "bind.before_xattr" else store.checkpoint([bp])
    finally:
        durable.set_crash_hook(None)
    again = store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)
    assert again.trusted
    present = {i for i in range(11) if again.is_present(i)}
    assert {0, 1, 2, 3} <= present <= {0, 1, 2, 3, 6, 7}
    assert verify(again, f, source_bytes).ok


def test_clear_chunks_is_durable_before_returning(cache) -> None:  # type: ignore[no-untyped-def]
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    write_chunks(f, 0, 5)
    bp.note_written(0, 5)
    store.bind(bp, f)
    store.clear_chunks(bp, 1, 2)
    again = store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)
    assert again.bitmap.present_runs(0, 11) == [(0, 1), (3, 2)]
    assert store.orphans({KEY}) == []
    assert store.orphans(set()) == [store.sidecar_path(KEY)]


def test_verify_reports_wrong_bytes(cache) -> None:  # type: ignore[no-untyped-def]
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    write_chunks(f, 0, 2)
    bp.note_written(0, 3)  # chunk 2 claimed but never written: a hole
    report = verify(bp, f, source_bytes)
    assert not report.ok
    assert any("chunk 2" in e for e in report.errors)


# -- hostile sidecars (issue 10): a miss, never an exception, never a stall -------------


def bound_sidecar(cache: tuple[PresenceStore, Path]) -> tuple[PresenceStore, Path, bytes]:
    """A trusted sidecar for KEY with chunks 0..1 present; returns its bytes."""
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    write_chunks(f, 0, 2)
    bp.note_written(0, 2)
    store.bind(bp, f)
    assert store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK).trusted
    return store, f, store.sidecar_path(KEY).read_bytes()


def test_a_bit_past_the_last_chunk_is_a_miss_not_an_error(cache) -> None:  # type: ignore[no-untyped-def]
    store, f, raw = bound_sidecar(cache)
    mutated = bytearray(raw)
    mutated[-5] |= 0x80  # SIZE is 11 chunks: bit 15 is past the end
    store.sidecar_path(KEY).write_bytes(reseal(mutated))
    with capture_logs() as logs:
        again = store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)
    assert not again.trusted and again.bitmap.count() == 0
    assert [e["reason"] for e in logs if e["event"] == "presence.distrusted"] == [
        "sidecar has bits set past the last chunk"
    ]
    assert store.load_bound(KEY, f) is None  # the trim path (a cull pass) too


def test_load_bound_refuses_a_geometry_it_cannot_build(cache) -> None:  # type: ignore[no-untyped-def]
    store, f, raw = bound_sidecar(cache)
    mutated = bytearray(raw)
    struct.pack_into("<I", mutated, 12, 0)  # chunk size 0
    store.sidecar_path(KEY).write_bytes(reseal(mutated))
    assert store.load_bound(KEY, f) is None
    assert not store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK).trusted


def test_a_fifo_as_sidecar_is_a_miss_and_never_blocks(cache) -> None:  # type: ignore[no-untyped-def]
    store, f, _raw = bound_sidecar(cache)
    path = store.sidecar_path(KEY)
    path.unlink()
    os.mkfifo(path)
    results: list[object] = []
    worker = threading.Thread(
        target=lambda: results.append(store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)), daemon=True
    )
    worker.start()
    worker.join(10)
    stuck = worker.is_alive()
    if stuck:  # the old code sits in open(2) until a writer appears: be that writer
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert not stuck, "opening a FIFO sidecar blocked"
    assert len(results) == 1 and not results[0].trusted  # type: ignore[attr-defined]
    assert store.load_bound(KEY, f) is None


def test_a_symlinked_sidecar_is_never_followed_and_the_next_save_replaces_it(cache) -> None:  # type: ignore[no-untyped-def]
    store, f, raw = bound_sidecar(cache)
    path = store.sidecar_path(KEY)
    elsewhere = path.parent.parent / "elsewhere.presence"
    elsewhere.write_bytes(raw)  # a perfectly valid sidecar, but reached through a link
    path.unlink()
    path.symlink_to(elsewhere)
    bp = store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)
    assert not bp.trusted
    assert store.load_bound(KEY, f) is None
    bp.note_written(3, 1)
    write_chunks(f, 3, 1)
    store.bind(bp, f)
    assert not path.is_symlink() and elsewhere.read_bytes() == raw
    again = store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)
    assert again.trusted and again.bitmap.present_runs(0, 11) == [(3, 1)]


DEV_ZERO_CHILD = """
import os, sys
from pathlib import Path
from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.presence.store import PresenceStore
store = PresenceStore(Path(sys.argv[1]))
f = Path(sys.argv[2])
key = BlobKey(b"erofs,img", b"img")
bp = store.load(key, f, 10 * 4096 + 100, "t1", chunk_size=4096)
print("trusted" if bp.trusted else "miss", store.load_bound(key, f))
"""


def test_a_sidecar_linked_to_dev_zero_is_a_miss(cache) -> None:  # type: ignore[no-untyped-def]
    """The old code read it whole until MemoryError; run in a child whose address space
    is capped at 2 GiB so that a regression fails the test, not the machine."""
    store, f, _raw = bound_sidecar(cache)
    path = store.sidecar_path(KEY)
    path.unlink()
    path.symlink_to("/dev/zero")

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    child = subprocess.run(
        [sys.executable, "-c", DEV_ZERO_CHILD, str(store.root), str(f)],
        preexec_fn=cap_memory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.splitlines()[-1].split() == ["miss", "None"]


def test_a_sidecar_larger_than_the_blob_allows_is_not_read(cache) -> None:  # type: ignore[no-untyped-def]
    """A 1 GiB sparse sidecar whose (valid) head claims 1 GiB: refused from the head,
    whatever the file holds; as is one with a GiB of trailing bytes."""
    store, f, raw = bound_sidecar(cache)
    path = store.sidecar_path(KEY)
    head = bytearray(raw[: fmt.HEAD.size])
    nchunks = 8 << 30
    struct.pack_into("<QQ", head, 16, nchunks * CHUNK, nchunks)  # blob size, chunks
    claimed = fmt.HEAD.size + fmt.HEAD.unpack_from(head)[-1] + 4 + nchunks // 8 + 4
    for contents in (bytes(head), raw):
        with open(path, "wb") as out:
            out.write(contents)
            out.truncate(1 << 30 if contents is raw else claimed)
        tracemalloc.start()
        try:
            bp = store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK)
            bound = store.load_bound(KEY, f)
            _now, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert not bp.trusted and bound is None
        assert peak < 16 << 20, f"read {peak} bytes of a hostile sidecar"


# -- checkpoints: one sidecar that cannot be saved does not stop the others -------------


def three_dirty_blobs(store: PresenceStore) -> list[BlobPresence]:
    blobs = []
    for name in (b"a", b"b", b"c"):
        bp = store.load(BlobKey(b"erofs,v", name), None, SIZE, "t1", chunk_size=CHUNK)
        bp.note_written(1, 2)
        blobs.append(bp)
    return blobs


def test_a_sidecar_that_cannot_be_saved_does_not_stop_the_checkpoint(tmp_path: Path) -> None:
    store = PresenceStore(tmp_path / "presence")
    a, b, c = three_dirty_blobs(store)
    store.sidecar_path(b.key).mkdir()  # rename(2) over a directory: EISDIR, every time
    with capture_logs() as logs:
        saved = store.checkpoint([a, b, c])
    assert saved == 2
    assert store.sidecar_path(a.key).is_file() and store.sidecar_path(c.key).is_file()
    assert not a.dirty and not c.dirty
    assert b.dirty  # its bits are not durable: the next checkpoint tries again
    assert store.save_failures == 1
    failed = [e for e in logs if e["event"] == "presence.save_failed"]
    assert len(failed) == 1 and failed[0]["blob"] == "erofs,v/b"
    assert [p.name for p in tmp_path.joinpath("presence").iterdir() if ".tmp" in p.name] == []
    with capture_logs() as logs:
        assert store.checkpoint([a, b, c]) == 0  # still failing: counted, not warned again
    assert store.save_failures == 2
    assert [(e["event"], e["log_level"]) for e in logs] == [("presence.save_failed", "debug")]
    store.sidecar_path(b.key).rmdir()
    with capture_logs() as logs:
        assert store.checkpoint([a, b, c]) == 1 and not b.dirty
    assert [e["event"] for e in logs] == ["presence.save_recovered"]


def test_a_token_too_long_for_the_format_is_a_save_failure(tmp_path: Path) -> None:
    """An origin's ETag is untrusted: one longer than the format's u16 length must not
    escape the checkpoint as a ValueError (which killed the checkpoint thread)."""
    store = PresenceStore(tmp_path / "presence")
    a, b, c = three_dirty_blobs(store)
    b.token = "x" * 0x10000
    assert store.checkpoint([a, b, c]) == 2
    assert b.dirty and store.save_failures == 1


def test_bind_of_an_unsavable_sidecar_raises_oserror_and_binds_nothing(cache) -> None:  # type: ignore[no-untyped-def]
    store, f = cache
    bp = store.load(KEY, None, SIZE, "t1", chunk_size=CHUNK)
    bp.note_written(0, 1)
    store.sidecar_path(KEY).mkdir()
    with pytest.raises(OSError):
        store.bind(bp, f)
    with pytest.raises(OSError):
        os.getxattr(f, BINDING_XATTR)
    assert not bp.trusted and bp.dirty


def test_clear_runs_that_cannot_save_forgets_the_whole_blob_durably(
    cache: tuple[PresenceStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trims run when space is short: with the sidecar unsavable (ENOSPC), the bits
    must still be gone from disk before the caller punches holes, so the sidecar goes."""
    store, f, _raw = bound_sidecar(cache)
    bp = store.load_bound(KEY, f)
    assert bp is not None

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "save_file_atomically", disk_full)
    store.clear_runs(bp, [(1, 1)])
    assert not store.sidecar_path(KEY).exists()
    assert bp.bitmap.count() == 0 and not bp.trusted and store.save_failures == 1
    assert not store.load(KEY, f, SIZE, "t1", chunk_size=CHUNK).trusted


def test_a_directory_on_a_sidecar_name_never_stops_a_cull_or_the_orphan_sweep(
    tmp_path: Path,
) -> None:
    """A directory where a sidecar belongs is a miss at load; removing the blob's
    sidecar (after a cull) and listing orphans must not raise over it either (both run
    inside a cull pass)."""
    store = PresenceStore(tmp_path / "presence")
    squatted = store.sidecar_path(KEY)
    squatted.mkdir()
    (store.root / ("0" * 64 + ".presence")).mkdir()
    assert not store.load(KEY, tmp_path / "Dimg", SIZE, "t1", chunk_size=CHUNK).trusted
    with capture_logs() as logs:
        store.remove(KEY)
    assert [e["event"] for e in logs] == ["presence.remove_failed"]
    assert store.orphans(set()) == []


def test_load_bound_reads_no_more_than_the_cache_file_can_need(cache) -> None:  # type: ignore[no-untyped-def]
    """``load_bound`` (a cull's trim) has no geometry from a source: the sidecar's
    claim is bounded by the cache file's size in the smallest chunks (4 KiB). A sparse
    sidecar whose head claims 2^31 chunks (a 256 MiB bitmap) was read whole."""
    store, f, raw = bound_sidecar(cache)
    path = store.sidecar_path(KEY)
    head = bytearray(raw[: fmt.HEAD.size])
    nchunks = 1 << 31
    struct.pack_into("<QQ", head, 16, nchunks * CHUNK, nchunks)  # blob size, chunks
    with open(path, "wb") as out:
        out.write(bytes(head))
        out.truncate(fmt.claimed_length(bytes(head)))
    tracemalloc.start()
    try:
        bound = store.load_bound(KEY, f)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bound is None
    assert peak < 16 << 20, f"read {peak} bytes of a hostile sidecar"
    path.write_bytes(raw)  # the honest sidecar is still trusted for trimming
    trimmed = store.load_bound(KEY, f)
    assert trimmed is not None and trimmed.bitmap.count() == 2
