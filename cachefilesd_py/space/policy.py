"""Cull policies: pure, swappable, registered by name.

What the daemon can observe decides what a policy can use:

- on-demand mode sees each OPEN (a mount or re-open of a blob) and each READ (a
  *miss*); hits are served by the kernel from the cache file or the page cache and are
  invisible. ``touch`` is therefore called on OPEN and READ.
- classic mode sees only the cache tree: each scan reports an object's atime, which
  the kernel updates on lookup (subject to the cache filesystem's atime options);
  ``touch`` is called when a scan sees a newer atime.

Policies:

- ``fifo``: evict in insertion order;
- ``lru``: evict the least recently touched;
- ``s3fifo``: S3-FIFO (Yang et al., SOSP 2023): new objects enter a small FIFO (10 %);
  objects touched again while there move to the main FIFO, the others are evicted
  early (one-hit wonders, scans); the main FIFO gives a second chance to objects
  touched since they entered it; a ghost FIFO remembers recently evicted keys so a
  returning key goes straight to main. Scan resistant at FIFO cost.

Pinned keys are never returned as victims.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol

Key = Hashable


class CullPolicy(Protocol):
    def admit(self, key: Key, size: int) -> None: ...
    def touch(self, key: Key) -> None: ...
    def remove(self, key: Key) -> None: ...
    def victims(self, exempt: Callable[[Key], bool]) -> Iterator[Key]: ...
    def __len__(self) -> int: ...


class FifoPolicy:
    def __init__(self) -> None:
        self._order: OrderedDict[Key, int] = OrderedDict()

    def admit(self, key: Key, size: int) -> None:
        if key not in self._order:
            self._order[key] = size

    def touch(self, key: Key) -> None:
        pass

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victims(self, exempt: Callable[[Key], bool]) -> Iterator[Key]:
        for key in list(self._order):
            if key in self._order and not exempt(key):
                yield key

    def __len__(self) -> int:
        return len(self._order)


class LruPolicy(FifoPolicy):
    def touch(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)


class S3FifoPolicy:
    def __init__(self, small_ratio: float = 0.1, ghost_factor: float = 0.9) -> None:
        self.small_ratio = small_ratio
        self.ghost_factor = ghost_factor
        self._small: OrderedDict[Key, int] = OrderedDict()
        self._main: OrderedDict[Key, int] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def admit(self, key: Key, size: int) -> None:
        if key in self._small or key in self._main:
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = size
        else:
            self._small[key] = size

    def touch(self, key: Key) -> None:
        if key in self._freq:
            self._freq[key] = min(3, self._freq[key] + 1)

    def remove(self, key: Key) -> None:
        self._small.pop(key, None)
        self._main.pop(key, None)
        self._freq.pop(key, None)

    def _remember(self, key: Key) -> None:
        self._ghost[key] = None
        limit = max(16, int(len(self) * self.ghost_factor))
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)

    def victims(self, exempt: Callable[[Key], bool]) -> Iterator[Key]:
        """Eviction order; each call to ``next`` picks the next victim from the current
        state (the caller removes or keeps it by calling ``remove``)."""
        skipped: set[Key] = set()
        while True:
            victim = self._pick(exempt, skipped)
            if victim is None:
                # the second-chance walk gave up (its step budget ran out on touched or
                # exempt keys): the rest, in queue order, so no evictable key is missed
                victim = next(
                    (k for k in (*self._small, *self._main) if k not in skipped and not exempt(k)),
                    None,
                )
            if victim is None:
                return
            skipped.add(victim)
            yield victim

    def _pick(self, exempt: Callable[[Key], bool], skipped: set[Key]) -> Key | None:
        budget = 4 * (len(self) + 1)
        while budget > 0 and (self._small or self._main):
            budget -= 1
            small_target = max(1, int(len(self) * self.small_ratio))
            queue = (
                self._small if (len(self._small) >= small_target or not self._main) else self._main
            )
            if not queue:
                queue = self._small or self._main
            key, size = next(iter(queue.items()))
            if key in skipped or exempt(key):
                queue.move_to_end(key)
                if all(k in skipped or exempt(k) for k in (*self._small, *self._main)):
                    return None
                continue
            if queue is self._small:
                del self._small[key]
                if self._freq.get(key, 0) > 0:
                    self._freq[key] = 0
                    self._main[key] = size
                    continue
                self._small[key] = size  # stays until the caller removes it
                self._small.move_to_end(key, last=False)
                self._remember(key)
                return key
            if self._freq.get(key, 0) > 0:
                self._freq[key] -= 1
                queue.move_to_end(key)
                continue
            return key
        return None


POLICIES: dict[str, Callable[[], CullPolicy]] = {
    "fifo": FifoPolicy,
    "lru": LruPolicy,
    "s3fifo": S3FifoPolicy,
}


def make_policy(name: str) -> CullPolicy:
    return POLICIES[name]()
