"""Two network namespaces joined by a veth pair: a network whose link the tests can
cut, without touching any interface of the machine they run on.

    with VethPair.create() as net:
        net.run_in("client", "ip", "route")          # the client's view
        net.client_link(up=False)                    # ip link set <client end> down
        net.server_link(up=False)                    # the peer goes down: no carrier

The client end ``<prefix>c`` lives in namespace ``<prefix>-c`` (or, in the test
guest, in the test's own namespace: ``client_in_current``) with ``10.<n>.0.1/24``,
the server end ``<prefix>s`` in ``<prefix>-s`` with ``10.<n>.0.2/24`` (``n`` is picked
per pair from 200–249, so several pairs can coexist); both namespaces have their
loopback up. The route between them is the connected /24, which the kernel re-adds by
itself when a link comes back up. Everything is deleted on exit (deleting a namespace
deletes its end of the pair, and the other end with it).

Needs root and ``ip`` (iproute2). Used by the connectivity tests (host and guest) and
by ``bench/bench_offline.py``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass


def ip(*argv: str) -> str:
    proc = subprocess.run(["ip", *argv], check=False, text=True, capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"ip {' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


def can_create_namespaces() -> bool:
    """Whether this process can make namespaces (root with iproute2)."""
    if os.geteuid() != 0:
        return False
    name = f"cfdpy-probe-{os.getpid()}"
    try:
        ip("netns", "add", name)
    except (RuntimeError, OSError):
        return False
    with contextlib.suppress(RuntimeError):
        ip("netns", "del", name)
    return True


@dataclass
class VethPair:
    prefix: str
    subnet: int
    client_in_current: bool = False  # the client end in this process's namespace

    @property
    def client_ns(self) -> str:
        return "" if self.client_in_current else f"{self.prefix}-c"

    def _n(self, ns: str) -> list[str]:
        return ["-n", ns] if ns else []

    @property
    def server_ns(self) -> str:
        return f"{self.prefix}-s"

    @property
    def client_if(self) -> str:
        return f"{self.prefix}c"

    @property
    def server_if(self) -> str:
        return f"{self.prefix}s"

    @property
    def client_addr(self) -> str:
        return f"10.{self.subnet}.0.1"

    @property
    def server_addr(self) -> str:
        return f"10.{self.subnet}.0.2"

    @classmethod
    def create(cls, prefix: str | None = None, *, client_in_current: bool = False) -> VethPair:
        """A new pair. ``client_in_current``: put the client end in this process's own
        namespace (in the test guest, where the daemon runs) instead of a new one;
        never do that on a machine whose network matters."""
        taken = set(ip("netns", "list").split())
        base = prefix or f"cfv{os.getpid() % 100000}"
        links = ip("-o", "link", "show") if client_in_current else ""
        for n in range(200, 250):
            pair = cls(f"{base}{n}", n, client_in_current)
            if (
                pair.server_ns not in taken
                and (client_in_current or pair.client_ns not in taken)
                and f" {pair.client_if}@" not in links
            ):
                break
        else:
            raise RuntimeError("no free veth subnet")
        pair._build()
        return pair

    def _build(self) -> None:
        try:
            if self.client_ns:
                ip("netns", "add", self.client_ns)
            ip("netns", "add", self.server_ns)
            client_side = ["netns", self.client_ns] if self.client_ns else []
            ip("link", "add", self.client_if, *client_side, "type", "veth",
               "peer", "name", self.server_if, "netns", self.server_ns)
            for ns, dev, addr in ((self.client_ns, self.client_if, self.client_addr),
                                  (self.server_ns, self.server_if, self.server_addr)):
                ip(*self._n(ns), "addr", "add", f"{addr}/24", "dev", dev)
                ip(*self._n(ns), "link", "set", "lo", "up")
                ip(*self._n(ns), "link", "set", dev, "up")
            self.wait_reachable()
        except BaseException:
            self.destroy()
            raise

    def wait_reachable(self, timeout: float = 60.0) -> None:
        """Until the client's route to the server is usable (carrier up on both ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = ip(*self._n(self.client_ns), "route", "show", "dev", self.client_if)
            if out.strip() and "linkdown" not in out:
                return
            time.sleep(0.05)
        raise RuntimeError(f"veth {self.client_if} not up after {timeout} s")

    def client_link(self, *, up: bool) -> None:
        ip(*self._n(self.client_ns), "link", "set", self.client_if, "up" if up else "down")

    def server_link(self, *, up: bool) -> None:
        ip("-n", self.server_ns, "link", "set", self.server_if, "up" if up else "down")

    def client_address(self, *, present: bool) -> None:
        ip(*self._n(self.client_ns), "addr", "add" if present else "del",
           f"{self.client_addr}/24", "dev", self.client_if)

    def argv_in(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)

    def run_in(self, ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv_in(ns, *argv), check=True, text=True,
                              capture_output=True)

    def destroy(self) -> None:
        """Delete the namespaces (and with them the pair); a client end in the current
        namespace goes with its peer."""
        for ns in (self.client_ns, self.server_ns):
            if ns:
                with contextlib.suppress(RuntimeError):
                    ip("netns", "del", ns)
        if self.client_in_current:
            with contextlib.suppress(RuntimeError):
                ip("link", "del", self.client_if)

    def __enter__(self) -> VethPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class ConnectivityWatcher:
    """``python -m cachefilesd_py.sources.netlink HOST...`` running in a namespace:
    the driver in a process of its own, its transitions read from its JSON lines.
    Times are ``time.monotonic()``, one clock for every namespace of the machine."""

    def __init__(
        self, argv_prefix: list[str], hosts: list[str], python: str, start_timeout: float = 300
    ) -> None:
        import queue
        import threading

        self.lines: queue.Queue[dict[str, object]] = queue.Queue()
        self.seen: list[dict[str, object]] = []
        import tempfile

        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the watcher
        self.proc = subprocess.Popen(
            [*argv_prefix, python, "-m", "cachefilesd_py.sources.netlink", *hosts],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # generous: a fresh Python in the test guest (9p root, TCG) takes a while to
        # import pyroute2
        deadline = time.monotonic() + start_timeout
        while (left := deadline - time.monotonic()) > 0 and self.proc.poll() is None:
            line = self.next_line(min(left, 1.0))
            if line.get("ready") is True:
                self.seen.remove(line)
                return
        self.close()
        raise RuntimeError("connectivity watcher did not start:\n" + self.errors())

    def errors(self) -> str:
        """The tail of the watcher's stderr (its log and any traceback)."""
        self.stderr.seek(0)
        return self.stderr.read()[-4000:].decode(errors="replace")

    def _read(self) -> None:
        import json

        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))

    def next_line(self, timeout: float) -> dict[str, object]:
        import queue

        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return {}
        self.seen.append(line)
        return line

    def wait_for(self, source: str, new: str, timeout: float) -> dict[str, object] | None:
        """The first transition of ``source`` to ``new`` among those already seen
        and those to come within ``timeout`` seconds; None if none came."""
        for line in self.seen:
            if line.get("source") == source and line.get("new") == new:
                self.seen.remove(line)
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self.next_line(left)
            if line.get("source") == source and line.get("new") == new:
                self.seen.remove(line)
                return line
        return None

    def forget(self) -> None:
        """Drop what was seen so far (so the next wait sees only new transitions)."""
        while self.next_line(0.0):
            pass
        self.seen.clear()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class InProcessWatcher(ConnectivityWatcher):
    """The same, with the driver in this process (in this process's namespace): for the
    test guest, where a fresh Python process takes long to start."""

    def __init__(self, hosts: list[str]) -> None:
        import queue

        from cachefilesd_py.sources.netlink import NetlinkConnectivity
        from cachefilesd_py.sources.online import Transition

        self.lines = queue.Queue()
        self.seen = []

        def put(tr: Transition) -> None:
            self.lines.put({"source": tr.source, "old": tr.old.value, "new": tr.new.value,
                            "reason": tr.reason, "at": tr.at})

        self.driver = NetlinkConnectivity({h: h for h in hosts}, on_transition=put)
        self.driver.start()

    def errors(self) -> str:
        return ""

    def close(self) -> None:
        self.driver.stop()
