"""Running one classic-mode daemon on a copy of the benchmark cache, and watching it.

What is measured, the same way for cachefilesd C and cachefilesd-py:

- **exec**: the moment just before ``fork``/``exec`` of the daemon, which starts as a
  systemd service would: working directory ``/`` and a soft open-files limit of 1024
  (cachefilesd C closes every fd below it at start-up; cachefilesd-py raises it to the
  hard limit);
- **bound**: when the daemon's stderr line saying it bound the cache arrives here (C
  prints ``Bound cache`` right after its ``bind`` write returns, cachefilesd-py logs
  ``bound``); both daemons run with ``-s`` so these lines come through a pipe, read by a
  thread that stamps each line as it arrives;
- **first cull** and **brun**: ``statvfs`` of the cache filesystem, polled every few
  milliseconds: the first time the free blocks grow, and the first time they reach the
  kernel's *brun* in blocks (the kernel turns the percentage into
  ``f_blocks / 100 * brun`` blocks at ``bind`` and compares ``f_bavail`` with it);
- **settled**: once free space has not changed for ``settle`` seconds after brun, the
  daemon is done; everything it freed beyond what brun needed is its overshoot;
- **peak RSS**: ``VmHWM`` of ``/proc/<pid>/status`` (the kernel's own high-water mark of
  the process's resident set, so no sampling can miss a peak), read before stopping it;
  and ``memory.peak`` of a cgroup (v2) made for the daemon, which also counts the kernel
  memory charged to it (dentries and inodes of the objects it looks up, inotify marks)
  and page cache it faulted in (its program files);
- **kernel culls**: the ``cull=`` counter of ``/proc/fs/fscache/stats`` before and after:
  every object the kernel removed on a ``cull`` command.

A run can be wrapped (``strace -f -c`` for syscall counts, ``py-spy record`` for a
profile of cachefilesd-py); the timings of a wrapped run are not comparable, its RSS is
not the daemon's alone, and the table says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
FSCACHE_STATS = Path("/proc/fs/fscache/stats")
C_DAEMON = "/sbin/cachefilesd"


@dataclass(frozen=True)
class Limits:
    brun: int = 60
    bcull: int = 45
    bstop: int = 10

    def config(self, cache_dir: Path, tag: str) -> str:
        return (
            f"dir {cache_dir}\ntag {tag}\n"
            f"brun {self.brun}%\nbcull {self.bcull}%\nbstop {self.bstop}%\n"
        )


@dataclass
class RunResult:
    daemon: str
    wrapped: str = ""
    exec_t: float = 0.0
    bound_t: float | None = None
    first_cull_t: float | None = None
    brun_t: float | None = None
    settled_t: float | None = None
    block_size: int = 4096
    f_blocks: int = 0
    brun_blocks: int = 0
    free_start: int = 0
    free_end: int = 0
    objects_start: int = 0
    objects_end: int = 0
    kernel_culls: int = 0
    vmhwm_kib: int | None = None
    cgroup_peak: int | None = None
    exit_code: int | None = None
    timed_out: bool = False
    log: list[tuple[float, str]] = field(default_factory=list)
    #: (seconds since exec, free blocks) whenever free space changed
    timeline: list[tuple[float, int]] = field(default_factory=list)

    def since_exec(self, t: float | None) -> float | None:
        return None if t is None else t - self.exec_t

    def since_bound(self, t: float | None) -> float | None:
        return None if t is None or self.bound_t is None else t - self.bound_t

    @property
    def culled(self) -> int:
        return self.objects_start - self.objects_end

    @property
    def needed_bytes(self) -> int:
        return max(0, self.brun_blocks - self.free_start) * self.block_size

    @property
    def freed_bytes(self) -> int:
        return (self.free_end - self.free_start) * self.block_size

    @property
    def overshoot_bytes(self) -> int:
        return self.freed_bytes - self.needed_bytes

    @property
    def culls_per_second(self) -> float | None:
        """Objects culled per second of the cull phase (first cull to brun)."""
        if self.first_cull_t is None or self.brun_t is None or self.brun_t <= self.first_cull_t:
            return None
        return self.culled / (self.brun_t - self.first_cull_t)


def count_objects(cache_root: Path) -> int:
    n = 0
    for vol in os.scandir(cache_root / "cache"):
        if not vol.is_dir(follow_symlinks=False):
            continue
        for fan in os.scandir(vol.path):
            if fan.is_dir(follow_symlinks=False):
                n += sum(1 for e in os.scandir(fan.path) if e.is_file(follow_symlinks=False))
    return n


def fscache_culls() -> int:
    """The kernel's count of objects removed by ``cull`` (``NoSpace: ... cull=N``)."""
    m = re.search(r"\bcull=(\d+)", FSCACHE_STATS.read_text())
    return int(m.group(1)) if m else -1


def vmhwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Cgroup:
    """A fresh cgroup v2 leaf with the memory controller, for one daemon."""

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        try:
            ctl = CGROUP_ROOT / "cgroup.subtree_control"
            if "memory" not in ctl.read_text().split():
                ctl.write_text("+memory")
            path = CGROUP_ROOT / name
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            self.path = path
        except OSError:
            self.path = None

    def join(self) -> None:
        """Called in the child between fork and exec."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text("0")

    def peak(self) -> int | None:
        if self.path is None:
            return None
        try:
            return int((self.path / "memory.peak").read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


#: the soft open-files limit a systemd service starts with (the guest's shell has
#: 65536, and cachefilesd C closes every fd number below the soft limit at start-up)
SERVICE_NOFILE = 1024


def service_limits() -> None:
    """Called in the child between fork and exec: the soft RLIMIT_NOFILE of a service."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(SERVICE_NOFILE, hard), hard))


def in_child(cgroup: Cgroup) -> None:
    """Between fork and exec: join the daemon's cgroup, take a service's fd limit."""
    cgroup.join()
    service_limits()


#: environment variable naming (JSON list) how to start cachefilesd-py instead of the
#: venv's console script (``bench_classic --program-files local``)
PY_PROG_ENV = "CFPY_BENCH_PY_PROG"


def daemon_argv(daemon: str, conf: Path, env: dict[str, str] | None = None) -> list[str]:
    if daemon == "c":
        if not os.path.exists(C_DAEMON):
            raise SystemExit(f"{C_DAEMON} missing: scripts/setup installs Debian's cachefilesd")
        return [C_DAEMON, "-n", "-s", "-f", str(conf)]
    exe = Path(sys.executable).parent / "cachefilesd-py"
    prog = [str(exe)] if exe.exists() else [sys.executable, "-m", "cachefilesd_py.daemon.cli"]
    if env and PY_PROG_ENV in env:
        prog = json.loads(env[PY_PROG_ENV])
    return [*prog, "-n", "-s", "--log-format", "json", "-f", str(conf)]


def daemon_pid(proc: subprocess.Popen[bytes], wrapped: bool) -> int:
    """The daemon's main pid: ``proc`` itself, or the process a wrapper (strace,
    py-spy) started, its direct child. Not "the last descendant": cachefilesd-py's main
    process is a supervisor with worker processes (docs/failover.md), and a SIGTERM
    sent to its spare worker only makes it fork another — the daemon then ran on until
    killed, exit -9, which failed the guest smoke test whenever the spare was listed
    last."""
    if not wrapped:
        return proc.pid
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.Error:
        return proc.pid
    return min(children, key=lambda c: c.pid).pid if children else proc.pid


def peak_rss_kib(pid: int) -> int | None:
    """The largest VmHWM among ``pid`` and its descendants (cachefilesd-py's supervisor
    and its workers; the serving worker, a fork of the supervisor, counts the pages it
    shares with it too)."""
    pids = [pid]
    with contextlib.suppress(psutil.Error):
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    peaks = [p for p in map(vmhwm_kib, pids) if p is not None]
    return max(peaks) if peaks else None


BOUND_MARKS = {"c": "Bound cache", "py": '"event": "bound"'}


class Watcher:
    """Runs one daemon on a mounted cache copy and records a :class:`RunResult`."""

    def __init__(
        self,
        daemon: str,
        cache_root: Path,
        conf: Path,
        *,
        wrap: list[str] | None = None,
        wrapped: str = "",
        env: dict[str, str] | None = None,
        poll: float = 0.005,
        settle: float = 2.0,
        timeout: float = 600.0,
        log_path: Path | None = None,
    ) -> None:
        self.daemon = daemon
        self.root = cache_root
        self.argv = [*(wrap or []), *daemon_argv(daemon, conf, env)]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.poll = poll
        self.settle = settle
        self.timeout = timeout
        self.log_path = log_path
        self.result = RunResult(daemon, wrapped=wrapped)

    def _read_stderr(self, stream: object, lines: list[tuple[float, str]]) -> None:
        mark = BOUND_MARKS[self.daemon]
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            t = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append((t, line))
            if self.result.bound_t is None and mark in line:
                self.result.bound_t = t

    def run(self, limits: Limits) -> RunResult:
        r = self.result
        st = os.statvfs(self.root)
        r.block_size, r.f_blocks = st.f_frsize, st.f_blocks
        r.brun_blocks = (st.f_blocks // 100) * limits.brun
        r.free_start = st.f_bavail
        r.objects_start = count_objects(self.root)
        culls_before = fscache_culls()
        cgroup = Cgroup(f"cfbench-{self.daemon}-{os.getpid()}-{int(time.monotonic() * 1000)}")
        r.exec_t = time.monotonic()
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd="/",
            preexec_fn=lambda: in_child(cgroup),
        )
        reader = threading.Thread(target=self._read_stderr, args=(proc.stderr, r.log), daemon=True)
        reader.start()
        try:
            self._watch(proc, r)
            r.vmhwm_kib = peak_rss_kib(daemon_pid(proc, bool(r.wrapped)))
        finally:
            if proc.poll() is None:
                # a wrapper (strace, py-spy) writes its report when the daemon exits
                os.kill(daemon_pid(proc, bool(r.wrapped)), signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            r.exit_code = proc.returncode
            reader.join(10)
            r.cgroup_peak = None if r.wrapped else cgroup.peak()
            cgroup.remove()
        os.sync()
        r.free_end = os.statvfs(self.root).f_bavail
        r.objects_end = count_objects(self.root)
        r.kernel_culls = fscache_culls() - culls_before
        if self.log_path is not None:
            self.log_path.write_text("".join(f"{t - r.exec_t:10.4f} {line}\n" for t, line in r.log))
        return r

    def _watch(self, proc: subprocess.Popen[bytes], r: RunResult) -> None:
        last_free, last_change = r.free_start, time.monotonic()
        deadline = r.exec_t + self.timeout
        while True:
            now = time.monotonic()
            free = os.statvfs(self.root).f_bavail
            if free != last_free:
                r.timeline.append((now - r.exec_t, free))
                if r.first_cull_t is None and free > r.free_start:
                    r.first_cull_t = now
                last_free, last_change = free, now
            if r.brun_t is None and free >= r.brun_blocks:
                r.brun_t = now
            if r.brun_t is not None and now - last_change >= self.settle:
                r.settled_t = last_change
                return
            if proc.poll() is not None:
                return
            if now > deadline:
                r.timed_out = True
                return
            time.sleep(self.poll)
