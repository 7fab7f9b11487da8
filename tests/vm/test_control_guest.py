"""The control socket of a real daemon serving a real EROFS mount (6.12 kernel).

Every ``cachefilesctl`` sub-command is driven against the running daemon (in this
process, through ``cachefilesctl``'s ``main``; a fresh interpreter in the TCG guest
costs many seconds, so only ``status`` runs as a real ``cachefilesctl`` process).
Unprivileged callers are forked children that drop to ``nobody``: the kernel's
SO_PEERCRED tells them apart. The metrics are scraped over the loopback port and
parsed with prometheus_client's parser; the counters must match what the test did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachefilesd_py.control.cli import main as ctl
from cachefilesd_py.control.client import call
from cachefilesd_py.control.schema import ControlError
from tests.vm.rig import Daemon, free_port, mkfs_erofs, mount_tracked, tree_digests, umount_tracked

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

NOBODY = 65534
GROUP = 4242
BLOB = "erofs,img.erofs/img.erofs"


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def as_user(groups: list[int], op: str, sock: str, **args: Any) -> str:
    """``op`` called by a forked child running as nobody with ``groups``: "ok" or the
    error code."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = "crash"
        try:
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                call(sock, op, timeout=120, **args)
                code = "ok"
            except ControlError as err:
                code = err.code.value
        finally:
            os.write(w, code.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        code = f.read().decode()
    os.waitpid(pid, 0)
    return code


def test_every_subcommand_against_a_live_mount(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = workdir / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(os.urandom(3 << 20))
    blobs = workdir / "blobs"
    blobs.mkdir()
    image = mkfs_erofs(blobs / "img.erofs", src, "-Enoinline_data")
    size = image.stat().st_size
    cache = loop_fs(128)
    # the socket's directory must be reachable by nobody (workdir is root-only)
    rundir = Path("/tmp/vm/ctl-run")
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    rundir.chmod(0o755)
    Path("/tmp/vm").chmod(0o755)
    sock = str(rundir / "control.sock")
    port = free_port()
    conf_text = (
        f"dir {cache}\ntag ctl\nondemand\nsource * file://{blobs}/{{cookie}}\n"
        f"chunk_size 256K\nreadahead 0\ncontrol_socket {sock}\ncontrol_group {GROUP}\n"
        f"metrics_listen 127.0.0.1:{port}\n"
    )
    d = daemon(conf_text)
    d.start(timeout=300)
    assert d.wait_for("control.listening", 60)

    def ctl_json(*argv: str) -> tuple[int, Any]:
        capsys.readouterr()
        rc = ctl([*argv, "--json", "--socket", sock])
        out, err = capsys.readouterr()
        return rc, (json.loads(out) if out.strip() else err)

    mnt = workdir / "mnt"
    mount_tracked(mnt, "img.erofs", mounts)
    assert (mnt / "f0.bin").read_bytes() == (src / "f0.bin").read_bytes()

    # read-only calls, by root
    rc, st = ctl_json("status")
    assert rc == 0 and st["mode"] == "ondemand" and st["objects"] >= 1 and st["open_blobs"] == 1
    rc, listing = ctl_json("blobs")
    [b] = listing["blobs"]
    assert b["blob"] == BLOB and b["size"] == size and 0 < b["present_pct"] < 100
    # last use: the kernel's OPEN and READs of it, moments ago, by the daemon's clock
    assert b["last_use"] is not None and 0 <= b["last_use_age_s"] < 600, b
    rc, shown = ctl_json("show", BLOB, "--width", "32")
    assert rc == 0 and sum(p for p, _n in shown["cells"]) == b["present_chunks"]
    picture = Path(os.environ.get("CACHEFILESD_VM_RESULTS", str(workdir))) / "presence-map.png"
    assert ctl(["show", BLOB, "--socket", sock, "--png", str(picture)]) == 0
    assert "all chunks present" in capsys.readouterr().out
    assert picture.read_bytes().startswith(b"\x89PNG")
    rc, stats = ctl_json("stats")
    assert rc == 0 and stats["counters"]["reads"] > 0
    rc, text = ctl_json("metrics")
    assert rc == 0 and "cachefilesd_reads_total" in text["text"]

    # a real cachefilesctl process, as an operator runs it
    proc = subprocess.run(
        [sys.executable, "-m", "cachefilesd_py.control.cli", "status", "--socket", sock],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "mode          ondemand" in proc.stdout, proc.stderr

    # unprivileged callers: the group may read, nobody else; only root may change
    assert as_user([GROUP], "status", sock) == "ok"
    assert as_user([GROUP], "blobs", sock) == "ok"
    assert as_user([GROUP], "show", sock, blob=BLOB) == "ok"
    assert as_user([GROUP], "cull_plan", sock) == "ok"
    assert as_user([GROUP], "reload", sock) == "forbidden"
    assert as_user([GROUP], "prefetch", sock, blob=BLOB) == "forbidden"
    assert as_user([GROUP], "cull", sock) == "forbidden"
    assert as_user([], "status", sock) == "forbidden"
    assert as_user([], "metrics", sock) == "forbidden"

    # prefetch the rest: afterwards reading the whole tree fetches nothing more
    rc, pre = ctl_json("prefetch", BLOB)
    assert rc == 0 and pre["present_pct"] == 100.0, pre
    before = scrape(f"http://127.0.0.1:{port}/metrics")
    assert tree_digests(mnt) == tree_digests(src)
    after = scrape(f"http://127.0.0.1:{port}/metrics")
    assert after["cachefilesd_fetched_bytes_total"] == before["cachefilesd_fetched_bytes_total"]
    # every byte present: the kernel read the whole tree from the cache, no READ came
    assert after["cachefilesd_reads_total"] == before["cachefilesd_reads_total"] > 0
    # every byte of the blob was fetched exactly once, from its one source rule
    label = f"file://{blobs}/{{cookie}}"
    assert after["cachefilesd_fetched_bytes_total"] == size
    assert after[f"cachefilesd_source_fetched_bytes_total{{source={label}}}"] == size
    # nothing failed, nothing was retried
    assert after["cachefilesd_reads_failed_total"] == 0
    assert not [
        k
        for k in after
        if k.startswith(("cachefilesd_fetch_errors_total{", "cachefilesd_open_errors_total{"))
    ]
    assert not [k for k in after if k.startswith("cachefilesd_source_retries_total{")]
    assert after["cachefilesd_reads_total"] == after["cachefilesd_read_service_seconds_count"]
    assert after["cachefilesd_control_requests_total{outcome=forbidden}"] == 5

    # cull: what would go (nothing is over a limit; the mounted blob is in use)
    rc, plan = ctl_json("cull", "--dry-run")
    assert rc == 0, plan
    rc, done = ctl_json("cull", "--now")
    assert rc == 0, done

    # reload: a pin and a chunk size change; a bad file is refused
    conf = d.config
    conf.write_text(conf_text + "pin img.erofs/*\n")
    rc, report = ctl_json("reload")
    assert rc == 0 and report["changed"] == ["pins"], report
    conf.write_text(conf_text + "bogus_directive\n")
    rc, err = ctl_json("reload")
    assert rc == 1 and f"{conf}:10" in err and "unknown directive" in err

    # verify: the new cache file is linked into the tree when the kernel drops it
    umount_tracked(mnt, mounts)
    for _ in range(60):  # the daemon handles the CLOSE after umount returned
        rc, out = ctl_json("verify", BLOB)
        if rc == 0 or "not linked" not in str(out):
            break
        time.sleep(1)
    assert rc == 0, out
    [rep] = out["reports"]
    assert rep["ok"] and rep["trusted"] and rep["present"] == rep["chunks"]
    # the release bound the sidecar: a checkpoint that saved it, none failed
    m = scrape(f"http://127.0.0.1:{port}/metrics")
    assert m["cachefilesd_sidecar_checkpoints_total"] >= 1
    assert m["cachefilesd_sidecars_saved_total"] >= 1
    assert m["cachefilesd_sidecar_checkpoint_failures_total"] == 0
    assert m["cachefilesd_checkpoint_seconds_count"] == m["cachefilesd_sidecar_checkpoints_total"]

    assert d.stop() == 0
    assert not os.path.exists(sock), "the socket outlived its daemon"
