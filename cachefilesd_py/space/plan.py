"""The cull plan: which cache objects to remove (or trim), decided one by one. Pure.

Both frontends cull the same way. A pass has *needs* (bytes and objects to free, bytes
per volume above its cap, or "until the kernel is satisfied" in classic mode), a list
of *candidates* in the order they should go (oldest atime, or the cull policy's
order), and rules that keep some of them (pins, objects known to be in use). For each
candidate in turn the plan returns a :class:`Decision`; the caller carries it out
through its frontend's remover and tells the plan the :class:`Outcome`, and the plan
updates what is still needed. So the rules live here once, tested with tables, and a
frontend only supplies candidates, predicates and the removal itself
(``space/culler.py`` runs the loop).

The rules, in order, for a candidate in volume ``v``:

1. nothing more is needed (bytes and objects freed, no volume over its cap): **stop**;
   only volumes over their caps still need something and ``v`` is not one of them:
   **skip** (not needed);
2. a ``pin`` matches it: **skip** (:attr:`Outcome.PINNED`);
3. the frontend can only trim it (a blob a mount reads right now, in fanotify mode:
   its file cannot go, its chunks can): **trim** it by what is still needed when
   trimming is allowed and bytes are still needed, else **skip**
   (:attr:`Outcome.IN_USE`);
   the frontend knows it is in use (an open kernel object): **skip**
   (:attr:`Outcome.IN_USE`); the kernel would refuse anyway, this saves the command;
4. trimming is allowed, no more whole objects are needed, and the object is much
   larger than the bytes still to free (``space/chunks.py``): **trim** it by those
   bytes; if it cannot be trimmed, it is culled whole;
5. otherwise **cull** it.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cachefilesd_py.space.chunks import should_trim
from cachefilesd_py.space.scan import Candidate


class Outcome(enum.Enum):
    """What happened to one candidate of a cull pass."""

    #: removed (the kernel's ``cull`` moved it to the graveyard)
    CULLED = "culled"
    #: gave back some of its chunks (holes punched), stays cached
    TRIMMED = "trimmed"
    #: refused because it is in use: the kernel answered EBUSY, or a trim lease was
    #: refused
    BUSY = "busy"
    #: already gone (ESTALE/ENOENT)
    GONE = "gone"
    #: any other error (logged with the errno)
    FAILED = "failed"
    #: kept by a ``pin`` rule
    PINNED = "pinned"
    #: kept because the frontend knows a kernel object uses it (never asked the kernel)
    IN_USE = "in_use"
    #: left alone: nothing more is needed from its volume
    NOT_NEEDED = "not_needed"
    #: a trim found nothing to give back (no trusted presence, or nothing present past
    #: the head): the caller culls it whole instead
    UNTRIMMABLE = "untrimmable"

    #: members are singletons: identity hashing, in C (tallies count thousands a pass)
    __hash__ = object.__hash__

    @classmethod
    def of_cull(cls, err: int) -> Outcome:
        """The outcome of the kernel's answer to ``cull`` (0 or an errno)."""
        if err == 0:
            return cls.CULLED
        if err == errno.EBUSY:
            return cls.BUSY
        if err in (errno.ESTALE, errno.ENOENT):
            return cls.GONE
        return cls.FAILED


class Action(enum.Enum):
    """What the plan asks the caller to do with one candidate: remove it whole, give
    back part of it, leave it (the decision says which :class:`Outcome` that is), or
    end the pass (nothing more is needed)."""

    CULL, TRIM, SKIP, STOP = "cull", "trim", "skip", "stop"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: why, in a few words, for the log
    reason: str
    #: for SKIP: the outcome it stands for
    outcome: Outcome | None = None
    #: for TRIM: about how many bytes to give back
    trim_bytes: int = 0


STOP = Decision(Action.STOP, "enough freed")
NOT_NEEDED = Decision(Action.SKIP, "its volume is within its cap", Outcome.NOT_NEEDED)
PINNED = Decision(Action.SKIP, "a pin rule keeps it", Outcome.PINNED)
IN_USE = Decision(Action.SKIP, "a kernel object uses it", Outcome.IN_USE)
KERNEL_ASKS = Decision(Action.CULL, "the kernel asks for space")


def _nothing_pinned(_cand: Candidate) -> bool:
    return False


@dataclass(frozen=True)
class Needs:
    """What a pass must free."""

    bytes: int = 0
    objects: int = 0
    #: bytes above its cap, per volume directory (``I...``)
    volumes: Mapping[str, int] = field(default_factory=dict)
    #: classic mode's kernel-driven pass: keep going until the caller stops the pass
    #: (the kernel's ``cull`` flag clears); byte and object counts do not end it
    until_stopped: bool = False

    @property
    def any(self) -> bool:
        return (
            self.until_stopped
            or self.bytes > 0
            or self.objects > 0
            or any(v > 0 for v in self.volumes.values())
        )


@dataclass
class Tally:
    """What one pass (or all passes since start) did, by outcome."""

    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    freed_bytes: int = 0
    #: bytes freed per volume directory
    freed_by_volume: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, outcome: Outcome) -> int:
        return self.counts[outcome]

    @property
    def culled(self) -> int:
        return self.counts[Outcome.CULLED]

    @property
    def trimmed(self) -> int:
        return self.counts[Outcome.TRIMMED]

    @property
    def acted(self) -> int:
        """Objects removed or trimmed."""
        return self.culled + self.trimmed

    @property
    def kept_in_use(self) -> int:
        """Objects left because they are in use (the kernel's EBUSY or the daemon's own
        knowledge)."""
        return self.counts[Outcome.BUSY] + self.counts[Outcome.IN_USE]

    def add(self, other: Tally) -> None:
        for outcome, n in other.counts.items():
            self.counts[outcome] += n
        self.freed_bytes += other.freed_bytes
        for volume, n in other.freed_by_volume.items():
            self.freed_by_volume[volume] = self.freed_by_volume.get(volume, 0) + n

    def as_fields(self) -> dict[str, int]:
        """Flat counters for log lines and stats (``culled=3 busy=1 ...``)."""
        hidden = (Outcome.UNTRIMMABLE, Outcome.NOT_NEEDED)
        return {o.value: n for o, n in self.counts.items() if o not in hidden}


class CullPlan:
    """Decides candidate by candidate toward ``needs``; see the module docstring.

    ``volume_of`` names a candidate's volume directory (for per-volume caps);
    ``pinned`` and ``in_use`` are the frontend's rules over its candidates."""

    def __init__(
        self,
        needs: Needs,
        *,
        volume_of: Callable[[Candidate], str],
        pinned: Callable[[Candidate], bool] | None = None,
        in_use: Callable[[Candidate], bool] = lambda _cand: False,
        trim: bool = False,
    ) -> None:
        self.needs = needs
        self.volume_of = volume_of
        #: None: nothing is pinned
        self._pinned = pinned or _nothing_pinned
        self._in_use = in_use
        self._trim = trim
        self._over = {v: n for v, n in needs.volumes.items() if n > 0}
        self.tally = Tally()
        self._kernel_driven = needs.until_stopped and not self._over
        #: bytes freed per volume are kept for passes with byte needs (caps rounds use
        #: them); a kernel-driven pass stops on the kernel's word and skips the cost
        self._per_volume = not self._kernel_driven

    @property
    def done(self) -> bool:
        return self._globally_done() and not self._over

    def _globally_done(self) -> bool:
        if self.needs.until_stopped:
            return False
        return (
            self.tally.freed_bytes >= self.needs.bytes and self.tally.culled >= self.needs.objects
        )

    def still_needed(self, volume: str) -> int:
        """Bytes still to free that removing an object of ``volume`` would count for."""
        return max(self.needs.bytes - self.tally.freed_bytes, self._over.get(volume, 0))

    def uniform(self) -> Decision | None:
        """The decision every candidate gets, when it does not depend on the candidate:
        a kernel-driven pass with no pins culls everything until the kernel says stop.
        The shared loop then skips :meth:`decide` (one call less per cull)."""
        return KERNEL_ASKS if self._kernel_driven and self._pinned is _nothing_pinned else None

    def decide(self, cand: Candidate) -> Decision:
        if self._kernel_driven:  # classic mode's fast path: pins only
            if self._pinned(cand):
                return PINNED
            return KERNEL_ASKS
        volume = self.volume_of(cand) if self._over else ""
        if self._globally_done() and volume not in self._over:
            return NOT_NEEDED if self._over else STOP
        if self._pinned(cand):
            return PINNED
        if self._in_use(cand):
            return IN_USE
        if self._trim and self.tally.culled >= self.needs.objects:
            still = self.still_needed(volume)
            if should_trim(cand.blocks * 512, still):
                return Decision(
                    Action.TRIM, "much larger than what is still needed", trim_bytes=still
                )
        return Decision(Action.CULL, self._why(volume))

    def _why(self, volume: str) -> str:
        if self._globally_done():
            return "its volume is over its cap"
        if self.tally.culled < self.needs.objects:
            return "too many objects"
        return "bytes to free"

    def record(self, cand: Candidate, outcome: Outcome, freed: int = 0) -> None:
        """The decision about ``cand`` was carried out with ``outcome``, freeing
        ``freed`` bytes."""
        tally = self.tally
        tally.counts[outcome] += 1
        if not freed:
            return
        tally.freed_bytes += freed
        if self._per_volume:
            volume = self.volume_of(cand)
            tally.freed_by_volume[volume] = tally.freed_by_volume.get(volume, 0) + freed
            if volume in self._over:
                self._over[volume] -= freed
                if self._over[volume] <= 0:
                    del self._over[volume]
