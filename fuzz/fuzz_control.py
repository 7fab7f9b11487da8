"""Control requests (``control/schema.py``) from arbitrary bytes.

``TestOneInput(data)`` parses ``data`` as a request line; the only outcomes allowed are
a :class:`Request` of a known operation whose arguments have their table's types, or a
:class:`ControlError` whose reply line encodes and parses back. Anything else (another
exception, a reply the client cannot read) is a defect.

Run with atheris (``pip install atheris``; not a test dependency)::

    python fuzz/fuzz_control.py -atheris_runs=200000 fuzz/corpus/control

or without it, over the corpus only: ``python fuzz/fuzz_control.py fuzz/corpus/control``.
The same function runs in the host tier over the corpus
(``tests/integration/test_control_server.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cachefilesd_py.control.schema import (
    OPERATIONS,
    ControlError,
    Reply,
    encode_error,
    parse_reply,
    parse_request,
)


def TestOneInput(data: bytes) -> None:  # the name atheris calls
    try:
        req = parse_request(data)
    except ControlError as err:
        reply = parse_reply(encode_error(err))
        assert isinstance(reply, Reply) and not reply.ok and reply.error is not None
        assert reply.error.code is err.code
        return
    op = OPERATIONS[req.op]
    assert set(req.args) == set(op.args), (req.args, op.args)
    for name, spec in op.args.items():
        value = req.args[name]
        assert value is None or type(value) is spec.kind, (name, value)


def main(argv: list[str]) -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        paths = [Path(a) for a in argv[1:] if not a.startswith("-")]
        for p in paths:
            for f in sorted(p.iterdir()) if p.is_dir() else [p]:
                TestOneInput(f.read_bytes())
        return
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
