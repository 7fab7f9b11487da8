"""``cachefilesctl pin``/``unpin``/``pins`` against the daemon's live on-demand stack
on the fake kernel (``space/pins.py``, ``daemon/control.py``): a pin preloads every
chunk through the fill path, a cull pass under pressure keeps the pinned blob whole
while it culls others, an unpin makes it cullable again, pins survive a restart, and
the pinned total is capped."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cachefilesd_py.control.cli import main as ctl
from cachefilesd_py.control.client import call
from cachefilesd_py.control.schema import ControlError, ErrorCode
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.erofs.layout import ErofsImage
from cachefilesd_py.erofs.ranges import Needs
from cachefilesd_py.kernel.layout import object_path
from cachefilesd_py.space.pins import PIN_FILE_NAME
from cachefilesd_py.testing.erofs_images import VARIANTS, build, make_tree
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.integration.test_control_daemon import BLOB, CHUNK, DATA, SIZE, Live, wait_idle

OTHER = "erofs,other/other"
OTHER_DATA = pattern_bytes(29, 0, 900_000)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ctl-pins-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(root: Path, extra: str = "", cull: bool = False) -> Live:
    d = Live(root, extra=extra, cull=cull)
    (d.blobs / "other").write_bytes(OTHER_DATA)
    return d


def cached_bytes(d: Live, volume: bytes, cookie: bytes, size: int = SIZE) -> bytes:
    """The blob's bytes in its cache file (the kernel sizes the file in whole pages:
    the padding must be zeros)."""
    data = object_path(d.cache, volume, cookie).read_bytes()
    assert data[size:] == bytes(len(data) - size)
    return data[:size]


def test_pin_of_an_open_blob_preloads_every_chunk(root: Path) -> None:
    d = start(root)
    try:
        obj = d.fake.lookup(b"erofs,img", b"img")
        assert obj.read(0, 4096) == DATA[:4096]
        seen: list[Any] = []
        reply = call(d.sock, "pin", blob=BLOB, on_progress=seen.append)
        assert reply["preloaded"] and reply["via"] == "kernel object"
        assert reply["present_pct"] == 100.0 and reply["size"] == SIZE
        assert seen[-1] == {"phase": "data", "done": SIZE, "total": SIZE}
        assert d.engine.filler.stats.bytes_fetched == SIZE, "a chunk fetched twice or never"
        sent = d.fake.reads_sent
        assert obj.read(0, SIZE) == DATA
        assert d.fake.reads_sent == sent, "the kernel still had holes after the pin"
        [b] = call(d.sock, "blobs")["blobs"]
        assert b["pinned"] is True
        [p] = call(d.sock, "pins")["pins"]
        assert p == {
            "blob": BLOB,
            "source": "cli",
            "size": SIZE,
            "present_pct": 100.0,
            "open": True,
        }
    finally:
        d.close()


def test_pin_of_a_cached_blob_no_kernel_object_has_open(root: Path) -> None:
    """The blob's cache file is in the tree, no kernel object has it open: the pin
    writes its missing chunks into the cache file and binds the sidecar, so the next
    OPEN reads it all without asking the daemon."""
    d = start(root)
    try:
        obj = d.fake.lookup(b"erofs,img", b"img")
        assert obj.read(0, 100_000) == DATA[:100_000]
        obj.withdraw()
        wait_idle(d)
        fetched = d.engine.filler.stats.bytes_fetched
        reply = call(d.sock, "pin", blob=BLOB)
        assert reply["preloaded"] and reply["via"] == "cache file", reply
        assert reply["present_pct"] == 100.0
        assert d.engine.filler.stats.bytes_fetched - fetched == SIZE - fetched
        assert d.engine.blobs() == [] and not d.engine.leases.in_use()
        assert cached_bytes(d, b"erofs,img", b"img") == DATA
        [p] = call(d.sock, "pins")["pins"]
        assert p["present_pct"] == 100.0 and p["open"] is False, p
        obj = d.fake.lookup(b"erofs,img", b"img")
        sent = d.fake.reads_sent
        assert obj.read(0, SIZE) == DATA
        assert d.fake.reads_sent == sent
    finally:
        d.close()


def test_pin_of_a_blob_the_kernel_never_opened_is_kept_for_later(root: Path) -> None:
    d = start(root)
    try:
        reply = call(d.sock, "pin", blob=OTHER)
        assert reply["preloaded"] is False and reply["size"] == len(OTHER_DATA), reply
        assert reply["bytes"] == 0 and [b["blob"] for b in reply["blobs"]] == [OTHER]
        assert "no cache file yet" in reply["note"]
        # once the kernel opened it, pinning again preloads it
        obj = d.fake.lookup(b"erofs,other", b"other")
        assert call(d.sock, "pin", blob=OTHER)["present_pct"] == 100.0
        assert obj.read(0, len(OTHER_DATA)) == OTHER_DATA
        with pytest.raises(ControlError) as e:
            call(d.sock, "pin", blob="erofs,nosuch/nosuch")
        assert e.value.code is ErrorCode.FAILED
        assert [p["blob"] for p in call(d.sock, "pins")["pins"]] == [OTHER]
    finally:
        d.close()


def test_cull_under_pressure_keeps_the_pinned_blob_whole(root: Path) -> None:
    # two blobs (~1.9 MB) over a 1200K cap: a pass must free about one of them
    d = start(root, extra="cache_max_bytes 1200K\npin_max_share 100%\n", cull=True)
    try:
        for vol, data in ((b"img", DATA), (b"other", OTHER_DATA)):
            obj = d.fake.lookup(b"erofs," + vol, vol)
            assert obj.read(0, len(data)) == data
            obj.withdraw()
        wait_idle(d)
        pinned_file = object_path(d.cache, b"erofs,img", b"img")
        other_file = object_path(d.cache, b"erofs,other", b"other")
        assert call(d.sock, "pin", blob=BLOB)["present_pct"] == 100.0
        blocks = pinned_file.stat().st_blocks
        plan = call(d.sock, "cull_plan")
        outcomes = {x["blob"]: x["outcome"] for x in plan["decisions"]}
        assert outcomes.get(BLOB) in (None, "pinned") and outcomes[OTHER] == "culled", plan
        done = call(d.sock, "cull")
        assert done["culled"] == 1 and not other_file.exists(), done
        assert pinned_file.stat().st_blocks == blocks
        assert cached_bytes(d, b"erofs,img", b"img") == DATA
        # a lower cap (applied by reload, which keeps run-time pins): over it, and
        # pinned, nothing more goes
        d.conf.write_text(d.conf.read_text().replace("1200K", "500K"))
        assert "cache_max_bytes" in call(d.sock, "reload")["applied"]
        plan = call(d.sock, "cull_plan")
        assert [x["outcome"] for x in plan["decisions"]] == ["pinned"], plan
        again = call(d.sock, "cull")
        assert again["needed"] and again["pinned"] == 1 and not again.get("culled"), again
        assert cached_bytes(d, b"erofs,img", b"img") == DATA
        # unpinned, it is cullable again
        assert call(d.sock, "unpin", blob=BLOB) == {
            "blob": BLOB,
            "unpinned": True,
            "config_pin_still_holds": False,
        }
        gone = call(d.sock, "cull")
        assert gone["culled"] + gone["trimmed"] == 1, gone
        assert not pinned_file.exists() or pinned_file.stat().st_blocks < blocks
        with pytest.raises(ControlError) as e:
            call(d.sock, "unpin", blob=BLOB)
        assert e.value.code is ErrorCode.NOT_FOUND
    finally:
        d.close()


def test_pins_survive_a_restart_and_a_corrupt_file_is_no_pins(root: Path) -> None:
    d = start(root, extra="cache_max_bytes 1200K\npin_max_share 100%\n", cull=True)
    try:
        obj = d.fake.lookup(b"erofs,img", b"img")
        call(d.sock, "pin", blob=BLOB)
        obj.withdraw()
        wait_idle(d)
    finally:
        d.close()
    d = start(root, extra="cache_max_bytes 1200K\npin_max_share 100%\n", cull=True)
    try:
        [p] = call(d.sock, "pins")["pins"]
        assert p["blob"] == BLOB and p["source"] == "cli" and p["present_pct"] == 100.0, p
        obj = d.fake.lookup(b"erofs,other", b"other")
        assert obj.read(0, len(OTHER_DATA)) == OTHER_DATA
        obj.withdraw()
        wait_idle(d)
        plan = call(d.sock, "cull_plan")  # the restarted daemon's culler keeps it
        assert {x["blob"]: x["outcome"] for x in plan["decisions"]}.get(BLOB) in (
            None,
            "pinned",
        ), plan
        done = call(d.sock, "cull")
        assert done["culled"] == 1, done
        assert cached_bytes(d, b"erofs,img", b"img") == DATA
    finally:
        d.close()
    state = root / "cache" / "cachefilesd-py" / PIN_FILE_NAME
    state.write_bytes(b'{"version": 1, "pins": {')  # torn by hand
    with capture_logs() as logs:
        d = start(root)
    try:
        assert call(d.sock, "pins")["pins"] == []
        [e] = [e for e in logs if e["event"] == "pins.corrupt"]
        assert e["log_level"] == "error" and e["file"] == str(state)
    finally:
        d.close()


def test_config_pins_are_listed_and_unioned(root: Path) -> None:
    d = start(root, extra="pin img/*\n")
    try:
        d.fake.lookup(b"erofs,img", b"img").read(0, 10)
        pins = call(d.sock, "pins")["pins"]
        assert {(p["blob"], p["source"]) for p in pins} == {("img/*", "config"), (BLOB, "config")}
        call(d.sock, "pin", blob=BLOB)
        assert call(d.sock, "unpin", blob=BLOB)["config_pin_still_holds"] is True
    finally:
        d.close()


def test_the_cap_refuses_a_pin_and_warns_near_it(root: Path) -> None:
    # cap: 50% of 1500K = 750K; the 1 MB blob does not fit, the 900 kB one neither
    d = start(root, extra="cache_max_bytes 1500K\n")
    try:
        d.fake.lookup(b"erofs,img", b"img")
        fetched = d.engine.filler.stats.bytes_fetched
        with capture_logs() as logs, pytest.raises(ControlError) as e:
            call(d.sock, "pin", blob=BLOB)
        assert e.value.code is ErrorCode.FAILED
        assert "over the cap of 768000 bytes" in e.value.message, e.value.message
        assert "pin_max_share 50%" in e.value.message
        assert [x for x in logs if x["event"] == "pins.refused"]
        assert call(d.sock, "pins")["pins"] == []
        assert d.engine.filler.stats.bytes_fetched == fetched, "a refused pin fetched"
        assert not (d.cache / "cachefilesd-py" / PIN_FILE_NAME).exists()
    finally:
        d.close()
    # a reload applies a new share at once
    d = start(root, extra="cache_max_bytes 1500K\n")
    try:
        d.conf.write_text(d.conf.read_text() + "pin_max_share 70%\n")
        assert call(d.sock, "reload")["applied"] == ["pin_max_share"]
        d.fake.lookup(b"erofs,img", b"img")
        assert call(d.sock, "pin", blob=BLOB)["present_pct"] == 100.0  # 1000123 <= 1075200
        call(d.sock, "unpin", blob=BLOB)
    finally:
        d.close()
    # cap: 100% of 1050K = 1075200; the 1000123-byte blob is 93% of it: taken, warned
    d = start(root, extra="cache_max_bytes 1050K\npin_max_share 100%\n")
    try:
        d.fake.lookup(b"erofs,img", b"img")
        with capture_logs() as logs:
            assert call(d.sock, "pin", blob=BLOB)["present_pct"] == 100.0
        [w] = [x for x in logs if x["event"] == "pins.near_cap"]
        assert w["log_level"] == "warning" and w["total"] == SIZE and w["cap"] == 1075200
    finally:
        d.close()


def test_cachefilesctl_pin_pins_unpin(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = start(root)
    try:
        d.fake.lookup(b"erofs,img", b"img")
        capsys.readouterr()
        assert ctl(["pin", BLOB, "--socket", d.sock]) == 0
        out = capsys.readouterr().out
        assert f"{BLOB}: pinned; 976.7 KiB preloaded in " in out
        assert f"  {BLOB}  976.7 KiB  100.0% present (through its kernel object)" in out
        assert ctl(["pins", "--socket", d.sock]) == 0
        out = capsys.readouterr().out
        assert "BLOB" in out and "PIN" in out and "PRESENT" in out
        assert any(
            line.split() == [BLOB, "cli", "976.7", "KiB", "100.0%"] for line in out.splitlines()
        ), out
        assert "cap: pin_max_share 50%" in out
        assert ctl(["unpin", BLOB, "--socket", d.sock]) == 0
        assert f"{BLOB}: unpinned" in capsys.readouterr().out
        assert ctl(["unpin", BLOB, "--socket", d.sock]) == 1
        assert "not_found" in capsys.readouterr().err
    finally:
        d.close()


# -- pin IMAGE / pin PATH: an EROFS image from mkfs.erofs ---------------------------------

needs_mkfs = pytest.mark.skipif(
    shutil.which("mkfs.erofs") is None, reason="needs erofs-utils (scripts/setup)"
)


def erofs_image(root: Path) -> bytes:
    tree = make_tree(root / "src")
    inline = next(v for v in VARIANTS if v.name == "inline")
    (root / "img").mkdir()
    image, _blob = build(inline, tree, root / "img")
    return image.read_bytes()


def present_chunks(engine: Engine, name: str) -> set[int]:
    [blob] = [b for b in engine.blobs() if str(b.key) == name]
    assert blob.presence is not None
    with blob.presence.lock:
        runs = blob.presence.bitmap.present_runs(0, blob.geometry.nchunks)
    return {c for first, count in runs for c in range(first, first + count)}


def chunks_of(needs: Needs, chunk: int) -> set[int]:
    return {
        c for start, end in needs.for_device(0) for c in range(start // chunk, -(-end // chunk))
    }


@needs_mkfs
def test_pin_path_preloads_metadata_first_then_only_that_files_chunks(root: Path) -> None:
    image = erofs_image(root)
    d = start(root)
    try:
        (d.blobs / "base").write_bytes(image)
        obj = d.fake.lookup(b"erofs,base", b"base")
        layout = ErofsImage(lambda off, n: image[off : off + n], len(image))
        meta, big = layout.metadata(), layout.needs("/big")
        seen: list[Any] = []
        reply = call(d.sock, "pin", blob="erofs,base/base", path="/big", on_progress=seen.append)
        assert reply["preloaded"] and reply["path"] == "/big"
        [b] = reply["blobs"]
        assert b["blob"] == "erofs,base/base" and b["via"] == "kernel object"
        # metadata first, then data; every progress line counts up to the total
        phases = [p["phase"] for p in seen]
        assert phases[0] == "metadata" and phases[-1] == "data"
        assert phases == sorted(phases, key=["metadata", "data"].index)
        assert seen[-1]["done"] == seen[-1]["total"] == reply["bytes"]
        # exactly the chunks behind the metadata and /big are present, nothing else
        want = chunks_of(meta, CHUNK) | chunks_of(big, CHUNK)
        assert present_chunks(d.engine, "erofs,base/base") == want
        assert 0 < len(want) < -(-len(image) // CHUNK)
        # and the kernel reads them without asking the daemon
        sent = d.fake.reads_sent
        for c in sorted(want):
            off = c * CHUNK
            n = min(CHUNK, len(image) - off)
            assert obj.read(off, n) == image[off : off + n]
        assert d.fake.reads_sent == sent, "a preloaded chunk was still a hole"
        # the whole image: every chunk
        reply = call(d.sock, "pin", blob="erofs,base/base", path="/")
        assert reply["blobs"][0]["present_pct"] == 100.0
        assert obj.read(0, len(image)) == image and d.fake.reads_sent == sent
        [p] = call(d.sock, "pins")["pins"]
        assert p["blob"] == "erofs,base/base" and p["size"] == len(image)
    finally:
        d.close()


@needs_mkfs
def test_pin_path_errors(root: Path) -> None:
    image = erofs_image(root)
    d = start(root)
    try:
        (d.blobs / "base").write_bytes(image)
        d.fake.lookup(b"erofs,base", b"base")
        with pytest.raises(ControlError) as e:
            call(d.sock, "pin", blob="erofs,base/base", path="/d1/nope")
        assert e.value.code is ErrorCode.NOT_FOUND and "nope" in e.value.message
        with pytest.raises(ControlError) as e:  # not an EROFS image
            call(d.sock, "pin", blob=BLOB, path="/")
        assert e.value.code is ErrorCode.FAILED and "not a readable EROFS image" in str(e.value)
        with pytest.raises(ControlError) as e:
            call(d.sock, "pin", blob=BLOB, path="relative")
        assert e.value.code is ErrorCode.BAD_ARGS
        # nothing was pinned by the refused calls
        assert call(d.sock, "pins")["pins"] == []
    finally:
        d.close()
