"""The HTTP answer fuzz harness (``fuzz/fuzz_http_response.py``) in CI: mutations of
its seeds drawn by hypothesis that know the script's layout (its whole corpus is
replayed with every other harness's by ``tests/unit/test_fuzz_harnesses.py``). The
harness raises when an answer made the source report wrong bytes as good, raise
anything but a ``SourceError``, or outlive its deadline. Long runs use atheris (see
``docs/security.md``, "Sources")."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.fuzz_http_response import TestOneInput

SEEDS = sorted((Path(__file__).parents[2] / "fuzz" / "corpus" / "http_response").iterdir())
#: pieces a server might put in an answer head, for insertions
TOKENS = [
    "\n", "\r\n", ":", " ", "0", "9", "-", "/", ",", '"', "W/", "*", "\0", "\xff", "²",
    "HTTP/1.0 ", "206", "200", "416", "Content-Length: ", "Content-Range: bytes ",
    "Transfer-Encoding: chunked\n", "Connection: close\n", "ETag: ", "Last-Modified: ",
    "{a}", "{b}", "{total}", "{len}", "{etag}", "{lm}", "{date}", "99999999999999999999",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)).read_bytes())
    # stalls cost a deadline each: rare here, every seed has one
    data[0] = draw(st.integers(0, 255)) & ~4 if draw(st.integers(0, 9)) else data[0] | 4
    data[1] = draw(st.integers(0, 255))
    data[2] = draw(st.integers(0, 255))
    for _ in range(draw(st.integers(1, 4))):
        if len(data) <= 3:
            break
        at = draw(st.integers(3, len(data) - 1))
        op = draw(st.integers(0, 2))
        if op == 0:
            del data[at : at + draw(st.integers(1, 12))]
        elif op == 1:
            data[at:at] = draw(st.sampled_from(TOKENS)).encode("latin-1")
        else:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations(data: bytes) -> None:
    TestOneInput(data)
