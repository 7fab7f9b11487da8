"""The engine's side of disconnected operation: gate fetches, decide, hold READs.

Three pieces, used by every frontend that fills on demand (docs/offline.md):

- :class:`OfflineGate` sits between the filler and the sources. Before any fetch from
  a *tracked* source (an HTTP(S) origin named by the configuration) it asks the
  connectivity driver (``sources/netlink.py``'s ``NetlinkConnectivity``, or a test
  double with the same methods) whether the fetch may go: a fetch to a source the
  tracker calls offline is **not attempted** — it fails at once with a
  :class:`~cachefilesd_py.errors.SourceError` whose reason is ``offline``. After the
  fetch it reports the outcome (success, or the error, which the driver classifies as
  unreachable, refused, timed out, or an answer). ``file:`` sources and origins the
  configuration does not name are not tracked: always online.
- :meth:`OfflineGate.decide` answers, for a READ of missing bytes, what the offline
  policy says (``engine/offline_policy.py``): fetch, fail now, or wait until a
  deadline. The policies (rules over ``<volume>/<cookie>``) are one immutable value,
  replaced whole when switched at run time.
- :class:`HeldReads` parks READs the policy holds, without a worker thread each:
  a held READ is a callback, run (by one timer thread) when its source's state
  changes or at its deadline, whichever comes first. The frontend then asks again.

Every fetch's outcome also goes to the gate's ``credentials``
(``engine/credentials.py``: a 401/403 answer marks the origin's credentials
rejected; a success clears it).

Lock order: ``OfflineGate._lock`` and ``HeldReads._cond`` are leaves; callbacks run
with neither held.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog

from cachefilesd_py.engine.blob import Blob, BlobKey
from cachefilesd_py.engine.credentials import CredentialsWatch
from cachefilesd_py.engine.offline_policy import (
    Decision,
    Fetch,
    OfflinePolicies,
    OfflinePolicy,
    Pin,
    ReadSituation,
    decide,
)
from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.online import SourceState, Status

log = structlog.get_logger("engine.offline")

T = TypeVar("T")


class Connectivity(Protocol):
    """What the gate needs of the connectivity driver (``NetlinkConnectivity``)."""

    def state(self, source: str) -> SourceState: ...

    def may_fetch(self, source: str) -> bool: ...

    def admit(self, source: str) -> bool: ...

    def fetch_succeeded(self, source: str) -> None: ...

    def fetch_failed(self, source: str, exc: BaseException) -> None: ...


class OfflineError(SourceError):
    """A fetch not attempted: its source is offline."""

    def __init__(self, source: str, why: str) -> None:
        super().__init__(
            f"{source} is offline ({why}): fetch not attempted", transient=False, reason="offline"
        )
        self.source = source


@dataclass
class OfflineGate:
    """Admits fetches by the connectivity tracker and decides READs by the policy."""

    connectivity: Connectivity | None = None
    #: the origins whose state is tracked (``scheme://host:port``)
    tracked: frozenset[str] = frozenset()
    policies: OfflinePolicies = field(default_factory=OfflinePolicies)
    #: whether a blob is pinned (``cachefilesctl pin`` or a config ``pin`` glob)
    is_pinned: Callable[[BlobKey], bool] = lambda _key: False
    #: whether ``[offset, offset+length)`` of a blob is image metadata, when known
    is_metadata: Callable[[BlobKey, int, int], bool] = lambda _k, _o, _n: False
    clock: Callable[[], float] = time.monotonic
    #: whether each origin's credentials are being rejected (401/403), from every
    #: fetch's outcome, tracked or not (``engine/credentials.py``)
    credentials: CredentialsWatch = field(default_factory=CredentialsWatch)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def watches(self, origin: str) -> bool:
        """Whether ``origin``'s connectivity is followed (else: always online)."""
        return self.connectivity is not None and origin in self.tracked

    # -- fetches ------------------------------------------------------------------------

    def admit(self, origin: str) -> None:
        """Raise :class:`OfflineError` unless a fetch from ``origin`` may go now."""
        conn = self.connectivity
        if conn is None or origin not in self.tracked:
            return
        if not conn.admit(origin):
            raise OfflineError(origin, conn.state(origin).reason)

    def succeeded(self, origin: str) -> None:
        if self.connectivity is not None and origin in self.tracked:
            self.connectivity.fetch_succeeded(origin)

    def failed(self, origin: str, exc: BaseException) -> None:
        if self.connectivity is not None and origin in self.tracked:
            self.connectivity.fetch_failed(origin, exc)

    def fetch(self, origin: str, work: Callable[[], T]) -> T:
        """Run one fetch from ``origin`` under the gate: admitted first, its outcome
        reported after (an :class:`OfflineError` is not an outcome) to the
        connectivity tracker and to the credentials watch; ``work``'s answer."""
        self.admit(origin)
        try:
            answer = work()
        except Exception as exc:
            self.failed(origin, exc)
            self.credentials.outcome(origin, exc)
            raise
        self.succeeded(origin)
        self.credentials.outcome(origin, None)
        return answer

    # -- READs --------------------------------------------------------------------------

    def set_policy(self, pattern: str | None, policy: OfflinePolicy) -> OfflinePolicies:
        """Switch the default (``pattern`` None) or one rule's policy; the new rules."""
        with self._lock:
            if pattern is None:
                self.policies = OfflinePolicies(self.policies.rules, policy)
            else:
                self.policies = self.policies.with_rule(pattern, policy)
            return self.policies

    def policy_for(self, key: BlobKey) -> OfflinePolicy:
        volume, _, cookie = key.match_name.partition("/")
        return self.policies.for_blob(volume, cookie)

    def decide(self, blob: Blob, offset: int, length: int, waited: float) -> Decision:
        """What a READ of missing bytes ``[offset, offset+length)`` of ``blob`` does now,
        having been held ``waited`` seconds so far."""
        origin = blob.source.origin
        conn = self.connectivity
        if conn is None or origin not in self.tracked:
            return Fetch()
        state = conn.state(origin)
        situation = ReadSituation(
            status=state.status,
            offline_reason=state.reason,
            admitted=conn.may_fetch(origin),
            pin=Pin.PINNED if self.is_pinned(blob.key) else Pin.NONE,
            metadata=self.is_metadata(blob.key, offset, length),
            waited=waited,
            now=self.clock(),
        )
        return decide(self.policy_for(blob.key), situation)

    def states(self) -> dict[str, SourceState]:
        conn = self.connectivity
        if conn is None:
            return {}
        return {origin: conn.state(origin) for origin in sorted(self.tracked)}


@dataclass(order=True)
class _Held:
    deadline: float
    seq: int
    origin: str = field(compare=False)
    wake: Callable[[], None] = field(compare=False)
    done: bool = field(default=False, compare=False)


class HeldReads:
    """READs held by the ``wait`` policy, as callbacks (see the module docstring).

    ``hold(origin, deadline, wake)`` parks one; ``wake`` is called exactly once — when
    ``origin`` changes state (:meth:`source_changed`), at ``deadline``, or at
    :meth:`close` — from the timer thread, never under a lock of this class.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[_Held] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._due: list[_Held] = []
        self._closed = False
        self._thread: threading.Thread | None = None  # started by the first hold

    def __len__(self) -> int:
        with self._cond:
            return sum(1 for h in self._heap if not h.done)

    def hold(self, origin: str, deadline: float, wake: Callable[[], None]) -> None:
        with self._cond:
            closed = self._closed
            if not closed:
                heapq.heappush(self._heap, _Held(deadline, next(self._seq), origin, wake))
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="held-reads", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
        if closed:  # shutting down: the READ is answered at once
            _call_all([wake])

    def source_changed(self, origin: str) -> None:
        """Wake every READ held for ``origin`` (its state changed: ask again)."""
        self._wake_where(lambda h: h.origin == origin)

    def wake_all(self) -> None:
        """Wake every held READ (the policy changed: ask again)."""
        self._wake_where(lambda _h: True)

    def close(self) -> None:
        """Wake every held READ (the frontend completes them), then stop."""
        with self._cond:
            self._closed = True
        self._wake_where(lambda _h: True)
        with self._cond:
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(10)

    def _wake_where(self, which: Callable[[_Held], bool]) -> None:
        with self._cond:
            for h in self._heap:
                if not h.done and which(h):
                    h.done = True
                    self._due.append(h)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = self._clock()
                    while self._heap and (self._heap[0].done or self._heap[0].deadline <= now):
                        h = heapq.heappop(self._heap)
                        if not h.done:
                            h.done = True
                            self._due.append(h)
                    if self._due or (self._closed and not self._heap):
                        break
                    timeout = self._heap[0].deadline - now if self._heap else None
                    self._cond.wait(timeout)
                due, self._due = self._due, []
                stop = self._closed and not self._heap
            _call_all(h.wake for h in due)
            if stop:
                with self._cond:
                    due, self._due = self._due, []
                _call_all(h.wake for h in due)
                return


def _call_all(wakes: Iterable[Callable[[], None]]) -> None:
    for wake in wakes:
        try:
            wake()
        except Exception:  # one broken callback must not strand the others
            log.exception("held_read.wake_failed")


def is_offline(state: SourceState) -> bool:
    return state.status is Status.OFFLINE
