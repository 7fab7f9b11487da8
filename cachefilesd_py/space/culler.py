"""Carrying out cull plans: the one cull loop of the daemon.

:func:`run_plan` walks candidates in order, asks the plan (``space/plan.py``) for a
decision, carries it out through the frontend's :class:`Remover`, records the outcome
and logs one ``cull.decision`` event per candidate it decided about (blob or object,
outcome, bytes freed, reason; at debug level: a pass may decide about thousands of
objects). Classic mode runs it over cache objects (``frontends/classic/driver.py``),
the blob culler over blobs (``engine/cull.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
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
) -> Tally:
    """Decide about ``candidates`` in order until the plan says stop (or, every
    ``check_every`` candidates, ``keep_going()`` says no). Returns the plan's tally."""
    events = (logger or log).bind()
    # the events are debug-level: when they are filtered, not even their fields are built
    logging_on = _debug_enabled(events)
    stop, skip, trim = Action.STOP, Action.SKIP, Action.TRIM
    culled, untrimmable = Outcome.CULLED, Outcome.UNTRIMMABLE
    for i, cand in enumerate(candidates):
        if keep_going is not None and i and i % check_every == 0 and not keep_going():
            break
        decision = plan.decide(cand)
        action = decision.action
        if action is stop:
            break
        freed = 0
        if action is skip:
            outcome = decision.outcome or Outcome.NOT_NEEDED
        elif action is trim:
            outcome, freed = remover.trim(cand, decision.trim_bytes)
            if outcome is untrimmable:
                plan.record(cand, outcome)
                outcome = remover.cull(cand)
                freed = cand.blocks * 512 if outcome is culled else 0
        else:
            outcome = remover.cull(cand)
            freed = cand.blocks * 512 if outcome is culled else 0
        plan.record(cand, outcome, freed)
        if on_decision is not None:
            on_decision(cand, decision, outcome, freed)
        if logging_on:
            events.debug(
                "cull.decision",
                blob=describe(cand),
                outcome=outcome.value,
                bytes=freed,
                size=cand.blocks * 512,
                reason=decision.reason,
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
