"""``cachefilesctl`` against a real daemon in fanotify mode (7.3 kernel): a file-backed
EROFS mount of a sparse cache file, its pre-content events answered by the daemon.

The sub-commands run in this process through ``cachefilesctl``'s ``main`` (a fresh
interpreter in the TCG guest costs seconds; ``status`` also runs as a real process).
The answers must be real: the present share after reading files equals the bitmap the
daemon serves from, ``prefetch`` goes through the kernel's events (afterwards the whole
tree reads with nothing fetched), ``pin PATH`` of a file on the mount finds the image
by its mount point and preloads the image's metadata and that file through the events
(the file then reads with nothing fetched), and under a cache cap the cull plan takes
the idle cache file and never the mounted blob, which keeps serving the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.control.cli import main as ctl
from cachefilesd_py.control.client import call
from cachefilesd_py.testing.erofs_images import make_tree
from tests.integration.test_control_daemon import metrics_of
from tests.vm.rig import Daemon, mkfs_erofs, tree_digests

pytestmark = [pytest.mark.guest, pytest.mark.fanotify]

BLOB = "erofs,imgs/app.erofs"


@pytest.mark.timeout(600)
def test_cachefilesctl_against_a_fanotify_mount(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    capsys: pytest.CaptureFixture[str],
) -> None:
    t0 = time.monotonic()
    src = make_tree(workdir / "src", small_files=40)
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(2 << 20))
    root = workdir / "origin"
    (root / "imgs").mkdir(parents=True)
    image = mkfs_erofs(root / "imgs" / "app.erofs", src, "-E", "noinline_data")
    size = image.stat().st_size
    cache = loop_fs(128)
    # a cache file of an image no longer configured: idle, the culler may remove it
    idle = cache / "fanotify" / "imgs" / "old.erofs"
    idle.parent.mkdir(parents=True)
    idle.write_bytes(os.urandom(1 << 20))
    mnt = workdir / "mnt"
    sock = str(workdir / "control.sock")
    conf = (
        f"dir {cache}\nfanotify\nsource imgs/* file://{root}/{{volume}}/{{cookie}}\n"
        f"chunk_size 64K\nreadahead 0\nfetch_timeout 20\ncontrol_socket {sock}\n"
        f"fanotify_image imgs/app.erofs {mnt}\n"
    )
    print(f"tree and image made in {time.monotonic() - t0:.1f} s")
    d = daemon(conf)
    began = time.monotonic()
    d.start(timeout=300)
    assert d.wait_for("control.listening", 60)
    assert os.path.ismount(mnt)
    print(f"daemon ready after {time.monotonic() - began:.1f} s")

    def ctl_json(*argv: str) -> tuple[int, Any]:
        capsys.readouterr()
        rc = ctl([*argv, "--json", "--socket", sock])
        out, err = capsys.readouterr()
        return rc, (json.loads(out) if out.strip() else err)

    # one file read through the mount: part of the blob is present, the rest a hole
    assert (mnt / "f0.bin").read_bytes() == (src / "f0.bin").read_bytes()

    rc, st = ctl_json("status")
    assert rc == 0 and st["mode"] == "fanotify" and "fanotify" in st["kernel_interface"]
    assert st["objects"] == 1 and st["open_blobs"] == 1
    assert st["images"] == [
        {"image": "imgs/app.erofs", "mountpoint": str(mnt), "mounted": True, "blobs": [BLOB]}
    ]
    rc, listing = ctl_json("blobs")
    [b] = listing["blobs"]
    assert rc == 0 and b["blob"] == BLOB and b["size"] == size and b["in_use"] is True
    assert b["mountpoint"] == str(mnt) and b["present_pct"] < 60, b
    assert b["present_chunks"] * (64 << 10) >= 2 << 20, b  # f0.bin at least
    # the share is the daemon's bitmap: each present chunk is data in the cache file
    allocated = os.stat(cache / "fanotify" / "imgs" / "app.erofs").st_blocks * 512
    assert allocated >= b["present_chunks"] * (64 << 10) - (64 << 10), (allocated, b)
    rc, shown = ctl_json("show", BLOB, "--width", "32")
    assert rc == 0 and sum(p for p, _n in shown["cells"]) == b["present_chunks"]
    rc, stats = ctl_json("stats")
    counters = stats["counters"]
    assert rc == 0 and counters["fills"] > 0 and counters["fill_failed"] == 0, counters
    m = metrics_of(call(sock, "metrics")["text"])
    assert m["cachefilesd_fanotify_events_total"] >= counters["fills"]
    assert m["cachefilesd_fanotify_fill_seconds_count"] >= counters["fills"]
    assert m["cachefilesd_fetched_bytes_total"] == counters["bytes_fetched"] > 0
    rc, verified = ctl_json("verify", BLOB)
    assert rc == 0 and verified["reports"][0]["ok"], verified

    proc = subprocess.run(
        [sys.executable, "-m", "cachefilesd_py.control.cli", "status", "--socket", sock],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "mode          fanotify" in proc.stdout, proc.stderr
    assert f"image         imgs/app.erofs on {mnt} (mounted)" in proc.stdout

    print(f"read-only calls done after {time.monotonic() - began:.1f} s")
    # pin a path on the real file-backed mount: mountinfo names no blob (the cache file
    # is the source), the mount point in ``status`` does; metadata first, then f1.bin
    fetched = call(sock, "stats")["counters"]["bytes_fetched"]
    rc, pinned = ctl_json("pin", str(mnt / "f1.bin"))
    assert rc == 0 and pinned["blob"] == BLOB and pinned["path"] == "/f1.bin", pinned
    [pb] = pinned["blobs"]
    assert pb["preloaded"] and pb["via"] == "mount's reader", pinned
    assert 2 << 20 <= pinned["bytes"] < size, pinned
    after_pin = call(sock, "stats")["counters"]["bytes_fetched"]
    assert after_pin > fetched
    assert (mnt / "f1.bin").read_bytes() == (src / "f1.bin").read_bytes()
    assert call(sock, "stats")["counters"]["bytes_fetched"] == after_pin, "f1.bin not preloaded"
    rc, pins = ctl_json("pins")
    [p] = pins["pins"]
    assert rc == 0 and p["blob"] == BLOB and p["source"] == "cli" and p["size"] == size, pins
    assert b["present_pct"] < p["present_pct"] < 100.0, (b, p)
    assert (cache / "cachefilesd-py" / "pins.json").exists()
    rc, unpinned = ctl_json("unpin", BLOB)
    assert rc == 0 and unpinned["unpinned"] is True, unpinned
    assert call(sock, "pins")["pins"] == []
    print(f"pin of a path done after {time.monotonic() - began:.1f} s")
    # prefetch the rest through the kernel's events; then the tree reads fetching nothing
    rc, pre = ctl_json("prefetch", BLOB)
    assert rc == 0 and pre["present_pct"] == 100.0, pre
    fetched = call(sock, "stats")["counters"]["bytes_fetched"]
    assert fetched == size, "a chunk was fetched twice, or not at all"
    assert tree_digests(mnt) == tree_digests(src)
    assert call(sock, "stats")["counters"]["bytes_fetched"] == fetched

    print(f"prefetch done after {time.monotonic() - began:.1f} s")
    # a cap the cache is over, applied by reload: the plan takes the idle file and
    # never the mounted blob, which is in use: never culled nor trimmed
    Path(d.config).write_text(conf + "cache_max_bytes 1M\n")
    rc, report = ctl_json("reload")
    assert rc == 0 and "cache_max_bytes" in report["applied"], report
    rc, plan = ctl_json("cull", "--dry-run")
    assert rc == 0, plan
    outcomes = {x["blob"]: x["outcome"] for x in plan["decisions"]}
    assert outcomes[BLOB] == "in_use", plan
    # the idle file: in this plan, unless the space thread culled it already
    assert outcomes.get("erofs,imgs/old.erofs", "culled") == "culled" or not idle.exists(), plan
    deadline = time.monotonic() + 60
    while idle.exists() and time.monotonic() < deadline:  # the space thread acts too
        time.sleep(0.5)
    assert not idle.exists(), "the idle cache file was never culled"
    rc, listing = ctl_json("blobs")
    [b] = listing["blobs"]
    assert b["blob"] == BLOB and b["in_use"] is True
    assert tree_digests(mnt) == tree_digests(src)
    assert d.stop() == 0
    assert not os.path.ismount(mnt)
    assert not os.path.exists(sock), "the control socket outlived the daemon"
    print(f"daemon stopped after {time.monotonic() - began:.1f} s")
