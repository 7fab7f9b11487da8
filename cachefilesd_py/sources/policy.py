"""Pure policy values for fetching: deadlines and retries (urllib3's ``Retry`` idea:
immutable objects that decide, while the loop only asks)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cachefilesd_py.errors import SourceError


@dataclass(frozen=True)
class Deadline:
    """A point in monotonic time by which an operation must be done."""

    at: float
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.at


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried.

    ``next(error)`` returns the policy for the next attempt, or re-raises ``error``
    when it is permanent or the attempts are used up.
    """

    total: int = 3
    backoff: float = 0.1
    backoff_max: float = 2.0
    jitter: float = 0.1
    attempt: int = 0

    def next(self, error: SourceError) -> RetryPolicy:
        if not error.transient or self.attempt >= self.total:
            raise error
        return replace(self, attempt=self.attempt + 1)

    def sleep_for(self, rng: Callable[[], float] = random.random) -> float:
        if self.attempt == 0:
            return 0.0
        base = min(self.backoff_max, self.backoff * float(2 ** (self.attempt - 1)))
        return float(base + self.jitter * base * rng())
