"""Kill → first READ served again, for a worker death and a supervisor death.

Run from the host (boots the test kernel with systemd 252 as PID 1, the packaged unit):

    .venv/bin/python scripts/vmtest --systemd --memory 2G --timeout 1800 -- \\
        python -m bench.bench_failover [--worker-kills 10] [--supervisor-kills 3]

Set-up as in ``tests/vm/test_failover_systemd_guest.py``: ``/etc/cachefilesd.conf``,
the generator, ``systemctl start cachefilesd-py``, one EROFS image of 1 MiB files served
by nginx on loopback (chunk_size 64K, no read-ahead, no netem). Each trial waits until
the spare is prepared, then SIGKILLs the serving worker (or the unit's main process)
and at once starts a *probe*: a 4 KiB read of a file nobody has read yet, so it needs a
READ the daemon must serve. Reported per trial:

- **kill → READ served**: from the kill to the probe's read returning, as a reader
  waits;
- **kill → serving**: from the kill to the supervisor logging the next worker as
  serving (for a supervisor death: the restarted supervisor's first worker);
- **no kill**: the same probe against a healthy daemon: what a READ costs by itself.

The table gives min / median / max of each. Target (issue 9): worker death ≤ 1 s.

A supervisor death costs a fresh interpreter. ``--import-trials N`` times what most of
that is, a fresh ``python`` importing what an on-demand supervisor imports before it
forks, alternately with structlog imported plainly (with ``rich``, which this
checkout's environment has, and ``asyncio``) and as ``cachefilesd-py`` imports it
(``daemon/lean_imports.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.vm import failover_rig as fr
from tests.vm.rig import mkfs_erofs, run, start_nginx

UNIT = "cachefilesd-py.service"
CACHE = Path("/mnt/bench-cache")


def systemctl(*args: str) -> str:
    return run("systemctl", "--no-pager", *args, timeout=600).stdout


def main_pid() -> int:
    return int(systemctl("show", UNIT, "-pMainPID").split("=", 1)[1])


def probe_after(kill: Callable[[], object], path: Path) -> tuple[float, float]:
    """(seconds from the kill to the probe's 4 KiB read returning, kill time)."""
    done: list[float] = []

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            assert len(f.read(4096)) == 4096
        done.append(time.time())

    killed_at = time.time()
    kill()
    t = threading.Thread(target=read)
    t.start()
    t.join(600)
    assert done, f"probe {path} did not complete"
    return done[0] - killed_at, killed_at


def wait_spare_prepared(supervisor: int, log: Path, timeout: float = 300) -> None:
    spare = fr.worker(supervisor, "spare", timeout)
    fr.wait_for_event(log, "worker.prepared", 0, lambda e: e.get("worker") == spare, timeout)


#: what the supervisor of an on-demand cache imports before it forks a worker
#: (``daemon/start.py``, then ``daemon/app.py`` ``import_mode``)
_DAEMON = (
    "import cachefilesd_py.daemon.start; "
    "from cachefilesd_py.config.model import Config; "
    "from cachefilesd_py.daemon.app import import_mode; import_mode(Config(ondemand=True))"
)
#: a fresh interpreter importing it, structlog as such or as the daemon imports it
IMPORTS = {
    "structlog plain": f"import structlog; {_DAEMON}",
    "structlog lean": (
        "from cachefilesd_py.daemon.lean_imports import import_structlog; "
        f"import_structlog(); {_DAEMON}"
    ),
}


def time_imports(trials: int) -> dict[str, list[float]]:
    """Seconds a fresh ``python -c`` takes to import the daemon, each way, alternately."""
    out: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(trials):
        for name, code in IMPORTS.items():
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", code], check=True)
            out[name].append(time.monotonic() - started)
    return out


def row(label: str, values: list[float]) -> str:
    if not values:
        return f"| {label:<44} |   – |      – |      – |      – |"
    return (
        f"| {label:<44} | {len(values):>3} | {min(values):6.3f} | "
        f"{statistics.median(values):6.3f} | {max(values):6.3f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker-kills", type=int, default=10)
    ap.add_argument("--supervisor-kills", type=int, default=3)
    ap.add_argument("--import-trials", type=int, default=3)
    args = ap.parse_args()
    log = Path(os.environ["CACHEFILESD_VM_RESULTS"]) / "cachefilesd-py.log"
    work = Path("/tmp/bench-failover")
    work.mkdir()
    fr.loop_cache(CACHE, 512 << 20)
    blobs = Path("/mnt/bench-blobs")
    blobs.mkdir()
    trials = args.worker_kills + args.supervisor_kills + args.worker_kills
    fr.make_blob_tree(work / "src", files=trials + 2, size=1 << 20, seed=7)
    mkfs_erofs(blobs / "bench.erofs", work / "src")
    web = start_nginx(blobs, work)
    Path("/etc/cachefilesd.conf").write_text(
        f"dir {CACHE}\ntag benchfo\nondemand\nsource * {web.url}/{{cookie}}\n"
        "chunk_size 64K\nreadahead 0\n"
    )
    systemctl("daemon-reload")
    systemctl("start", UNIT)
    mnt = Path("/mnt/bench")
    mnt.mkdir()
    run("mount", "-t", "erofs", "none", "-o", "fsid=bench.erofs", str(mnt), timeout=300)
    files = iter(sorted(p for p in mnt.iterdir() if p.is_file()))
    served: dict[str, list[float]] = {"worker": [], "supervisor": [], "none": []}
    serving: dict[str, list[float]] = {"worker": [], "supervisor": []}
    try:
        for _ in range(args.worker_kills):
            supervisor = main_pid()
            wait_spare_prepared(supervisor, log)
            time.sleep(0.5)
            victim = fr.worker(supervisor, "serving")
            seen = len(fr.log_events(log))
            took, killed_at = probe_after(lambda v=victim: os.kill(v, signal.SIGKILL),
                                          next(files))
            served["worker"].append(took)
            ev = fr.wait_for_event(log, "worker.serving", seen,
                                   lambda e, v=victim: e.get("worker") != v, 120)
            serving["worker"].append(fr.event_time(ev) - killed_at)
            print(f"worker kill at {killed_at:.3f}: READ served after {took:.3f} s, "
                  f"next worker serving after {serving['worker'][-1]:.3f} s", flush=True)
        for _ in range(args.worker_kills):
            time.sleep(0.5)
            took, _at = probe_after(lambda: None, next(files))
            served["none"].append(took)
        for _ in range(args.supervisor_kills):
            old = main_pid()
            wait_spare_prepared(old, log)
            seen = len(fr.log_events(log))
            took, killed_at = probe_after(lambda o=old: os.kill(o, signal.SIGKILL), next(files))
            served["supervisor"].append(took)
            ev = fr.wait_for_event(
                log, "worker.serving", seen,
                lambda e, o=old: e.get("proc") == "supervisor" and e.get("pid") != o, 300)
            serving["supervisor"].append(fr.event_time(ev) - killed_at)
            while main_pid() in (0, old):
                time.sleep(0.2)
    finally:
        run("umount", str(mnt), check=False)
        run("systemctl", "stop", UNIT, check=False)
        web.proc.terminate()
    print("\nkill -9 → first READ served again (guest, TCG; seconds)\n")
    print("| what                                         |   n |    min | median |    max |")
    print("|----------------------------------------------|-----|--------|--------|--------|")
    print(row("worker killed: kill → READ served", served["worker"]))
    print(row("worker killed: kill → next worker serving", serving["worker"]))
    print(row("supervisor killed: kill → READ served", served["supervisor"]))
    print(row("supervisor killed: kill → worker serving", serving["supervisor"]))
    print(row("no kill: the probe READ alone", served["none"]))
    if args.import_trials:
        for name, times in time_imports(args.import_trials).items():
            print(row(f"fresh python, import daemon: {name}", times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
