"""The supervisor: the daemon's main process. It holds the bound device and runs workers.

Process model (docs/failover.md has the whole story, with every kind of death):

- the **supervisor** (this module; systemd's main PID; ``cachefilesd-py`` started by
  hand or by an init script is the same process) binds ``/dev/cachefiles`` or takes it
  back from systemd's fd store (``daemon/keeper.py``), drops its capabilities, and then
  stays single-threaded: a poll loop over a signal wake-up socket and one control
  socket per worker. It never reads the device, so it never holds an anonymous fd;
- the **serving worker** reads requests and answers them (``daemon/worker.py``);
- the **spare** is forked in advance with everything imported and built, and waits.

When the serving worker dies (any signal, any exit, or killed here because its
heartbeats say it is wedged: ``daemon/health.py``), the supervisor reaps it — by then
the kernel has closed every anonymous fd it had, so its objects are closed — writes
``restore`` once, and tells the spare to serve; the spare's first reads are the
re-delivered requests. A new spare is forked at once. With no spare ready (it died, or
is still building), a new worker is forked and told to serve straight away.

systemd's watchdog is pinged once a second while the serving worker is healthy (or
being replaced); ``STATUS=`` says what the daemon is doing. SIGTERM/SIGINT stop the
workers (the serving one finishes its READs) and then the supervisor, exit 0. SIGHUP
checks the configuration file and, if it is valid, forwards SIGHUP to the serving
worker (new ``source`` rules) and replaces the spare. SIGUSR1 is forwarded.

fanotify mode (``daemon/fanotify_keeper.py``): the supervisor holds the fanotify group
instead of the device, plus the in-flight journal and silent fds; nothing is written
at a worker's death (the successor answers the dead worker's events itself), and a
serving worker is never killed at the stop deadline, nor the supervisor gone, while
one of its mounts lives.

If the supervisor itself dies, its workers die with it (parent-death signal); systemd
restarts it with the device from the fd store and it writes ``restore`` before the
first worker reads. Without systemd there is no store: the cache unbinds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from cachefilesd_py.config.load import load_config
from cachefilesd_py.config.model import Config
from cachefilesd_py.daemon import systemd
from cachefilesd_py.daemon import worker as worker_mod
from cachefilesd_py.daemon.channel import KINDS_FROM_WORKER, Channel, Message
from cachefilesd_py.daemon.health import Beat, CrashBudget, Limits, verdict
from cachefilesd_py.daemon.keeper import DeviceKeeper
from cachefilesd_py.daemon.worker import WorkerSpec
from cachefilesd_py.errors import ConfigError

if TYPE_CHECKING:
    from cachefilesd_py.daemon.fanotify_keeper import FanotifyKeeper

log = structlog.get_logger("daemon")

#: seconds between health checks, watchdog pings and status updates
TICK = 1.0
#: how long a stop waits for the workers before SIGKILL (below TimeoutStopSec=60)
STOP_TIMEOUT = 50.0
#: consecutive spares that die before being prepared before no more are forked
SPARE_ATTEMPTS = 3
MANAGED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD}

WorkerMain = Callable[[WorkerSpec, socket.socket], int]


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


@dataclass(eq=False)
class Child:
    pid: int
    chan: Channel
    role: str
    forked_at: float
    prepared: bool = False
    told_to_serve_at: float | None = None
    serving_since: float | None = None
    beat: Beat | None = None
    health: dict[str, Any] = field(default_factory=dict)
    #: why the supervisor killed it (it is then expected to die)
    killed: str | None = None
    eof: bool = False


class Supervisor:
    """The main process's loop (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        config_path: str,
        nocull: bool,
        keeper: DeviceKeeper | FanotifyKeeper,
        *,
        worker_main: WorkerMain = worker_mod.run,
        limits: Limits | None = None,
        budget: CrashBudget | None = None,
        use_spare: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.nocull = nocull
        self.keeper = keeper
        self._worker_main = worker_main
        self.limits = limits or Limits.for_fetch_timeout(config.fetch_timeout)
        if config.fanotify and limits is None:
            # a fanotify worker serves only after opening its blobs, answering a dead
            # worker's events and mounting: fetches, bounded like a READ
            self.limits = dataclasses.replace(
                self.limits, start=max(self.limits.start, self.limits.read)
            )
        self.budget = budget or CrashBudget()
        self.use_spare = use_spare
        self._clock = clock
        self._pid = os.getpid()
        self._children: dict[int, Child] = {}
        self._serving: Child | None = None
        self._spare: Child | None = None
        self._spare_failures = 0
        self._spare_due: float | None = None
        self._pending: set[int] = set()
        self._stopping = False
        self._stop_deadline = 0.0
        self._done = False
        self._rc = 0
        self._ready_sent = False
        #: when the last worker death was noticed (None: not recovering)
        self._recovering_since: float | None = None
        self._recovering_why = ""
        self._status = ""
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        #: every takeover: seconds from noticing the death to the new worker serving
        self.takeovers: list[float] = []
        self.deaths = 0
        interval = systemd.watchdog_interval()
        #: seconds between ticks: at least three watchdog pings per WatchdogSec=
        self.tick = TICK if interval is None else min(TICK, interval / 3)

    # -- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        # only note it: the loop acts (a handler that logs could deadlock, see app.py)
        self._pending.add(signum)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in MANAGED_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _uninstall_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in MANAGED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _own_fds(self) -> list[int]:
        """The fds a child must not keep: the wake-up pair and other workers' channels."""
        fds = [c.chan.fileno() for c in self._children.values()]
        fds += [s.fileno() for s in (self._wake_r, self._wake_w) if s is not None]
        return [fd for fd in fds if fd >= 0]

    # -- workers ---------------------------------------------------------------------

    def _fork(self, role: str) -> Child | None:
        keeper = self.keeper
        hold = getattr(keeper, "hold", None)  # fanotify mode: the group, not a device
        assert keeper.device is not None or hold is not None
        sup_sock, worker_sock = Channel.pair()
        spec = WorkerSpec(
            self.config, self.config_path, self.nocull, keeper.device, self._pid, hold
        )
        own = self._own_fds()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, MANAGED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            sup_sock.close()
            worker_sock.close()
            log.error("worker.fork_failed", error=str(exc))
            return None
        if pid == 0:  # the child: never returns
            rc = 3
            try:
                sup_sock.close()
                worker_mod.become_child(self._pid, own, "cfd-spare")
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                rc = self._worker_main(spec, worker_sock)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                try:
                    log.exception("worker.crashed")
                finally:
                    rc = 3
            finally:
                os._exit(rc)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        worker_sock.close()
        child = Child(pid, Channel(sup_sock, KINDS_FROM_WORKER), role, self._clock())
        self._children[pid] = child
        log.debug("worker.forked", worker=pid, role=role)
        return child

    def _fork_spare(self) -> None:
        self._spare_due = None
        if not self.use_spare or self._stopping or self._spare is not None:
            return
        self._spare = self._fork("spare")

    def _promote(self, child: Child) -> None:
        child.role = "serving"
        child.told_to_serve_at = self._clock()
        self._serving = child
        if not child.chan.send("serve"):
            log.warning("worker.not_listening", worker=child.pid)  # it is dying; reaped soon

    def _serve_next(self) -> None:
        """Have a worker serve: the spare if there is one, else a fresh fork."""
        spare, self._spare = self._spare, None
        if spare is None or spare.eof:
            spare = self._fork("serving")
        if spare is None:
            self._fail("cannot fork a worker")
            return
        self._promote(spare)
        log.info("worker.promoted", worker=spare.pid, prepared=spare.prepared)
        self._fork_spare()

    # -- events ----------------------------------------------------------------------

    def _on_message(self, child: Child, msg: Message) -> None:
        now = self._clock()
        if msg.kind == "prepared":
            child.prepared = True
            if child.role == "spare":
                self._spare_failures = 0
            log.debug("worker.prepared", worker=child.pid, seconds=round(now - child.forked_at, 3))
        elif msg.kind == "serving" and child is self._serving:
            child.serving_since = now
            child.beat = Beat(now)
            fields: dict[str, Any] = {"worker": child.pid}
            if self._recovering_since is not None:
                took = now - self._recovering_since
                self.takeovers.append(took)
                fields |= {"takeover_s": round(took, 3), "after": self._recovering_why}
                self._recovering_since = None
            log.info("worker.serving", **fields)
            if self._stopping:  # forked to take down fanotify mounts a dead one left
                self._signal(child, signal.SIGTERM)
            if not self._ready_sent:
                self._ready_sent = True
                systemd.ready(self._status_text())
                log.info(
                    "ready",
                    mode=self._mode(),
                    cache_dir=self.config.dir,
                    device_from=self.keeper.origin,
                    failover=self.keeper.can_restore,
                    sources=len(self.config.sources),
                    chunk_size=self.config.chunk_size,
                )
        elif msg.kind == "heartbeat" and child is self._serving:
            child.beat = Beat(now, msg.number("loop_age"), msg.number("oldest_read"))
            child.health = msg.fields

    def _on_death(self, child: Child, status: int) -> None:
        now = self._clock()
        how = describe_status(status)
        if child is self._spare:
            self._spare = None
        if child is not self._serving:
            if self._stopping or child.killed is not None:
                log.debug("spare.ended", worker=child.pid, how=how, why=child.killed)
                return
            if not child.prepared:
                self._spare_failures += 1
            log.warning("spare.died", worker=child.pid, how=how, prepared=child.prepared)
            if self._spare_failures >= SPARE_ATTEMPTS:
                log.error("spare.giving_up", failures=self._spare_failures,
                          consequence="a failover forks a new worker instead")
            else:
                self._spare_due = now + min(30.0, 0.5 * 2**self._spare_failures)
            return
        self._serving = None
        served = None if child.serving_since is None else round(now - child.serving_since, 1)
        if self._stopping:
            log.info("worker.stopped", worker=child.pid, how=how)
            live = self._live_fanotify_mounts()
            if live and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                # closing the group now would let those mounts read zeros: a worker
                # adopts them and is told to stop (it unmounts, then exits)
                log.warning("fanotify.mounts_left", mountpoints=live, how=how)
                self._spare = None  # told to exit already
                self._serve_next()
            return
        self.deaths += 1
        log.warning("worker.died", worker=child.pid, how=how, served_s=served,
                    killed_because=child.killed)
        if not self.budget.spend(now):
            self._fail(f"{self.budget.recent} worker deaths within {self.budget.window:.0f} s")
            return
        if self.config.fanotify:
            pass  # the successor answers what the dead worker read (its journal)
        elif self.config.ondemand:
            # classic mode keeps no request state in the kernel: nothing to restore
            assert isinstance(self.keeper, DeviceKeeper)
            if not self.keeper.can_restore:
                self._fail("the kernel has no 'restore' (Linux 6.8 or later): a new "
                           "worker could not pick up the requests the dead one had read")
                return
            try:
                self.keeper.restore()
            except OSError as exc:
                self._fail(f"restore failed: {exc.strerror}")
                return
        self._recovering_since = now
        self._recovering_why = f"worker {child.pid} {how}"
        self._serve_next()

    def _fail(self, why: str) -> None:
        log.error("supervisor.giving_up", why=why)
        self._rc = 1
        self._begin_stop(why)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is None:
                continue
            messages, _eof = child.chan.drain()
            for msg in messages:
                self._on_message(child, msg)
            child.chan.close()
            self._on_death(child, status)

    def _handle_signals(self) -> None:
        pending, self._pending = self._pending, set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig in pending:
                self._begin_stop(signal.Signals(sig).name)
        if signal.SIGHUP in pending and not self._stopping:
            self._reload()
        if signal.SIGUSR1 in pending and self._serving is not None:
            self._signal(self._serving, signal.SIGUSR1)

    def _signal(self, child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)

    def _begin_stop(self, why: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_deadline = self._clock() + STOP_TIMEOUT
        systemd.stopping()
        log.info("stopping", signal=why)
        for child in list(self._children.values()):
            if child is self._serving:
                self._signal(child, signal.SIGTERM)
            else:
                child.killed = "stopping"
                child.chan.send("exit")
                self._signal(child, signal.SIGTERM)

    def _reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload.rejected", error=str(exc))
            return
        if (new.dir, new.ondemand) != (self.config.dir, self.config.ondemand):
            log.warning("reload.kernel_settings_need_restart",
                        note="dir and mode are fixed at bind; restart to apply")
            new = dataclasses.replace(new, dir=self.config.dir, ondemand=self.config.ondemand)
        self.config = new
        if self._serving is not None:
            self._signal(self._serving, signal.SIGHUP)
        if self._spare is not None:
            old, self._spare = self._spare, None
            old.killed = "replaced after a reload"
            old.chan.send("exit")
            self._signal(old, signal.SIGTERM)
            self._fork_spare()
        log.info("reload.forwarded", sources=len(new.sources))

    # -- health and status -----------------------------------------------------------

    def _check_health(self, now: float) -> None:
        serving = self._serving
        if self._stopping:
            systemd.watchdog()
            for child in self._children.values():
                if self.config.fanotify and child is serving:
                    continue  # it keeps serving busy mounts; killing it would fail open
                if now > self._stop_deadline and child.killed is None:
                    child.killed = "did not stop in time"
                    log.error("worker.stop_timeout", worker=child.pid)
                    self._signal(child, signal.SIGKILL)
            return
        if serving is None:
            return
        assert serving.told_to_serve_at is not None
        v = verdict(
            self.limits,
            now,
            told_to_serve_at=serving.told_to_serve_at,
            serving_since=serving.serving_since,
            beat=serving.beat,
        )
        if v.healthy:
            systemd.watchdog()
        elif serving.killed is None:
            serving.killed = v.reason
            log.error("worker.wedged", worker=serving.pid, reason=v.reason)
            self._signal(serving, signal.SIGKILL)

    def _mode(self) -> str:
        if self.config.fanotify:
            return "fanotify"
        return "ondemand" if self.config.ondemand else "classic"

    def _live_fanotify_mounts(self) -> list[str]:
        if not self.config.fanotify:
            return []
        return [s.mountpoint for s in self.config.fanotify_images
                if os.path.ismount(s.mountpoint)]

    def _status_text(self) -> str:
        if self._stopping:
            return "stopping"
        serving = self._serving
        if self._recovering_since is not None:
            return f"recovering: {self._recovering_why}; " + (
                f"worker {serving.pid} taking over" if serving else "no worker yet"
            )
        if serving is None or serving.serving_since is None:
            return "starting"
        h = serving.health
        parts = []
        if self.config.fanotify:
            parts.append(f"serving {len(self.config.fanotify_images)} fanotify images")
        elif self.config.ondemand:
            parts.append(f"serving {h.get('objects') or 0} objects")
        else:
            parts.append("culling as needed")
        if h.get("culling"):
            parts.append("culling")
        offline = h.get("offline")
        if isinstance(offline, list) and offline:
            parts.append("offline: " + ", ".join(str(o) for o in offline))
        spare = self._spare
        spare_state = "none" if spare is None else ("ready" if spare.prepared else "preparing")
        return f"{', '.join(parts)} (worker {serving.pid}, spare {spare_state})"

    def _update_status(self) -> None:
        text = self._status_text()
        if text != self._status:
            self._status = text
            systemd.status(text)

    # -- the loop --------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; returns the exit status."""
        self._install_signals()
        try:
            self._serve_next()
            next_tick = self._clock()
            while not self._done:
                now = self._clock()
                poller = select.poll()
                assert self._wake_r is not None
                poller.register(self._wake_r, select.POLLIN)
                by_fd = {}
                for child in self._children.values():
                    if not child.eof:
                        by_fd[child.chan.fileno()] = child
                        poller.register(child.chan.fileno(), select.POLLIN)
                timeout = max(0.0, next_tick - now)
                if self._spare_due is not None:
                    timeout = min(timeout, max(0.0, self._spare_due - now))
                for fd, _ev in poller.poll(int(timeout * 1000) + 1):
                    if fd == self._wake_r.fileno():
                        try:
                            while self._wake_r.recv(512):
                                pass
                        except BlockingIOError:
                            pass
                    elif fd in by_fd:
                        child = by_fd[fd]
                        messages, eof = child.chan.drain()
                        child.eof = eof
                        for msg in messages:
                            self._on_message(child, msg)
                self._handle_signals()
                self._reap()
                now = self._clock()
                if self._spare_due is not None and now >= self._spare_due:
                    self._fork_spare()
                if now >= next_tick:
                    self._check_health(now)
                    self._update_status()
                    next_tick = now + self.tick
                if self._stopping and not self._children:
                    self._done = True
        finally:
            for child in self._children.values():
                self._signal(child, signal.SIGKILL)
            for pid in list(self._children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            self._children.clear()
            self._uninstall_signals()
            self.keeper.close()
            log.info("terminated", status=self._rc)
        return self._rc
