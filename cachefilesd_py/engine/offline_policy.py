"""What a READ of missing bytes does while its source is offline: a pure policy value.

Two policies, chosen per source or per volume (first matching rule wins):

- ``error``: the READ completes at once, unfilled, and the reader gets ``EIO``. For
  batch jobs and for anything that has a fallback: failing fast beats hanging.
- ``wait CAP``: the READ is held until the source is back online, at most ``CAP``
  seconds in all, then fails like ``error``. For interactive use on a flaky link:
  the reader blocks (in ``D`` state, as on a slow disk) instead of failing.

The engine asks :func:`decide` each time it looks at a READ it cannot serve from the
cache (when it arrives, whenever the source's state changes, and at the deadline the
last answer gave). The answer is one of :class:`Fetch` (the source is not known to be
offline, or a probe is due: try it), :class:`FailNow`, or :class:`WaitUntil`.

Two things override the policy:

- **Pinned and present** bytes never get here: they are served from the cache
  whatever the network says. A READ of a *pinned* blob that finds bytes missing
  anyway (the pin's fetch had not finished when the network went) fails at once
  under every policy: a pin promises the data works offline, and a pinned image's
  ``ls``/``stat`` must never hang, so the daemon says at once that it cannot keep
  that promise (and logs it) instead of blocking the reader.
- A READ of the image's **metadata** (superblock, inodes, directories: the ranges
  ``erofs/layout.py`` names) does not wait either: a mount, ``ls`` or ``stat`` that
  hangs for minutes is worse than one that fails.

Nothing here reads a clock; ``waited`` and ``now`` are passed in (monotonic seconds).
"""

from __future__ import annotations

import enum
import errno
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from cachefilesd_py.sources.online import Status

MAX_WAIT_CAP = 86400.0


class Mode(enum.Enum):
    ERROR = "error"
    WAIT = "wait"


class Pin(enum.Enum):
    NONE = "none"
    PINNED = "pinned"


@dataclass(frozen=True)
class OfflinePolicy:
    mode: Mode = Mode.ERROR
    wait_cap: float = 0.0  # seconds; only for WAIT

    def __post_init__(self) -> None:
        if self.mode is Mode.WAIT and not 0 < self.wait_cap <= MAX_WAIT_CAP:
            raise ValueError(f"a wait cap must be within (0, {MAX_WAIT_CAP:.0f}] seconds")
        if self.mode is Mode.ERROR and self.wait_cap:
            raise ValueError("the error policy takes no wait cap")

    @classmethod
    def parse(cls, text: str) -> OfflinePolicy:
        """``error``, or ``wait DURATION`` (``90``, ``90s``, ``5m``, ``1h``)."""
        words = text.split()
        if words == ["error"]:
            return cls(Mode.ERROR)
        if len(words) == 2 and words[0] == "wait":
            return cls(Mode.WAIT, parse_duration(words[1]))
        raise ValueError(f"offline policy must be 'error' or 'wait DURATION', not {text!r}")

    def __str__(self) -> str:
        return "error" if self.mode is Mode.ERROR else f"wait {self.wait_cap:g}s"


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text)
    if not m:
        raise ValueError(f"bad duration {text!r} (e.g. 90, 90s, 5m, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# -- answers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    """Go to the source (it is not known to be offline, or its probe is due)."""


@dataclass(frozen=True)
class FailNow:
    reason: str
    errno: int = errno.EIO


@dataclass(frozen=True)
class WaitUntil:
    """Hold the READ; ask again when the source's state changes, or at ``deadline``."""

    deadline: float
    reason: str


Decision = Fetch | FailNow | WaitUntil


@dataclass(frozen=True)
class ReadSituation:
    status: Status
    offline_reason: str = ""
    admitted: bool = False  # the connectivity tracker admits a fetch now (a probe)
    pin: Pin = Pin.NONE
    metadata: bool = False
    waited: float = 0.0  # seconds this READ has been held so far
    now: float = 0.0


def decide(policy: OfflinePolicy, read: ReadSituation) -> Decision:
    if read.status is not Status.OFFLINE or read.admitted:
        return Fetch()
    why = f"source offline ({read.offline_reason})" if read.offline_reason else "source offline"
    if read.pin is Pin.PINNED:
        return FailNow(f"{why}; pinned data not all present")
    if read.metadata:
        return FailNow(f"{why}; metadata reads never wait")
    if policy.mode is Mode.ERROR:
        return FailNow(why)
    if read.waited >= policy.wait_cap:
        return FailNow(f"{why}; waited {read.waited:.1f} s, the cap")
    return WaitUntil(read.now + policy.wait_cap - read.waited, why)


# -- which policy applies ----------------------------------------------------------------


@dataclass(frozen=True)
class PolicyRule:
    """``pattern`` is an fnmatch glob over ``<volume>/<cookie>`` (the volume without
    its ``erofs,`` prefix), as in the ``source`` rules."""

    pattern: str
    policy: OfflinePolicy


@dataclass(frozen=True)
class OfflinePolicies:
    """The rules (first match wins) and the default; an immutable value, replaced
    whole when a rule is switched at run time."""

    rules: tuple[PolicyRule, ...] = ()
    default: OfflinePolicy = OfflinePolicy()

    @classmethod
    def of(cls, rules: Iterable[tuple[str, str]], default: str = "error") -> OfflinePolicies:
        return cls(
            tuple(PolicyRule(p, OfflinePolicy.parse(t)) for p, t in rules),
            OfflinePolicy.parse(default),
        )

    def for_blob(self, volume: str, cookie: str) -> OfflinePolicy:
        name = f"{volume}/{cookie}"
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.policy
        return self.default

    def with_rule(self, pattern: str, policy: OfflinePolicy) -> OfflinePolicies:
        """The same rules with ``pattern``'s policy set (replaced in place if the
        pattern has a rule, else added in front, so it takes precedence)."""
        kept = tuple(r for r in self.rules if r.pattern != pattern)
        if len(kept) != len(self.rules):
            rules = tuple(
                PolicyRule(pattern, policy) if r.pattern == pattern else r for r in self.rules
            )
            return replace(self, rules=rules)
        return replace(self, rules=(PolicyRule(pattern, policy), *self.rules))
