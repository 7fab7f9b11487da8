"""Read-ahead that follows sequential streams and stays out of random access (pure).

What the daemon can see: only misses. The kernel sends a READ for a range of the cache
file it found absent; hits never reach us. When a reader streams through a file, its
READs therefore arrive at increasing offsets, each one starting where the bytes already
present (or being fetched) end, since the kernel asks only for holes. When it reads at
random, READs land anywhere.

So the daemon keeps, per blob, a few *stream cursors*, like the kernel keeps one
read-ahead state per open file — but one blob is a whole EROFS image whose files may be
read at the same time, hence several cursors. A READ that starts inside a cursor's
span, or within ``slack`` bytes past its end, continues that stream: the stream's
window doubles (from ``first_window`` up to ``max_window``) and the bytes after the
READ are prefetched. Any other READ starts a new cursor (the least recently used one
is forgotten) and gets **no** read-ahead: a random 4 KiB read costs one chunk, not
megabytes that compete with other readers' misses.

The module only decides; :class:`cachefilesd_py.engine.service.Engine` fetches. It is
not thread-safe: the engine calls it under the blob's lock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Cursor:
    #: start of the stream's latest READ
    low: int
    #: end of what the stream has asked for or had prefetched
    high: int
    #: current read-ahead window in bytes (0: not yet known to be sequential)
    window: int = 0


@dataclass(frozen=True)
class Prefetch:
    """Fetch ``length`` bytes from ``offset`` ahead of the reader."""

    offset: int
    length: int

    def end(self) -> int:
        return self.offset + self.length


class StreamReadahead:
    """Decides, READ by READ, how much of one blob to fetch ahead."""

    def __init__(
        self,
        max_window: int,
        *,
        first_window: int,
        slack: int,
        streams: int = 8,
    ) -> None:
        if streams < 1:
            raise ValueError("at least one stream cursor")
        self.max_window = max(0, max_window)
        self.first_window = max(1, min(first_window, self.max_window or 1))
        self.slack = max(0, slack)
        self.streams = streams
        #: most recently used last
        self._cursors: list[_Cursor] = []

    def on_read(self, offset: int, length: int, size: int) -> Prefetch | None:
        """The kernel asked for ``[offset, offset+length)`` of a ``size``-byte blob;
        what to prefetch after it, if anything."""
        end = min(offset + max(length, 0), size)
        cursor = self._find(offset)
        if cursor is None:
            cursor = _Cursor(low=offset, high=max(end, offset))
            self._remember(cursor)
            if offset != 0:
                return None
        else:
            self._cursors.remove(cursor)
            self._cursors.append(cursor)
            cursor.low = offset
        if self.max_window == 0:
            cursor.high = max(cursor.high, end)
            return None
        cursor.window = min(self.max_window, cursor.window * 2 or self.first_window)
        ahead_end = min(size, end + cursor.window)
        cursor.high = max(cursor.high, end, ahead_end)
        if ahead_end <= end:
            return None
        return Prefetch(end, ahead_end - end)

    def _find(self, offset: int) -> _Cursor | None:
        for cursor in reversed(self._cursors):
            if cursor.low <= offset <= cursor.high + self.slack:
                return cursor
        return None

    def _remember(self, cursor: _Cursor) -> None:
        self._cursors.append(cursor)
        if len(self._cursors) > self.streams:
            del self._cursors[0]

    @property
    def windows(self) -> list[int]:
        """Current windows, least recently used first (for tests and status)."""
        return [c.window for c in self._cursors]
