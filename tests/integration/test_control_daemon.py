"""The control socket against the daemon's live on-demand stack on the fake kernel:
``cachefilesctl`` sub-commands (through their ``main``), the Prometheus text parsed
back with ``prometheus_client``'s parser and its counters checked against what the
test did, prefetch, live verify and reload reports."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from cachefilesd_py.config.load import load_config
from cachefilesd_py.control.cli import main as ctl
from cachefilesd_py.control.client import call
from cachefilesd_py.control.schema import ControlError, ErrorCode
from cachefilesd_py.daemon.app import Daemon, engine_settings, ondemand_figures, source_settings
from cachefilesd_py.daemon.control import ControlService, serve_control
from cachefilesd_py.engine.conflicts import ConflictBook
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.frontends.ondemand.space import make_culler
from cachefilesd_py.kernel.layout import object_path
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.space.caps import CullRules
from cachefilesd_py.space.culler import DECISION_EVENTS
from cachefilesd_py.testing.fake_kernel import FakeCachefiles
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

CHUNK = 64 * 1024
SIZE = 1_000_000 + 123
DATA = pattern_bytes(13, 0, SIZE)
BLOB = "erofs,img/img"


def conf_text(cache: Path, source: str, sock: str, extra: str = "") -> str:
    return (
        f"dir {cache}\ntag t\nondemand\nsource * {source}\n"
        f"chunk_size 64K\nreadahead 0\nfetch_timeout 3\ncontrol_socket {sock}\n{extra}"
    )


class Live:
    """The on-demand stack, served by a thread, with its control socket."""

    def __init__(
        self,
        root: Path,
        source: str = "",
        extra: str = "",
        cull: bool = False,
        checkpoint_interval: float | None = None,
    ) -> None:
        self.blobs = root / "blobs"
        self.blobs.mkdir(exist_ok=True)
        (self.blobs / "img").write_bytes(DATA)
        self.cache = root / "cache"
        self.cache.mkdir(exist_ok=True)
        self.sock = str(root / "ctl.sock")
        self.conf = root / "cachefilesd.conf"
        self.source = source or f"file://{self.blobs}/{{cookie}}"
        self.conf.write_text(conf_text(self.cache, self.source, self.sock, extra))
        config = load_config(str(self.conf))
        self.daemon = Daemon(config, str(self.conf), nocull=True)
        self.fake = FakeCachefiles()
        self.factory = SourceFactory(source_settings(config))
        self.daemon._factory = self.factory
        settings = engine_settings(config)
        if checkpoint_interval is not None:
            settings = replace(settings, checkpoint_interval=checkpoint_interval)
        self.engine = Engine(
            resolve=SourceResolver(config.sources).resolve,
            open_source=self.factory.open,
            presence=PresenceStore(self.cache / "cachefilesd-py" / "presence"),
            settings=settings,
            conflicts=ConflictBook(self.cache / "cachefilesd-py"),
        )
        self.daemon._engine = self.engine
        self.driver = OnDemandDriver(self.fake, self.engine, self.cache, workers=4, fetch_timeout=3)
        if cull:
            self.driver.culler = make_culler(
                self.fake,
                self.cache,
                self.engine.presence,
                self.engine.leases,
                config,
                CullRules.from_config(config),
            )
            self.daemon._culler = self.driver.culler
        self.driver.bind([b"dir " + str(self.cache).encode(), b"tag t"])
        self.engine.start()

        self.control: ControlService = serve_control(
            self.daemon,
            "ondemand",
            lambda: ondemand_figures(self.driver, self.engine),
            self.engine,
            self.driver,
        )
        self.last_err = ""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.driver.serve, args=(self.stop, 0.05))
        self.thread.start()

    def ctl(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
        """Run ``cachefilesctl ARGV --json --socket ...``; (exit status, parsed stdout)."""
        capsys.readouterr()
        rc = ctl([*argv, "--json", "--socket", self.sock])
        out, self.last_err = capsys.readouterr()
        # the daemon's threads log to stdout too (before the reply is sent)
        start = out.find("{\n")
        return rc, json.JSONDecoder().raw_decode(out[start:])[0] if start >= 0 else None

    def close(self) -> None:
        self.control.close()
        self.stop.set()
        self.thread.join(10)
        self.driver.shutdown()
        self.fake.close()


@pytest.fixture
def live() -> Iterator[Live]:
    root = Path(tempfile.mkdtemp(prefix="ctl-live-"))
    d = Live(root)
    yield d
    d.close()
    shutil.rmtree(root, ignore_errors=True)


def metrics_of(text: str) -> dict[str, float]:
    """``{sample name{labels}: value}`` from the Prometheus text, by its own parser."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_status_blobs_show_stats_and_metrics(
    live: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    obj = live.fake.lookup(b"erofs,img", b"img")
    assert obj.read(0, 200_000) == DATA[:200_000]
    reads = live.driver.stats.reads
    assert reads > 0

    rc, st = live.ctl(capsys, "status")
    assert rc == 0 and st["mode"] == "ondemand" and st["objects"] == 1
    assert st["open_blobs"] == 1 and st["space"]["thresholds_pct"]["bcull"] == 5

    rc, listing = live.ctl(capsys, "blobs")
    [b] = listing["blobs"]
    assert rc == 0 and b["blob"] == BLOB and b["size"] == SIZE and b["chunk_size"] == CHUNK
    want_chunks = -(-200_000 // CHUNK)
    assert b["present_chunks"] == want_chunks and b["chunks"] == -(-SIZE // CHUNK)
    assert b["source"] == f"file://{live.blobs}/img" and b["pinned"] is False

    rc, shown = live.ctl(capsys, "show", BLOB, "--width", "8")
    assert rc == 0 and sum(p for p, _n in shown["cells"]) == want_chunks
    assert sum(n for _p, n in shown["cells"]) == b["chunks"]
    assert ctl(["show", BLOB, "--socket", live.sock]) == 0
    drawn = capsys.readouterr().out
    assert "█" in drawn and "·" in drawn and "all chunks present" in drawn

    rc, stats = live.ctl(capsys, "stats")
    assert rc == 0 and stats["counters"]["bytes_fetched"] == want_chunks * CHUNK

    m = metrics_of(call(live.sock, "metrics")["text"])
    assert m["cachefilesd_reads_total"] == reads
    assert m["cachefilesd_fetched_bytes_total"] == want_chunks * CHUNK
    assert m["cachefilesd_fetched_chunks_total"] == want_chunks
    assert m["cachefilesd_read_service_seconds_count"] == reads
    assert m["cachefilesd_read_service_seconds_bucket{le=+Inf}"] == reads
    assert m["cachefilesd_open_blobs"] == 1 and m["cachefilesd_kernel_objects"] == 1
    assert m["cachefilesd_control_requests_total{outcome=ok}"] >= 4


def test_prefetch_fills_the_blob_and_reads_then_fetch_nothing(live: Live) -> None:
    obj = live.fake.lookup(b"erofs,img", b"img")
    obj.read(0, 4096)
    seen: list[Any] = []
    reply = call(live.sock, "prefetch", blob=BLOB, on_progress=seen.append)
    assert reply["present_pct"] == 100.0 and reply["length"] == SIZE
    assert seen[-1] == {"done": SIZE, "total": SIZE}
    fetched = live.engine.filler.stats.bytes_fetched
    assert fetched == SIZE, "a chunk was fetched twice or not at all"
    sent = live.fake.reads_sent
    assert obj.read(0, SIZE) == DATA
    assert live.engine.filler.stats.bytes_fetched == fetched
    assert live.fake.reads_sent == sent, "the kernel still had holes after the prefetch"


def test_prefetch_range_and_errors(live: Live) -> None:
    live.fake.lookup(b"erofs,img", b"img")
    reply = call(live.sock, "prefetch", blob=BLOB, offset=3 * CHUNK, length=CHUNK + 1)
    assert reply["present_chunks"] == 2
    with pytest.raises(ControlError) as e:
        call(live.sock, "prefetch", blob="erofs,img/other")
    assert e.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(ControlError) as e:
        call(live.sock, "prefetch", blob=BLOB, offset=SIZE)
    assert e.value.code is ErrorCode.BAD_ARGS


def test_live_verify(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    obj = live.fake.lookup(b"erofs,img", b"img")
    obj.read(0, SIZE)
    # open, its cache file is a new one the kernel has not linked in yet
    rc, out = live.ctl(capsys, "verify")
    assert rc == 1 and "not linked into the cache tree yet" in live.last_err
    obj.withdraw()  # the kernel drops it: the file is linked in, the sidecar bound
    for _ in range(100):  # its use lease goes after the sidecar is bound
        if not live.engine.leases.in_use():
            break
        time.sleep(0.05)
    rc, out = live.ctl(capsys, "verify", BLOB)
    assert out is not None, live.last_err
    [report] = out["reports"]
    assert rc == 0 and report["ok"] and report["trusted"], (report, live.last_err)
    assert report["present"] == report["chunks"]
    assert live.engine.blobs() == [], "the blob opened for the check stayed open"
    # a byte of the cache file changed behind the daemon's back: verify says so
    cache_file = object_path(live.cache, b"erofs,img", b"img")
    with open(cache_file, "r+b") as f:
        f.seek(CHUNK + 5)
        f.write(b"\xff" if DATA[CHUNK + 5] != 0xFF else b"\x00")
    rc, out = live.ctl(capsys, "verify", BLOB)
    assert out is not None, live.last_err
    assert rc == 1 and out["reports"][0]["errors"] == ["chunk 1: bytes differ from the source"]


def test_reload_applies_and_reports(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    (live.blobs / "other").write_bytes(DATA[:300_000])
    live.conf.write_text(
        conf_text(live.cache, live.source, live.sock, "source_chunk_size x/* 128K\n")
        .replace("chunk_size 64K", "chunk_size 128K")
        .replace("fetch_timeout 3", "fetch_timeout 4")
    )
    rc, report = live.ctl(capsys, "reload")
    assert rc == 0
    assert report["applied"] == ["chunk_size", "source_chunk_sizes"]
    assert report["needs_restart"] == ["fetch_timeout"]
    assert live.daemon.config.chunk_size == 128 * 1024
    # a blob opened from now on gets the new chunk size
    live.fake.lookup(b"erofs,other", b"other").read(0, 10)
    [b] = [b for b in call(live.sock, "blobs")["blobs"] if b["blob"] == "erofs,other/other"]
    assert b["chunk_size"] == 128 * 1024
    # a bad file changes nothing and says where it is wrong
    live.conf.write_text(live.conf.read_text() + "chunk_size 3\n")
    capsys.readouterr()
    rc = ctl(["reload", "--socket", live.sock])
    err = capsys.readouterr().err
    assert rc == 1 and f"{live.conf}:" in err and "given twice" in err
    assert live.daemon.config.chunk_size == 128 * 1024


def test_reload_picks_up_a_rotated_token(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="ctl-token-"))
    headers = root / "headers"
    headers.write_text("Authorization: Bearer one\n")
    headers.chmod(0o600)
    with FaultServer({"img": DATA, "img2": DATA}) as srv:
        d = Live(root, srv.url + "/{cookie}", f"source_headers * {headers}\n")
        try:
            d.fake.lookup(b"erofs,img", b"img").read(0, 10)
            assert srv.request_headers[-1]["Authorization"] == "Bearer one"
            headers.write_text("Authorization: Bearer two\n")  # rotated; config unchanged
            rc, report = d.ctl(capsys, "reload")
            assert rc == 0 and report["changed"] == []
            d.fake.lookup(b"erofs,img2", b"img2").read(0, 10)
            assert srv.request_headers[-1]["Authorization"] == "Bearer two"
        finally:
            d.close()
            shutil.rmtree(root, ignore_errors=True)


def test_cachefilesctl_as_a_process(live: Live) -> None:
    """``python -m cachefilesd_py.control.cli`` (found in the guest: the sub-commands
    registered into the imported module, not into ``__main__``'s copy)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cachefilesd_py.control.cli", "status", "--socket", live.sock],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mode          ondemand" in proc.stdout


def test_unknown_blob_and_no_daemon(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(["show", "erofs,nope/nope", "--socket", live.sock]) == 1
    assert "not_found" in capsys.readouterr().err
    assert ctl(["status", "--socket", live.sock + ".absent"]) == 3
    assert "no daemon answers" in capsys.readouterr().err


def test_cull_dry_run_then_now(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="ctl-cull-"))
    d = Live(root, extra="cache_max_bytes 200K\n", cull=True)
    try:
        obj = d.fake.lookup(b"erofs,img", b"img")
        assert obj.read(0, SIZE) == DATA
        obj.withdraw()  # idle now: the cap may cull or trim it
        for _ in range(100):
            if not d.engine.leases.in_use():
                break
            time.sleep(0.05)
        path = object_path(d.cache, b"erofs,img", b"img")
        blocks = path.stat().st_blocks
        rc, plan = d.ctl(capsys, "cull", "--dry-run")
        assert rc == 0 and plan["needed"] and plan["need_bytes"] > 0, plan
        [decision] = plan["decisions"]
        assert decision["blob"] == BLOB and decision["outcome"] in ("culled", "trimmed")
        assert decision["reason"]
        assert path.stat().st_blocks == blocks, "a dry run removed something"
        # a pin, applied by reload, keeps it
        d.conf.write_text(d.conf.read_text() + "pin img/*\n")
        rc, report = d.ctl(capsys, "reload")
        assert rc == 0 and "pins" in report["applied"]
        rc, plan = d.ctl(capsys, "cull", "--dry-run")
        assert [x["outcome"] for x in plan["decisions"]] == ["pinned"]
        d.conf.write_text(d.conf.read_text().replace("pin img/*\n", ""))
        assert d.ctl(capsys, "reload")[0] == 0
        rc, done = d.ctl(capsys, "cull", "--now")
        assert rc == 0 and done["culled"] + done["trimmed"] == 1, done
        assert not path.exists() or path.stat().st_blocks < blocks
        m = metrics_of(call(d.sock, "metrics")["text"])
        assert m["cachefilesd_culled_blobs_total"] + m["cachefilesd_trimmed_blobs_total"] >= 1
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


# -- the core's counters in the metrics: each equals what the test did -------------------


def wait_idle(d: Live) -> None:
    for _ in range(100):  # the use lease goes after the release (checkpoint/bind) ran
        if not d.engine.leases.in_use():
            return
        time.sleep(0.05)
    raise AssertionError("the blob's release did not finish")


def test_bytes_per_source_checkpoints_and_last_use(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="ctl-counts-"))
    d = Live(root, checkpoint_interval=3600.0)  # only the test's checkpoints happen
    try:
        label = f"file://{d.blobs}/{{cookie}}"
        m = metrics_of(call(d.sock, "metrics")["text"])
        assert m["cachefilesd_sidecar_checkpoints_total"] == 0
        assert not any(k.startswith("cachefilesd_source_fetched_bytes_total{") for k in m)
        obj = d.fake.lookup(b"erofs,img", b"img")
        before_open = time.time()
        assert obj.read(0, 200_000) == DATA[:200_000]
        assert obj.read(600_000, 10) == DATA[600_000:600_010]
        chunks = -(-200_000 // CHUNK) + 1
        # a second source rule's blob: its bytes are counted under its own label
        (root / "other").mkdir()
        (root / "other" / "img2").write_bytes(DATA[:5000])
        d.conf.write_text(
            d.conf.read_text().replace(
                "source * ", f"source img2/* file://{root}/other/{{cookie}}\nsource * "
            )
        )
        assert d.ctl(capsys, "reload")[0] == 0
        obj2 = d.fake.lookup(b"erofs,img2", b"img2")
        assert obj2.read(0, 5000) == DATA[:5000]

        # one checkpoint saves both dirty sidecars; a second has nothing to save
        d.engine.checkpoint()
        d.engine.checkpoint()
        m = metrics_of(call(d.sock, "metrics")["text"])
        assert m[f"cachefilesd_source_fetched_bytes_total{{source={label}}}"] == chunks * CHUNK
        other = f"file://{root}/other/{{cookie}}"
        assert m[f"cachefilesd_source_fetched_bytes_total{{source={other}}}"] == 5000
        assert m["cachefilesd_fetched_bytes_total"] == chunks * CHUNK + 5000
        assert m["cachefilesd_reads_total"] == d.driver.stats.reads >= 3
        assert m["cachefilesd_reads_failed_total"] == 0
        assert m["cachefilesd_sidecar_checkpoints_total"] == 1
        assert m["cachefilesd_sidecars_saved_total"] == 2
        assert m["cachefilesd_sidecar_checkpoint_failures_total"] == 0
        assert m["cachefilesd_checkpoint_seconds_count"] == 1
        assert not any(k.startswith("cachefilesd_fetch_errors_total{") for k in m)
        _rc, stats = d.ctl(capsys, "stats")
        assert stats["by_label"]["fetched_by_source"] == {label: chunks * CHUNK, other: 5000}
        assert stats["counters"]["checkpoints"] == 1

        # last use: when the kernel last asked for the blob, in ISO 8601 and as an age
        _rc, listing = d.ctl(capsys, "blobs")
        [b] = [b for b in listing["blobs"] if b["blob"] == BLOB]
        used = datetime.fromisoformat(b["last_use"]).timestamp()
        assert before_open - 1 <= used <= time.time() and b["last_use_age_s"] < 60
        assert ctl(["blobs", "--socket", d.sock]) == 0
        table = capsys.readouterr().out
        assert "LAST USE" in table and " s ago" in table

        # the release of the blob binds its sidecar: one more checkpoint, one sidecar
        obj2.withdraw()
        for _ in range(100):  # the release runs after the CLOSE was answered
            if len(d.engine.leases.in_use()) == 1:
                break
            time.sleep(0.05)
        m = metrics_of(call(d.sock, "metrics")["text"])
        assert m["cachefilesd_sidecar_checkpoints_total"] == 2
        assert m["cachefilesd_sidecars_saved_total"] == 3
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


def test_retries_errors_by_kind_and_read_failure_events() -> None:
    """An HTTP source with faults: the retries the source took, the failed fill by
    kind, the failed READ as one event with its blob, range and reason."""
    root = Path(tempfile.mkdtemp(prefix="ctl-faults-"))
    with FaultServer({"img": DATA}) as srv:
        d = Live(root, srv.url + "/{cookie}")
        try:
            label = srv.url + "/{cookie}"
            obj = d.fake.lookup(b"erofs,img", b"img")  # identity learnt: no fault yet
            srv.fault("img", "500", times=2)  # two attempts fail, the third serves
            assert obj.read(0, 10) == DATA[:10]
            srv.fault("img", "503", times=4)  # 1 + fetch_retries (3) attempts: all fail
            with structlog.testing.capture_logs() as logs, pytest.raises(OSError):
                obj.read(5 * CHUNK, 100)
            srv.fault("img", "bad-range", times=4)
            with pytest.raises(OSError):
                obj.read(9 * CHUNK, 100)
            with pytest.raises(OSError):  # no such blob: the OPEN fails
                d.fake.lookup(b"erofs,nope", b"nope")
            m = metrics_of(call(d.sock, "metrics")["text"])
            assert m[f"cachefilesd_source_retries_total{{source={label}}}"] == 2 + 3 + 3
            assert m["cachefilesd_fetch_errors_total{kind=http_5xx}"] == 1
            assert m["cachefilesd_fetch_errors_total{kind=protocol}"] == 1
            assert m["cachefilesd_open_errors_total{kind=not_found}"] == 1
            assert m[f"cachefilesd_source_fetched_bytes_total{{source={label}}}"] == CHUNK
            assert m["cachefilesd_reads_failed_total"] == 2
            assert m["cachefilesd_fetch_failures_total"] == 2
            failed = [e for e in logs if e["event"] == "read.failed"]
            assert len(failed) == 1, logs
            [e] = failed
            assert e["blob"] == BLOB and e["offset"] == 5 * CHUNK and e["length"] >= 100
            assert e["reason"] == "http-503" and e["kind"] == "http_5xx"
            assert e["log_level"] in ("warning", "error")
        finally:
            d.close()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_decision_budget() -> None:
    """The ``cull.decision`` info budget is per process (as in the daemon): tests that
    culled before in this process must not have spent it for the next one."""
    DECISION_EVENTS.reset()


def test_cull_decisions_are_info_events() -> None:
    root = Path(tempfile.mkdtemp(prefix="ctl-cullev-"))
    d = Live(root, extra="cache_max_bytes 200K\n", cull=True)
    try:
        obj = d.fake.lookup(b"erofs,img", b"img")
        assert obj.read(0, SIZE) == DATA
        obj.withdraw()
        wait_idle(d)
        with structlog.testing.capture_logs() as logs:
            call(d.sock, "cull_plan")
        assert not [e for e in logs if e["log_level"] != "debug" and e["event"] == "cull.decision"]
        with structlog.testing.capture_logs() as logs:
            done = call(d.sock, "cull")
        [e] = [e for e in logs if e["event"] == "cull.decision"]
        assert e["log_level"] == "info" and e["blob"] == BLOB and e["reason"]
        # smaller than the head a trim keeps (1 MiB): culled whole
        assert e["outcome"] == "culled" and done["culled"] == 1, (e, done)
        assert e["whole"] and e["ranges"] == [] and e["bytes"] > 0
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_trim_decision_names_its_byte_ranges() -> None:
    """A blob much larger than what the cap asks for is trimmed: its decision event
    names the byte ranges given back, and they are holes in the cache file now."""
    root = Path(tempfile.mkdtemp(prefix="ctl-trimev-"))
    d = Live(root, extra="cache_max_bytes 3M\n", cull=True)
    try:
        big = pattern_bytes(5, 0, 4 << 20)
        (d.blobs / "big").write_bytes(big)
        obj = d.fake.lookup(b"erofs,big", b"big")
        assert obj.read(0, len(big)) == big
        obj.withdraw()
        wait_idle(d)
        with structlog.testing.capture_logs() as logs:
            done = call(d.sock, "cull")
        [e] = [e for e in logs if e["event"] == "cull.decision"]
        assert e["log_level"] == "info" and e["blob"] == "erofs,big/big", e
        assert e["outcome"] == "trimmed" and done["trimmed"] == 1, (e, done)
        assert not e["whole"] and e["ranges"] and e["reason"]
        path = object_path(d.cache, b"erofs,big", b"big")
        with open(path, "rb") as f:
            for off, n in e["ranges"]:
                assert off % CHUNK == 0 and off >= 1 << 20, "the head is kept"
                try:  # a hole: the next data (if any) starts past the range
                    assert os.lseek(f.fileno(), off, os.SEEK_DATA) >= off + n
                except OSError as exc:
                    assert exc.errno == errno.ENXIO  # no data up to the end
                f.seek(off)
                assert f.read(n) == bytes(n), "a trimmed range still holds data"
        assert sum(n for _off, n in e["ranges"]) >= e["bytes"] > 0
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)
