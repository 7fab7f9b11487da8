"""Helpers of the failover tests and ``bench/bench_failover.py`` (in the guest).

- the daemon's processes as the kernel sees them: the supervisor's children and their
  roles (``/proc/PID/comm``: ``cfd-serving``, ``cfd-spare``), who holds which anonymous
  fd (``anon_inode:[cachefiles]`` in ``/proc/PID/fd``) and whether it is close-on-exec,
  each process's capability sets;
- :class:`Readers`: threads streaming files through EROFS mounts in a loop, checking
  every read against its sha256 and recording every failure;
- :func:`kill_serving_worker`: SIGKILL of the serving worker, and the time until the
  supervisor logs the next worker as serving (``worker.serving``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tests.vm.rig import run

ANON_LINK = "anon_inode:[cachefiles]"
O_CLOEXEC = 0o2000000


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def worker(supervisor: int, role: str, timeout: float = 60.0) -> int:
    """The pid of the supervisor's child in ``role`` ("serving" or "spare")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in children(supervisor):
            if comm(pid) == f"cfd-{role}":
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no {role} worker under {supervisor}: {children(supervisor)}")


def anon_fds() -> dict[int, list[tuple[int, bool]]]:
    """Every process holding a cachefiles anonymous fd: pid → [(fd, close-on-exec)]."""
    out: dict[int, list[tuple[int, bool]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) != ANON_LINK:
                        continue
                    flags = next(
                        int(line.split()[1], 8)
                        for line in (entry / "fdinfo" / fd.name).read_text().splitlines()
                        if line.startswith("flags:")
                    )
                    out.setdefault(int(entry.name), []).append(
                        (int(fd.name), bool(flags & O_CLOEXEC))
                    )
    return out


def capabilities(pid: int) -> dict[str, int]:
    caps = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
            caps[key] = int(value.strip(), 16)
    return caps


def log_events(path: Path) -> list[dict[str, object]]:
    """The JSON lines of the daemon's log (none before the unit's first start)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if isinstance(ev, dict):
                out.append(ev)
    return out


def event_time(ev: dict[str, object]) -> float:
    """The epoch seconds of a JSON log line's ISO timestamp (UTC)."""
    stamp = str(ev["timestamp"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def wait_for_event(
    path: Path, name: str, after: int, match: Callable[[dict[str, object]], bool],
    timeout: float,
) -> dict[str, object]:
    """The first event ``name`` past the first ``after`` events of the log that
    ``match``es, waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = log_events(path)
        for ev in events[after:]:
            if ev.get("event") == name and match(ev):
                return ev
        time.sleep(0.05)
    raise AssertionError(f"no {name} event within {timeout} s")


def kill_serving_worker(log: Path, supervisor: int, timeout: float = 60.0) -> tuple[int, float]:
    """SIGKILL the serving worker; returns its pid and the seconds from the kill to the
    supervisor's ``worker.serving`` for its successor."""
    victim = worker(supervisor, "serving")
    seen = len(log_events(log))
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    ev = wait_for_event(log, "worker.serving", seen, lambda e: e.get("worker") != victim, timeout)
    return victim, event_time(ev) - killed_at


@dataclass
class ReadResult:
    path: str
    ok: bool
    error: str = ""
    seconds: float = 0.0


@dataclass
class Readers:
    """Threads reading ``files`` (path → sha256) round and round until stopped."""

    files: dict[Path, str]
    threads: int = 4
    results: list[ReadResult] = field(default_factory=list)
    #: when each reader finished its first full pass (cold data read once)
    first_pass_done: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Readers:
        paths = sorted(self.files)
        for i in range(self.threads):
            cut = i * len(paths) // self.threads
            order = paths[cut:] + paths[:cut]  # all files, each reader from elsewhere
            t = threading.Thread(target=self._loop, args=(order,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _loop(self, order: list[Path]) -> None:
        passes = 0
        while not self._stop.is_set():
            for path in order:
                if self._stop.is_set():
                    return
                self._read(path)
            passes += 1
            if passes == 1:
                with self._lock:
                    self.first_pass_done.append(time.time())

    def _read(self, path: Path) -> None:
        start = time.monotonic()
        h = hashlib.sha256()
        try:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            ok = h.hexdigest() == self.files[path]
            result = ReadResult(str(path), ok, "" if ok else "wrong sha256")
        except OSError as exc:
            result = ReadResult(str(path), False, f"{exc.__class__.__name__}: {exc}")
        result.seconds = time.monotonic() - start
        with self._lock:
            self.results.append(result)

    def stop(self, timeout: float = 300.0) -> list[ReadResult]:
        self._stop.set()
        for t in self._workers:
            t.join(timeout)
            assert not t.is_alive(), "a reader is stuck"
        return self.results

    def failures(self) -> list[ReadResult]:
        with self._lock:
            return [r for r in self.results if not r.ok]


def loop_cache(mountpoint: Path, size: int) -> None:
    """A fresh ext4 filesystem of ``size`` bytes, loop-mounted on ``mountpoint`` (its
    image file lies next to it, ``<mountpoint>.img``)."""
    image = mountpoint.with_name(mountpoint.name + ".img")
    with open(image, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", str(image))
    mountpoint.mkdir()
    run("mount", "-o", "loop", str(image), str(mountpoint))


def make_blob_tree(root: Path, *, files: int, size: int, seed: int) -> dict[str, str]:
    """``files`` files of ``size`` random bytes (from /dev/urandom in C speed);
    returns relative path → sha256."""
    root.mkdir(parents=True)
    digests = {}
    for i in range(files):
        path = root / f"f{seed}-{i:03}.bin"
        data = os.urandom(size)
        path.write_bytes(data)
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


def summary(times: list[float]) -> str:
    if not times:
        return "none"
    s = sorted(times)
    mid = s[len(s) // 2]
    return f"n={len(s)} min={s[0]:.3f}s median={mid:.3f}s max={s[-1]:.3f}s"
