"""The process model on the real kernel, without systemd (supervisor mode): the daemon
started by hand, as an init script would.

- the serving worker SIGKILLed again and again while readers stream two EROFS mounts
  from a slow origin: every read completes with the right bytes, none fails; the
  anonymous fds live only in the serving worker, close-on-exec; no process keeps a
  capability;
- without ``-n``: a bind that fails is the exit status; a bind that works returns 0
  once the background supervisor wrote the pidfile, removed at a clean stop;
- classic mode: a worker's death leaves the cache bound, and a restart (which re-binds)
  finds every cache file where it was.

Under systemd (fd store, supervisor death, ``systemctl restart``, watchdog, start
limit) see ``test_failover_systemd_guest.py``.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm import failover_rig as fr
from tests.vm.rig import Daemon, Nginx, mkfs_erofs, mount_tracked, run, sha256_file

pytestmark = pytest.mark.guest

KILLS = 6


@pytest.fixture
def slow_lo() -> Iterator[None]:
    """20 ms each way on loopback: every 64 KiB fetch takes a few round trips, so
    READs are in flight whenever a worker is killed."""
    run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "20ms")
    yield
    run("tc", "qdisc", "del", "dev", "lo", "root", check=False)


def two_images(workdir: Path, files: int, size: int) -> tuple[Path, dict[str, dict[str, str]]]:
    blobs = workdir / "blobs"
    blobs.mkdir()
    digests = {}
    for name, seed in (("one.erofs", 1), ("two.erofs", 2)):
        src = workdir / f"src-{name}"
        digests[name] = fr.make_blob_tree(src, files=files, size=size, seed=seed)
        mkfs_erofs(blobs / name, src)
    return blobs, digests


def ondemand_config(cache: Path, url: str) -> str:
    return (
        f"dir {cache}\ntag failover\nondemand\nsource * {url}/{{cookie}}\n"
        "chunk_size 64K\nreadahead 0\nfetch_timeout 20\nfetch_concurrency 8\n"
    )


@pytest.mark.timeout(1200)
def test_worker_killed_under_reads_loses_no_read(
    workdir: Path,
    loop_fs: Callable[..., Path],
    nginx: Callable[[Path], Nginx],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
    slow_lo: None,
) -> None:
    blobs, digests = two_images(workdir, files=8, size=4 << 20)
    web = nginx(blobs)
    d = daemon(ondemand_config(loop_fs(256), web.url))
    d.start(timeout=300)  # a fresh interpreter: slow in a loaded guest
    assert d.proc is not None
    supervisor = d.proc.pid
    files = {}
    for name, tree in digests.items():
        mnt = workdir / f"mnt-{name}"
        mount_tracked(mnt, name, mounts)
        files |= {mnt / rel: digest for rel, digest in tree.items()}
    readers = fr.Readers(files, threads=4).start()
    takeovers: list[float] = []
    rng = random.Random(9)
    try:
        time.sleep(2)
        check_process_model(supervisor)
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 2.0))
            _victim, took = fr.kill_serving_worker(d.log_path, supervisor)
            takeovers.append(took)
        kills_done = time.time()
        deadline = time.monotonic() + 600
        while len(readers.first_pass_done) < readers.threads and time.monotonic() < deadline:
            assert not readers.failures(), readers.failures()[:3]
            time.sleep(0.5)
        check_process_model(supervisor)
    finally:
        results = readers.stop()
    print(f"\nkill -> next worker serving ({KILLS} kills): {fr.summary(takeovers)}")
    after = [round(t - kills_done, 1) for t in readers.first_pass_done]
    print(f"reads: {len(results)}; first passes done {after} s after the last kill")
    assert not [r for r in results if not r.ok], [r for r in results if not r.ok][:5]
    assert len(readers.first_pass_done) == readers.threads
    # every kill landed while the readers were still fetching cold data
    assert min(readers.first_pass_done) > kills_done
    events = d.read_events()
    assert sum(e.get("event") == "worker.died" for e in events) == KILLS
    assert sum(e.get("event") == "restored" for e in events) == KILLS
    assert not [e for e in events if e.get("event") in ("read.failed", "supervisor.giving_up")]
    takeovers_logged = [e for e in events if e.get("event") == "worker.serving"][1:]
    assert len(takeovers_logged) == KILLS and all("takeover_s" in e for e in takeovers_logged)
    reopened = [sum(1 for e in events if e.get("event") == "open" and e.get("pid") == t["worker"])
                for t in takeovers_logged]
    print(f"objects re-opened by each new worker: {reopened}")
    for mnt in list(mounts):
        run("umount", str(mnt))
        mounts.remove(mnt)
    assert d.stop() == 0


def check_process_model(supervisor: int) -> None:
    serving = fr.worker(supervisor, "serving")
    spare = fr.worker(supervisor, "spare")
    holders = fr.anon_fds()
    assert set(holders) <= {serving}, f"anonymous fds outside the serving worker: {holders}"
    assert all(cloexec for _fd, cloexec in holders.get(serving, [])), holders
    for pid in (supervisor, serving, spare):
        caps = fr.capabilities(pid)
        assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0, (pid, caps)


def daemon_cmd(conf: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cachefilesd_py.daemon.cli", "-s", "--log-format", "json",
            "-f", str(conf), *extra]


def test_without_n_a_failed_bind_is_the_exit_status(
    workdir: Path, loop_fs: Callable[..., Path]
) -> None:
    cache = loop_fs(64)
    run("mount", "-o", "remount,ro", str(cache))  # the kernel refuses: EROFS
    conf = workdir / "ro.conf"
    conf.write_text(f"dir {cache}\nondemand\nsource * file:///nowhere/{{cookie}}\n")
    pidfile = workdir / "ro.pid"
    res = subprocess.run(daemon_cmd(conf, "-p", str(pidfile)), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1, res
    assert "bind failed" in res.stderr and "Read-only file system" in res.stderr, res.stderr
    assert not pidfile.exists()
    assert not run("pgrep", "-f", str(conf), check=False).stdout.strip()


def test_without_n_it_forks_after_binding_and_writes_the_pidfile(
    workdir: Path, loop_fs: Callable[..., Path]
) -> None:
    cache = loop_fs(64)
    src = workdir / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    mkfs_erofs(workdir / "img.erofs", src)
    conf = workdir / "bg.conf"
    conf.write_text(f"dir {cache}\nondemand\nsource * file://{workdir}/{{cookie}}\n")
    pidfile = workdir / "bg.pid"
    log = workdir / "bg.log"
    with open(log, "wb") as out:
        res = subprocess.run(daemon_cmd(conf, "-p", str(pidfile)), stdout=out, stderr=out,
                             timeout=300)
    assert res.returncode == 0
    pid = int(pidfile.read_text())
    assert fr.comm(pid) == "cachefilesd-py"
    fr.worker(pid, "serving")
    mnt = workdir / "mnt"
    mounts: list[Path] = []
    try:
        mount_tracked(mnt, "img.erofs", mounts)
        assert (mnt / "a.txt").read_text() == "hello\n"
    finally:
        for m in mounts:
            run("umount", str(m))
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not exited(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert exited(pid)
    assert not pidfile.exists(), "the pidfile outlived a clean stop"


def exited(pid: int) -> bool:
    """Whether ``pid`` has exited. The daemon went to the background, so its parent is
    the guest's PID 1, which need not reap it: a zombie (state Z) has exited too."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def cache_objects(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_ino
            for p in (cache / "cache").rglob("*") if p.is_file()}


def test_classic_worker_death_keeps_the_cache_and_a_restart_loses_nothing(
    workdir: Path, loop_fs: Callable[..., Path], daemon: Callable[[str], Daemon]
) -> None:
    share, tag = Path(os.environ["CACHEFILESD_9P_DIR"]), os.environ["CACHEFILESD_9P_TAG"]
    if not os.path.ismount(share):
        run("mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L", tag, str(share))
    digests = {}
    for i in range(6):
        data = os.urandom(1 << 20)
        (share / f"classic{i}.bin").write_bytes(data)
        digests[f"classic{i}.bin"] = hashlib.sha256(data).hexdigest()
    run("umount", str(share))
    cache = loop_fs(64)
    conf = f"dir {cache}\ntag classicfo\n"
    d = daemon(conf)
    d.start(timeout=300)  # a fresh interpreter: slow in a loaded guest
    assert d.proc is not None
    mnt = workdir / "p9"
    mnt.mkdir()
    run("mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,cache=fscache", tag, str(mnt))
    try:
        for name, digest in digests.items():
            assert sha256_file(mnt / name) == digest
        run("sync")
        run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")  # evict: commit the objects
        deadline = time.monotonic() + 60
        while len(cache_objects(cache)) < len(digests) and time.monotonic() < deadline:
            time.sleep(0.5)
        before = cache_objects(cache)
        assert len(before) >= len(digests), before
        _victim, took = fr.kill_serving_worker(d.log_path, d.proc.pid)
        print(f"\nclassic: kill -> next worker serving {took:.3f} s")
        assert "classicfo" in Path("/proc/fs/fscache/caches").read_text()
        assert "unregistering" not in run("dmesg").stdout.split("classicfo registered")[-1]
        assert not [e for e in d.read_events() if e.get("event") == "restored"]  # classic
        assert d.stop() == 0  # closes the device: the cache is withdrawn
        d.start(timeout=300)  # binds again (a fresh interpreter: slow in a loaded guest)
        run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        for name, digest in digests.items():
            assert sha256_file(mnt / name) == digest
        after = cache_objects(cache)
        assert {k: v for k, v in after.items() if k in before} == before, (
            "cache files were replaced or lost across the restart"
        )
    finally:
        run("umount", str(mnt), check=False)
