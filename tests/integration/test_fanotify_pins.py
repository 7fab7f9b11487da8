"""``cachefilesctl pin``/``unpin``/``pins`` in fanotify mode, over the fanotify frontend's
live stack with a stand-in group (``FanLive`` of ``test_fanotify_control.py``: the test
plays the kernel, raising a pre-access event with a fresh fd of the cache file for each
read and checking the answer). The same pin store, cap and plan as on-demand mode
(``test_pins_daemon.py``); what this mode adds: a served blob is preloaded through its
own events (a read through a fresh fd, the daemon answering it), an idle blob of
``<dir>/fanotify`` is written into its unmarked file, and the fanotify culler holds the
pins. The real kernel's part (a path on a real file-backed mount) runs in
tests/vm/test_fanotify_control_guest.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cachefilesd_py.control.client import call
from cachefilesd_py.control.schema import ControlError, ErrorCode
from cachefilesd_py.erofs.layout import ErofsImage
from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.space.pins import PIN_FILE_NAME
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.integration.test_fanotify_control import BLOB, CHUNK, DATA, SIZE, FanLive
from tests.integration.test_pins_daemon import (
    chunks_of,
    erofs_image,
    needs_mkfs,
    present_chunks,
)

KEEP, OLD = "erofs,imgs/keep.erofs", "erofs,imgs/old.erofs"
KEEP_DATA = pattern_bytes(31, 0, 100_000)
OLD_DATA = pattern_bytes(32, 0, 512 << 10)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fan-pins-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_pin_fills_the_served_blob_through_its_own_events(root: Path) -> None:
    d = FanLive(root, extra="pin_max_share 100%\n")
    try:
        seen: list[Any] = []
        reply = call(d.sock, "pin", blob=BLOB, on_progress=seen.append)
        assert reply["preloaded"] and reply["present_pct"] == 100.0, reply
        assert reply["via"] == "mount's reader" and reply["bytes"] == SIZE
        assert seen[0] == {"phase": "data", "done": 0, "total": SIZE}
        assert seen[-1] == {"phase": "data", "done": SIZE, "total": SIZE}
        # the daemon answered its own events: fills through the event's fd
        counts = d.driver.session.counts()
        assert counts.fills >= 1 and counts.fill_failed == 0
        assert d.engine.filler.stats.bytes_fetched == SIZE, "a chunk fetched twice or never"
        assert d.served.path.read_bytes() == DATA
        [p] = call(d.sock, "pins")["pins"]
        assert p == {
            "blob": BLOB,
            "source": "cli",
            "size": SIZE,
            "present_pct": 100.0,
            "open": True,
        }
        assert call(d.sock, "blobs")["blobs"][0]["pinned"] is True
        # a reader now finds every byte present: no fill
        fills = counts.fills
        assert d.read(0, SIZE) == wire.FAN_ALLOW
        assert d.driver.session.counts().fills == fills
        # a blob the source does not have: refused, nothing pinned
        with pytest.raises(ControlError) as e:
            call(d.sock, "pin", blob="erofs,imgs/nosuch.erofs")
        assert e.value.code is ErrorCode.FAILED
        assert [p["blob"] for p in call(d.sock, "pins")["pins"]] == [BLOB]
    finally:
        d.close()


def with_idle_blobs(root: Path) -> tuple[Path, Path]:
    """Two cache files of images no longer configured (no mount reads them), their
    origins next to the served image's."""
    origin = root / "origin" / "imgs"
    origin.mkdir(parents=True, exist_ok=True)
    tree = root / "cache" / "fanotify" / "imgs"
    tree.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in (("keep.erofs", KEEP_DATA), ("old.erofs", OLD_DATA)):
        (origin / name).write_bytes(data)
        (tree / name).write_bytes(os.urandom(len(data)))  # another version: overwritten
        out.append(tree / name)
    return out[0], out[1]


def test_cull_spares_a_pinned_idle_blob_across_a_restart_until_unpinned(root: Path) -> None:
    keep, old = with_idle_blobs(root)
    # ~610 KiB of idle files over a 200K cap; the served (mounted) blob is in use
    extra = "cache_max_bytes 200K\npin_max_share 100%\n"
    d = FanLive(root, extra=extra, cull=True)
    try:
        reply = call(d.sock, "pin", blob=KEEP)
        assert reply["preloaded"] and reply["via"] == "cache file", reply
        assert reply["present_pct"] == 100.0 and keep.read_bytes() == KEEP_DATA
        [p] = call(d.sock, "pins")["pins"]  # idle: its present share from its sidecar
        assert p == {
            "blob": KEEP,
            "source": "cli",
            "size": len(KEEP_DATA),
            "present_pct": 100.0,
            "open": False,
        }
    finally:
        d.close()
    assert (root / "cache" / "cachefilesd-py" / PIN_FILE_NAME).exists()
    # a restart: the pin is read back and the culler holds it from its first pass
    d = FanLive(root, extra=extra, cull=True)
    try:
        assert [p["blob"] for p in call(d.sock, "pins")["pins"]] == [KEEP]
        plan = call(d.sock, "cull_plan")
        outcomes = {x["blob"]: x["outcome"] for x in plan["decisions"]}
        assert plan["needed"] and outcomes.get(OLD) == "culled", plan
        assert outcomes.get(KEEP) in (None, "pinned") and outcomes.get(BLOB) in (None, "in_use")
        done = call(d.sock, "cull")
        assert done["culled"] == 1 and not old.exists(), done
        assert keep.read_bytes() == KEEP_DATA, "the pinned idle blob was touched"
        # a lower cap: over it, and pinned, nothing more goes
        d.conf.write_text(d.conf.read_text().replace("200K", "20K"))
        assert "cache_max_bytes" in call(d.sock, "reload")["applied"]
        again = call(d.sock, "cull")
        assert again["needed"] and not again.get("culled") and not again.get("trimmed"), again
        assert keep.read_bytes() == KEEP_DATA
        # unpinned: cullable at once
        assert call(d.sock, "unpin", blob=KEEP) == {
            "blob": KEEP,
            "unpinned": True,
            "config_pin_still_holds": False,
        }
        gone = call(d.sock, "cull")
        assert gone["culled"] + gone["trimmed"] == 1, gone
        assert not keep.exists() or keep.stat().st_blocks * 512 < len(KEEP_DATA)
        assert call(d.sock, "pins")["pins"] == []
        with pytest.raises(ControlError) as e:
            call(d.sock, "unpin", blob=KEEP)
        assert e.value.code is ErrorCode.NOT_FOUND
        assert d.served.path.exists(), "the mounted blob was culled"
    finally:
        d.close()


def test_the_cap_refuses_a_pin_and_warns_near_it(root: Path) -> None:
    # cap: 50% of 1500K = 768000 bytes; the 1000123-byte blob does not fit
    d = FanLive(root, extra="cache_max_bytes 1500K\n")
    try:
        with capture_logs() as logs, pytest.raises(ControlError) as e:
            call(d.sock, "pin", blob=BLOB)
        assert e.value.code is ErrorCode.FAILED
        assert "over the cap of 768000 bytes" in e.value.message, e.value.message
        assert [x for x in logs if x["event"] == "pins.refused"]
        assert call(d.sock, "pins")["pins"] == []
        assert d.engine.filler.stats.bytes_fetched == 0, "a refused pin fetched"
        assert not (d.cache / "cachefilesd-py" / PIN_FILE_NAME).exists()
    finally:
        d.close()
    # cap: 100% of 1050K = 1075200; the blob is 93% of it: taken, warned
    d = FanLive(root, extra="cache_max_bytes 1050K\npin_max_share 100%\n")
    try:
        with capture_logs() as logs:
            assert call(d.sock, "pin", blob=BLOB)["present_pct"] == 100.0
        [w] = [x for x in logs if x["event"] == "pins.near_cap"]
        assert w["log_level"] == "warning" and w["total"] == SIZE and w["cap"] == 1075200
    finally:
        d.close()


@needs_mkfs
def test_pin_path_preloads_metadata_then_that_files_chunks_through_the_events(
    root: Path,
) -> None:
    image = erofs_image(root)
    d = FanLive(root, extra="pin_max_share 100%\n", data=image)
    try:
        layout = ErofsImage(lambda off, n: image[off : off + n], len(image))
        meta, big = layout.metadata(), layout.needs("/big")
        seen: list[Any] = []
        reply = call(d.sock, "pin", blob=BLOB, path="/big", on_progress=seen.append)
        assert reply["preloaded"] and reply["path"] == "/big"
        [b] = reply["blobs"]
        assert b["blob"] == BLOB and b["via"] == "mount's reader"
        phases = [p["phase"] for p in seen]
        assert phases[0] == "metadata" and phases[-1] == "data"
        assert phases == sorted(phases, key=["metadata", "data"].index)
        assert seen[-1]["done"] == seen[-1]["total"] == reply["bytes"]
        want = chunks_of(meta, CHUNK) | chunks_of(big, CHUNK)
        assert present_chunks(d.engine, BLOB) == want
        assert 0 < len(want) < -(-len(image) // CHUNK)
        assert d.driver.session.counts().fill_failed == 0
        with pytest.raises(ControlError) as e:
            call(d.sock, "pin", blob=BLOB, path="/d1/nope")
        assert e.value.code is ErrorCode.NOT_FOUND
        # the whole image
        reply = call(d.sock, "pin", blob=BLOB, path="/")
        assert reply["blobs"][0]["present_pct"] == 100.0
        assert d.served.path.read_bytes() == image
    finally:
        d.close()
