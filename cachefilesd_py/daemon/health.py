"""Is the serving worker healthy? Pure rules, used by the supervisor once a second.

The worker reports (``daemon/channel.py`` heartbeats) how long ago its request loop
last went round and how old the oldest READ it is serving is. A worker is **wedged**
when any of these holds, and the supervisor then kills it (SIGKILL) and fails over
to the spare, because a wedged worker leaves readers blocked in the kernel for good
(the kernel has no timeout on on-demand requests):

- it was told to serve ``start`` seconds ago and has not said ``serving``;
- no heartbeat for ``heartbeat`` seconds (the worker is stopped, or a thread holds
  the interpreter);
- its request loop has not gone round for ``loop`` seconds (the reader thread is stuck:
  nothing is read from the device any more);
- a READ has been in service for ``read`` seconds. A READ's own deadline is
  ``fetch_timeout``; this limit leaves room for waits behind other fills of the same
  chunk and for the write into the cache file, so only a fill that ignores its
  deadline (a hung system call, a bug) reaches it.

systemd's watchdog is pinged only while the verdict is healthy (and during a
failover's start grace), so a wedged *supervisor* — or a failover that does not come
back — is killed by systemd (``WatchdogSec=``) and restarted with the fd store.

A worker that keeps dying is a crash loop (a bug, a request that kills every worker):
:class:`CrashBudget` counts deaths in a sliding window; when it is spent the
supervisor exits with an error and leaves the decision to systemd's start limit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    start: float = 30.0
    heartbeat: float = 10.0
    loop: float = 10.0
    read: float = 120.0

    @classmethod
    def for_fetch_timeout(cls, fetch_timeout: float) -> Limits:
        return cls(read=3 * fetch_timeout + 30.0)


@dataclass(frozen=True)
class Beat:
    """The last heartbeat: when the supervisor got it, and what it said."""

    at: float
    loop_age: float | None = None
    oldest_read: float | None = None


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str = ""


def verdict(
    limits: Limits,
    now: float,
    *,
    told_to_serve_at: float,
    serving_since: float | None,
    beat: Beat | None,
) -> Verdict:
    """The serving worker's health at ``now`` (all times on one monotonic clock)."""
    if serving_since is None:
        waited = now - told_to_serve_at
        if waited > limits.start:
            return Verdict(False, f"not serving {waited:.0f} s after being told to")
        return Verdict(True, "starting")
    last = beat.at if beat is not None else serving_since
    silent = now - last
    if silent > limits.heartbeat:
        return Verdict(False, f"no heartbeat for {silent:.0f} s")
    if beat is None:
        return Verdict(True)
    if beat.loop_age is not None and beat.loop_age + silent > limits.loop:
        return Verdict(False, f"request loop stalled for {beat.loop_age + silent:.0f} s")
    if beat.oldest_read is not None and beat.oldest_read + silent > limits.read:
        return Verdict(False, f"a READ in service for {beat.oldest_read + silent:.0f} s")
    return Verdict(True)


class CrashBudget:
    """At most ``deaths`` worker deaths within ``window`` seconds."""

    def __init__(self, deaths: int = 60, window: float = 300.0) -> None:
        self.deaths = deaths
        self.window = window
        self._times: deque[float] = deque()

    def spend(self, now: float) -> bool:
        """Record a death at ``now``; False once the budget is spent."""
        self._times.append(now)
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()
        return len(self._times) <= self.deaths

    @property
    def recent(self) -> int:
        return len(self._times)
