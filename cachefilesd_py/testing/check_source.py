"""A conformance suite any :class:`Source` must pass (trio's check_*_stream idea).

``check_source(make_source)`` gets a factory that serves given blob bytes and checks
identity (pinned: asking again gives the same), the origin, whole/partial/last-chunk
and empty fetches, concurrent fetches, and that a range past the end or before the
start is a ``SourceError``, never short data and never another exception.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.base import Source
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.testing.pattern import pattern_bytes


def _fetch(src: Source, off: int, n: int) -> bytes:
    buf = bytearray(n)
    src.fetch_into(off, memoryview(buf), Deadline.after(10))
    return bytes(buf)


def check_source(make_source: Callable[[bytes], Source], size: int = 1_000_003) -> None:
    data = pattern_bytes(3, 0, size)
    src = make_source(data)
    try:
        ident = src.identity(Deadline.after(10))
        assert ident.size == size, ident
        assert src.identity(Deadline.after(10)) == ident
        assert isinstance(src.origin, str) and src.origin, src.origin
        assert _fetch(src, 5, 0) == b""
        assert _fetch(src, 0, size) == data
        assert _fetch(src, 4096, 65536) == data[4096 : 4096 + 65536]
        assert _fetch(src, size - 17, 17) == data[-17:]
        ranges = [(i * 40_000, 40_000) for i in range(20)]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda r: _fetch(src, *r), ranges))
        assert got == [data[o : o + n] for o, n in ranges]
        for off, n in ((size - 10, 20), (-1, 10), (size, 1)):
            try:
                _fetch(src, off, n)
            except SourceError:
                pass
            else:
                raise AssertionError(f"range {off}+{n} must raise SourceError")
    finally:
        src.close()
