"""The control socket in fanotify mode: ``cachefilesctl`` against the fanotify frontend's
live stack (real engine, ``file://`` source, presence store, cache files), its group a
stand-in as in ``test_fanotify_driver.py`` (a SOCK_SEQPACKET pair: the test plays the
kernel, writing pre-access events with real fds of the cache file and reading the
answers). The kernel's own part — a read of a marked file raising the events, a real
mount — runs in tests/vm/test_fanotify_control_guest.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.load import load_config
from cachefilesd_py.control.cli import main as ctl
from cachefilesd_py.control.client import call
from cachefilesd_py.control.schema import ControlError, ErrorCode
from cachefilesd_py.daemon.app import Daemon, engine_settings, source_settings
from cachefilesd_py.daemon.fanotify_control import fanotify_figures, serve_fanotify_control
from cachefilesd_py.daemon.fanotify_mode import build_engine
from cachefilesd_py.frontends.fanotify import images as img
from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.frontends.fanotify.driver import FanotifyDriver
from cachefilesd_py.frontends.fanotify.service import FanotifyFrontend
from cachefilesd_py.frontends.fanotify.space import make_culler
from cachefilesd_py.kernel.fanotify import FAN_PRE_ACCESS
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.integration.test_control_daemon import metrics_of

CHUNK = 64 * 1024
SIZE = 1_000_000 + 123
DATA = pattern_bytes(21, 0, SIZE)
BLOB = "erofs,imgs/app.erofs"


class FanLive:
    """The fanotify stack of ``daemon/fanotify_mode.py`` with its control socket, but
    over a stand-in group and an image the test "mounts" (no kernel mount)."""

    def __init__(
        self, root: Path, extra: str = "", cull: bool = False, data: bytes = DATA
    ) -> None:
        self.origin = root / "origin" / "imgs"
        self.origin.mkdir(parents=True, exist_ok=True)  # again: a restart
        (self.origin / "app.erofs").write_bytes(data)
        self.cache = root / "cache"
        self.cache.mkdir(exist_ok=True)
        self.sock = str(root / "ctl.sock")
        self.conf = root / "cachefilesd.conf"
        self.mnt = root / "mnt"
        self.conf.write_text(
            f"dir {self.cache}\nfanotify\nfanotify_image imgs/app.erofs {self.mnt}\n"
            f"source imgs/* file://{self.origin}/{{cookie}}\nchunk_size 64K\nreadahead 0\n"
            f"fetch_timeout 5\ncontrol_socket {self.sock}\n{extra}"
        )
        config = load_config(str(self.conf))
        self.daemon = Daemon(config, str(self.conf), nocull=not cull)
        self.engine, self.factory = build_engine(
            config,
            self.cache / "cachefilesd-py",
            engine_settings=engine_settings(config),
            source_settings=source_settings(config),
        )
        self.daemon._engine = self.engine
        self.daemon._factory = self.factory
        self.kernel_end, group_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        group_end.setblocking(False)
        self.kernel_lock = threading.Lock()
        fe = FanotifyFrontend(
            self.engine,
            self.cache,
            config.fanotify_images,
            workers=2,
            fetch_timeout=5,
        )
        # what FanotifyFrontend.start() does, over the stand-in group and without mount(2)
        fe.group = OwnedFd(group_end.detach())
        fe.driver = FanotifyDriver(fe.group, self.engine, workers=2, fetch_timeout=5)
        assert self.kernel_end.recv(64) == wire.deny_errno_probe(errno.EIO)
        [spec] = config.fanotify_images
        image = img.ServedImage(spec)
        self.served = img.prepare_blob(
            self.engine, self.cache, BlobKey.named("imgs", "app.erofs"), Deadline.after(10)
        )
        image.blobs.append(self.served)
        fe.driver.session.add_image(self.served.identity, self.served, len(data))
        image.mounted = True
        fe.images.append(image)
        if cull:
            fe.culler = make_culler(
                config, self.cache, self.engine.presence, self.engine.leases,
                fe.served,
            )
            self.daemon._culler = fe.culler
        fe.read_through = self.kernel_read
        self.engine.start()
        fe.driver.start()
        self.fe = fe
        self.driver = fe.driver
        self.control = serve_fanotify_control(
            self.daemon, fe, self.engine, self.factory, lambda: fanotify_figures(fe, self.engine)
        )

    # -- the stand-in kernel -------------------------------------------------------------

    def read(self, offset: int, count: int) -> int:
        """A reader's access: one pre-access event with a fresh fd of the cache file,
        waits for its answer; the answer's verdict."""
        with self.kernel_lock:
            fd = os.open(self.served.path, os.O_RDWR | os.O_CLOEXEC)
            self.kernel_end.send(
                wire.encode_event(FAN_PRE_ACCESS, fd, 4242, wire.FileRange(offset, count))
            )
            self.kernel_end.settimeout(20)
            got_fd, verdict, _err = wire.decode_response(self.kernel_end.recv(64))
            assert got_fd == fd
            return verdict

    def kernel_read(self, path: Path, offset: int, length: int) -> None:
        """What the kernel does for ``read_through``: an event per 256 KiB read."""
        assert path == self.served.path
        pos, end = offset, offset + length
        while pos < end:
            n = min(256 << 10, end - pos)
            if self.read(pos, n) != wire.FAN_ALLOW:
                raise OSError(errno.EIO, "denied")
            pos += n

    def ctl(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
        capsys.readouterr()
        rc = ctl([*argv, "--json", "--socket", self.sock])
        out, _err = capsys.readouterr()
        start = out.find("{\n")
        return rc, json.JSONDecoder().raw_decode(out[start:])[0] if start >= 0 else None

    def close(self) -> None:
        self.control.close()
        assert self.fe.driver is not None and self.fe.group is not None
        self.fe.driver.stop()
        self.engine.release(self.served.blob, committed=lambda: self.served.path)
        self.engine.leases.release_use(self.served.key)
        self.engine.close()
        self.fe.group.close()
        self.kernel_end.close()
        self.factory.close()


@pytest.fixture
def live() -> Iterator[FanLive]:
    root = Path(tempfile.mkdtemp(prefix="ctl-fan-"))
    d = FanLive(root)
    yield d
    d.close()
    shutil.rmtree(root, ignore_errors=True)


def test_status_blobs_show_stats_and_metrics(
    live: FanLive, capsys: pytest.CaptureFixture[str]
) -> None:
    assert live.read(0, 200_000) == wire.FAN_ALLOW
    for _ in range(3):  # present now: answered from the bitmap
        assert live.read(0, 4096) == wire.FAN_ALLOW
    want_chunks = -(-200_000 // CHUNK)

    rc, st = live.ctl(capsys, "status")
    assert rc == 0 and st["mode"] == "fanotify" and "fanotify" in st["kernel_interface"]
    assert st["objects"] == 1 and st["open_blobs"] == 1
    assert st["images"] == [
        {
            "image": "imgs/app.erofs",
            "mountpoint": str(live.mnt),
            "mounted": True,
            "blobs": [BLOB],
        }
    ]
    assert st["images_failed"] == []

    rc, listing = live.ctl(capsys, "blobs")
    [b] = listing["blobs"]
    assert rc == 0 and b["blob"] == BLOB and b["size"] == SIZE and b["chunk_size"] == CHUNK
    assert b["present_chunks"] == want_chunks and b["chunks"] == -(-SIZE // CHUNK)
    assert b["mountpoint"] == str(live.mnt) and b["in_use"] is True
    assert b["image"] == "imgs/app.erofs" and b["source"] == f"file://{live.origin}/app.erofs"

    rc, shown = live.ctl(capsys, "show", BLOB, "--width", "8")
    assert rc == 0 and sum(p for p, _n in shown["cells"]) == want_chunks

    rc, stats = live.ctl(capsys, "stats")
    counters = stats["counters"]
    assert rc == 0 and counters["bytes_fetched"] == want_chunks * CHUNK
    assert counters["events"] == 4 and counters["fills"] == 1
    assert counters["allowed_present"] == 3

    m = metrics_of(call(live.sock, "metrics")["text"])
    assert m["cachefilesd_fanotify_events_total"] == 4
    assert m["cachefilesd_fanotify_fills_total"] == 1
    assert m["cachefilesd_fanotify_allowed_present_total"] == 3
    assert m["cachefilesd_fanotify_present_seconds_count"] == 3
    assert m["cachefilesd_fanotify_fill_seconds_count"] == 1
    assert m["cachefilesd_fetch_seconds_count"] >= 1
    assert m["cachefilesd_fetched_bytes_total"] == want_chunks * CHUNK
    assert m[f"cachefilesd_source_fetched_bytes_total{{source=file://{live.origin}/{{cookie}}}}"]
    assert m["cachefilesd_open_blobs"] == 1 and m["cachefilesd_kernel_objects"] == 1


def test_prefetch_goes_through_the_events_and_fills_the_blob(live: FanLive) -> None:
    assert live.read(0, 4096) == wire.FAN_ALLOW
    seen: list[Any] = []
    reply = call(live.sock, "prefetch", blob=BLOB, on_progress=seen.append)
    assert reply["present_pct"] == 100.0 and reply["length"] == SIZE
    assert seen[-1] == {"done": SIZE, "total": SIZE}
    assert live.engine.filler.stats.bytes_fetched == SIZE, "a chunk fetched twice or never"
    assert live.served.path.read_bytes() == DATA
    counts = live.driver.session.counts()
    assert counts.fills >= 1 and counts.fill_failed == 0
    # a reader now finds everything present: no fill, no fetch
    fills = counts.fills
    assert live.read(0, SIZE) == wire.FAN_ALLOW
    assert live.driver.session.counts().fills == fills
    assert live.engine.filler.stats.bytes_fetched == SIZE


def test_prefetch_range_errors_and_a_failed_fill(live: FanLive) -> None:
    reply = call(live.sock, "prefetch", blob=BLOB, offset=3 * CHUNK, length=CHUNK + 1)
    assert reply["present_chunks"] == 2
    with pytest.raises(ControlError) as e:
        call(live.sock, "prefetch", blob="erofs,imgs/other")
    assert e.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(ControlError) as e:
        call(live.sock, "prefetch", blob=BLOB, offset=SIZE)
    assert e.value.code is ErrorCode.BAD_ARGS
    # the origin goes away: the fill fails, its event is denied, nothing marked present
    (live.origin / "app.erofs").unlink()
    with pytest.raises(ControlError) as e:
        call(live.sock, "prefetch", blob=BLOB, offset=8 * CHUNK, length=CHUNK)
    assert e.value.code is ErrorCode.FAILED and "prefetch stopped at" in e.value.message
    rc = call(live.sock, "blobs")["blobs"][0]
    assert rc["present_chunks"] == 2



def test_live_verify_reads_the_fanotify_cache_file(
    live: FanLive, capsys: pytest.CaptureFixture[str]
) -> None:
    assert live.read(0, 300_000) == wire.FAN_ALLOW
    rc, out = live.ctl(capsys, "verify")  # every blob: the served one
    [report] = out["reports"]
    assert rc == 0 and report["ok"] and report["present"] == -(-300_000 // CHUNK), report
    with open(live.served.path, "r+b") as f:  # a wrong byte in a present chunk
        f.seek(CHUNK + 10)
        f.write(b"\xff" if DATA[CHUNK + 10] != 0xFF else b"\x00")
    rc, out = live.ctl(capsys, "verify", BLOB)
    assert rc == 1 and out["reports"][0]["errors"] == ["chunk 1: bytes differ from the source"]


def test_reload_applies_the_live_settings_and_names_the_rest(
    live: FanLive, capsys: pytest.CaptureFixture[str]
) -> None:
    text = live.conf.read_text()
    live.conf.write_text(
        text.replace(f"{live.mnt}\n", f"{live.mnt}\nfanotify_image imgs/b.erofs {live.mnt}2\n")
        + "fetch_retries 5\npin imgs/*\n"
    )
    rc, report = live.ctl(capsys, "reload")
    assert rc == 0, report
    assert "fetch_retries" in report["applied"]
    assert "fanotify_images" in report["needs_restart"]
    assert "fetch_retries" not in report["needs_restart"]
    assert live.factory.settings.retries == 5
    live.conf.write_text(text + "chunk_size banana\n")
    with pytest.raises(ControlError) as e:
        call(live.sock, "reload")
    assert e.value.code is ErrorCode.FAILED and "cachefilesd.conf:" in e.value.message


def test_credentials_reload_is_available_in_fanotify_mode(
    live: FanLive, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same op as on-demand mode (``Daemon.reload_credentials``); here no
    ``source_headers`` rule: nothing to reload, and no refusal."""
    rc, report = live.ctl(capsys, "credentials", "reload")
    assert rc == 0 and report == {"rules": [], "cleared": []}, report


def test_cull_never_removes_the_mounted_blob(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="ctl-fan-cull-"))
    # an idle cache file of an image no longer configured, next to the mounted one
    idle = root / "cache" / "fanotify" / "imgs" / "old.erofs"
    idle.parent.mkdir(parents=True)
    idle.write_bytes(os.urandom(512 << 10))
    d = FanLive(root, extra="cache_max_bytes 200K\n", cull=True)
    try:
        assert d.read(0, SIZE) == wire.FAN_ALLOW
        blocks = d.served.path.stat().st_blocks
        rc, plan = d.ctl(capsys, "cull", "--dry-run")
        assert rc == 0 and plan["needed"] and plan["need_bytes"] > 0, plan
        outcomes = {x["blob"]: x["outcome"] for x in plan["decisions"]}
        assert outcomes.get("erofs,imgs/old.erofs") == "culled", plan
        # the mounted blob is in use: never culled nor trimmed
        assert outcomes.get(BLOB) == "in_use", plan
        assert idle.exists() and d.served.path.stat().st_blocks == blocks, "a dry run acted"
        rc, done = d.ctl(capsys, "cull", "--now")
        assert rc == 0 and done["culled"] == 1 and done["in_use"] == 1, done
        assert d.served.path.stat().st_blocks == blocks, "the mounted blob was punched"
        assert not idle.exists()
        assert d.served.path.exists() and os.path.getsize(d.served.path) == SIZE
        assert all(
            x["outcome"] != "culled" for x in done["decisions"] if x["blob"] == BLOB
        ), done
        # and still served from its bitmap
        assert d.read(0, SIZE) == wire.FAN_ALLOW
        assert d.served.path.read_bytes() == DATA
        m = metrics_of(call(d.sock, "metrics")["text"])
        assert m["cachefilesd_culled_blobs_total"] == 1
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)
