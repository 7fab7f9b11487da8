"""Carrying out cull plans: the one cull loop of the daemon.

:func:`run_plan` walks candidates in order, asks the plan (``space/plan.py``) for a
decision, carries it out through the frontend's :class:`Remover`, records the outcome
and logs one ``cull.decision`` event per candidate it decided about: the blob (or
object path), what was given back (``whole`` for a cull; for a trim, ``ranges`` of
``[offset, length]`` bytes), its size, the outcome, the bytes freed and the reason.
Classic mode runs it over cache objects (``frontends/classic/driver.py``), the blob
culler over blobs (``engine/cull.py``).

**Volume.** A pass may decide about 100 000 objects (classic mode culls until the
kernel is satisfied); 100 000 info lines would flood the journal and push out
everything else. So the decision events are at info level within a budget
(:class:`EventBudget`, a token bucket shared by every pass of the process: 100 events
at once, then one a second); past it they are at debug level (built only when debug
is on), and the pass ends with one info event ``cull.decisions_suppressed`` saying
how many decisions were not logged at info, by outcome, the bytes they freed and why.
``cull.pass`` (per pass, info) has the pass's totals either way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from cachefilesd_py.space.plan import Action, CullPlan, Decision, Outcome, Tally
from cachefilesd_py.space.scan import Candidate

log = structlog.get_logger("space")


class Remover(Protocol):
    """How a frontend removes (or trims) one candidate."""

    def cull(self, cand: Candidate) -> Outcome: ...

    def trim(self, cand: Candidate, nbytes: int) -> tuple[Outcome, int]:
        """Give back about ``nbytes`` of ``cand``: ``(TRIMMED, bytes freed)``,
        ``(BUSY, 0)`` if it is in use, ``(UNTRIMMABLE, 0)`` to have it culled whole."""
        ...


class EventBudget:
    """How many info-level events may be logged now: a token bucket of ``burst``
    tokens refilled at ``per_second`` (see the module docstring). Thread-safe."""

    def __init__(
        self,
        burst: int = 100,
        per_second: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.per_second = per_second
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Whether one more event may be logged at info level now (a token taken)."""
        with self._lock:
            now = self._clock()
            tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_second)
            self._at = now
            if tokens < 1.0:
                self._tokens = tokens
                return False
            self._tokens = tokens - 1.0
            return True

    def reset(self) -> None:
        """A full bucket again (a fresh process's budget; tests that count events)."""
        with self._lock:
            self._tokens = float(self.burst)
            self._at = self._clock()

    def describe(self) -> str:
        return (
            f"at most {self.burst} cull decisions at info level at once, "
            f"then {self.per_second:g}/s"
        )


#: the budget of the process's ``cull.decision`` info events, shared by every pass
DECISION_EVENTS = EventBudget()


def run_plan(
    plan: CullPlan,
    candidates: Iterable[Candidate],
    remover: Remover,
    *,
    describe: Callable[[Candidate], str],
    keep_going: Callable[[], bool] | None = None,
    check_every: int = 64,
    logger: Any = None,
    on_decision: Callable[[Candidate, Decision, Outcome, int], None] | None = None,
    detail: Callable[[Candidate], Mapping[str, Any]] | None = None,
    budget: EventBudget | None = None,
    info: bool = True,
) -> Tally:
    """Decide about ``candidates`` in order until the plan says stop (or, every
    ``check_every`` candidates, ``keep_going()`` says no). Returns the plan's tally.

    Each decision is one ``cull.decision`` event, at info level within ``budget``
    (default: the process's :data:`DECISION_EVENTS`), else at debug level, and the
    suppressed ones are summed up in one ``cull.decisions_suppressed`` info event.
    ``detail(cand)`` adds fields to a decision's event (a trim's byte ranges).
    ``info=False`` (a dry run) logs every decision at debug level only."""
    events = (logger or log).bind()
    budget = budget if budget is not None else DECISION_EVENTS
    # past the budget the events are debug-level: when they are filtered, not even
    # their fields are built
    debug_on = _debug_enabled(events)
    suppressed: dict[Outcome, int] = {}
    suppressed_bytes = 0
    stop, skip, trim = Action.STOP, Action.SKIP, Action.TRIM
    culled, untrimmable = Outcome.CULLED, Outcome.UNTRIMMABLE
    # bound once: a classic pass runs this loop once per cull, tens of thousands of times
    decide, record, cull, take = plan.decide, plan.record, remover.cull, budget.take
    check = keep_going is not None
    uniform = plan.uniform()
    for i, cand in enumerate(candidates):
        if check and i and i % check_every == 0 and not keep_going():  # type: ignore[misc]
            break
        decision = uniform or decide(cand)
        action = decision.action
        if action is stop:
            break
        freed = 0
        if action is skip:
            outcome = decision.outcome or Outcome.NOT_NEEDED
        elif action is trim:
            outcome, freed = remover.trim(cand, decision.trim_bytes)
            if outcome is untrimmable:
                record(cand, outcome)
                outcome = cull(cand)
                freed = cand.blocks * 512 if outcome is culled else 0
        else:
            outcome = cull(cand)
            freed = cand.blocks * 512 if outcome is culled else 0
        record(cand, outcome, freed)
        if on_decision is not None:
            on_decision(cand, decision, outcome, freed)
        at_info = info and take()
        if info and not at_info:
            suppressed[outcome] = suppressed.get(outcome, 0) + 1
            suppressed_bytes += freed
        if at_info or debug_on:
            size = cand.blocks * 512
            fields: dict[str, Any] = {
                "blob": describe(cand),
                "outcome": outcome.value,
                "bytes": freed,
                "size": size,
                # what was given back: all of it (a cull), or byte ranges (a trim's
                # ``detail``); neither for a candidate that was kept
                "whole": outcome is culled,
                "ranges": [],
                "reason": decision.reason,
            }
            if detail is not None:
                fields.update(detail(cand))
            (events.info if at_info else events.debug)("cull.decision", **fields)
    if suppressed:
        events.info(
            "cull.decisions_suppressed",
            suppressed=sum(suppressed.values()),
            by_outcome={outcome.value: n for outcome, n in suppressed.items()},
            freed=suppressed_bytes,
            why=budget.describe() + "; the rest at debug level",
        )
    return plan.tally


def _debug_enabled(logger: Any) -> bool:
    check = getattr(logger, "is_enabled_for", None)
    return True if check is None else bool(check(logging.DEBUG))


@dataclass(frozen=True)
class DecisionRecord:
    """One candidate's fate in a pass, for the operator."""

    blob: str
    outcome: str
    bytes: int
    reason: str


@dataclass
class PassResult:
    """One pass of a culler: whether the limits asked for anything, and what it did."""

    needed: bool = False
    tally: Tally = field(default_factory=Tally)
    scanned: int = 0
    need_bytes: int = 0
    need_objects: int = 0
    #: what the pass decided, in order (kept only when asked: ``cachefilesctl cull``)
    decisions: list[DecisionRecord] = field(default_factory=list)

    @property
    def acted(self) -> int:
        return self.tally.acted


def volume_dir_of(cand: Candidate) -> str:
    """The volume directory (``I...``) of a file at ``cache/I.../@xx/<name>``."""
    return os.path.basename(os.path.dirname(cand.directory))
