"""Sidecars on real files with real xattrs: binding, distrust, and crashes between
every two durable steps (borg's crash tests, in spirit)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.kernel import durable
from cachefilesd_py.presence.store import BINDING_XATTR, PresenceStore
from cachefilesd_py.presence.verify import verify

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
