"""Fuzz harness: the fanotify event decoder on arbitrary bytes.

    TestOneInput(data)        one input (the atheris / libFuzzer convention)
    python fuzz/fuzz_fanotify_wire.py [libFuzzer args]   with atheris, if installed

Whatever ``read()`` of a fanotify group could return, ``decode_events`` either returns
events or raises ``MalformedEvent`` (a ``KernelProtocolError``), never anything else,
and what it returns is consistent: every event lies inside the input, the events
reported with an error are a prefix of what a clean decode of the bytes before the bad
record gives, and re-encoding clean events gives the input back when it has no unknown
info records. tests/unit/test_fanotify_wire.py runs this with hypothesis.
"""

from __future__ import annotations

import sys

from cachefilesd_py.frontends.fanotify import wire


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the fuzzing engines' name
    try:
        events = wire.decode_events(data)
    except wire.MalformedEvent as exc:
        assert 0 <= exc.offset < max(len(data), 1), exc.offset
        assert exc.fd is None or exc.fd >= 0
        assert wire.decode_events(data[: exc.offset]) == list(exc.events)
        return
    total = 0
    for e in events:
        assert 0 <= e.mask < 2**64
        if e.range is not None:
            assert 0 <= e.range.offset < 2**64 and 0 <= e.range.count < 2**64
        total += wire.METADATA.size + (wire.RANGE_INFO.size if e.range else 0)
    assert total <= len(data)
    if all(not e.skipped_info for e in events) and total == len(data):
        # only kernel-shaped records: the encoder writes them back byte for byte, up to
        # the fields the decoder ignores (reserved and pad bytes)
        rebuilt = b"".join(wire.encode_event(e.mask, e.fd, e.pid, e.range) for e in events)
        assert wire.decode_events(rebuilt) == events


def main() -> None:
    import atheris  # type: ignore[import-not-found]

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
