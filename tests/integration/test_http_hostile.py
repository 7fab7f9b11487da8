"""HTTP sources against hostile or unusual origins (issue 10): validators of every
kind, deadlines that hold for the whole exchange, bounded sizes and bodies, redirects,
bad header values, bounded connections. Every case ends in correct bytes or a
``SourceError``; none in wrong bytes, another exception or a wait past the deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from cachefilesd_py.errors import IdentityChanged, SourceError
from cachefilesd_py.sources.base import Source
from cachefilesd_py.sources.http import HttpSource
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.policy import Deadline, RetryPolicy
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

A = pattern_bytes(1, 0, 300_000)
B = pattern_bytes(2, 0, 300_000)  # the same size: a rewrite in place


def fetch(src: Source, off: int, n: int, deadline: float = 10) -> bytes:
    buf = bytearray(b"\xee" * n)
    src.fetch_into(off, memoryview(buf), Deadline.after(deadline))
    return bytes(buf)


@pytest.fixture
def factory() -> Iterator[SourceFactory]:
    f = SourceFactory(SourceSettings(retries=2, timeout=30, pool_size=4))
    yield f
    f.close()


def open_blob(factory: SourceFactory, srv: FaultServer, name: str = "b") -> Source:
    return factory.open(f"{srv.url}/{name}")


# -- item 1: every validator the origin gives -------------------------------------------


def test_last_modified_only_origin_never_mixes_versions(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, validators="last-modified") as srv:
        src = open_blob(factory, srv)
        ident = src.identity(Deadline.after(5))
        assert ident.etag is None and ident.last_modified is not None
        assert str(ident.last_modified) in ident.token()
        assert fetch(src, 0, 65536) == A[:65536]
        assert srv.request_headers[-1].get("If-Unmodified-Since")
        srv.replace("b", B)  # same size, Last-Modified one second later
        for off in range(65536, len(A), 65536):
            with pytest.raises(IdentityChanged):
                fetch(src, off, 4096)
        # a new OPEN learns the new version, with another token
        again = open_blob(factory, srv)
        assert again.identity(Deadline.after(5)).token() != ident.token()
        assert fetch(again, 0, len(B)) == B


def test_rolled_back_copy_with_an_older_date_is_refused(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, validators="last-modified") as srv:
        src = open_blob(factory, srv)
        lm = src.identity(Deadline.after(5)).last_modified
        assert lm is not None
        # If-Unmodified-Since lets an older date through: the answer's own
        # Last-Modified must be the pinned one
        srv.replace("b", B, last_modified=lm - 100)
        with pytest.raises(IdentityChanged):
            fetch(src, 0, 4096)


def test_weak_etag_does_not_fail_every_read(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, validators="weak-etag+last-modified") as srv:
        src = open_blob(factory, srv)
        ident = src.identity(Deadline.after(5))
        assert ident.etag is not None and ident.etag.startswith("W/")
        assert fetch(src, 1000, 50_000) == A[1000:51_000]
        sent = srv.request_headers[-1]
        assert "If-Match" not in sent and "If-Unmodified-Since" in sent
        srv.replace("b", B)
        with pytest.raises(IdentityChanged):
            fetch(src, 0, 4096)


@pytest.mark.parametrize("mode", ["none", "weak-etag"])
def test_origin_without_a_usable_validator_is_refused(factory: SourceFactory, mode: str) -> None:
    with FaultServer({"b": A}, validators=mode) as srv:
        with pytest.raises(SourceError) as e:
            open_blob(factory, srv).identity(Deadline.after(5))
        assert e.value.reason == "no-validator" and not e.value.transient


def test_fresh_last_modified_is_not_a_validator_yet(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, validators="last-modified") as srv:
        srv.replace("b", A, last_modified=time.time() - 5)
        with pytest.raises(SourceError, match="60 s") as e:
            open_blob(factory, srv).identity(Deadline.after(5))
        assert e.value.reason == "no-validator"


def test_strong_etag_is_sent_and_checked(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, validators="etag+last-modified") as srv:
        src = open_blob(factory, srv)
        ident = src.identity(Deadline.after(5))
        assert fetch(src, 0, 10) == A[:10]
        assert srv.request_headers[-1]["If-Match"] == ident.etag
        srv.fault("b", "etag")  # an answer with another ETag
        with pytest.raises(IdentityChanged):
            fetch(src, 0, 10)


# -- item 12: identity learnt again at each OPEN, pinned while open ----------------------


def test_identity_is_learnt_per_open_and_pinned(factory: SourceFactory) -> None:
    with FaultServer({"b": A}) as srv:
        first = open_blob(factory, srv)
        assert first.identity(Deadline.after(5)).size == len(A)
        srv.replace("b", A + b"tail", '"v2"')
        # the open blob keeps its identity and refuses the new version
        assert first.identity(Deadline.after(5)).size == len(A)
        with pytest.raises(IdentityChanged):
            fetch(first, 0, 100)
        # the next OPEN sees the new size at once (no restart needed)
        second = open_blob(factory, srv)
        assert second.identity(Deadline.after(5)).size == len(A) + 4
        assert fetch(second, len(A), 4) == b"tail"


def test_header_values_outside_latin1_are_a_source_error() -> None:
    f = SourceFactory(SourceSettings(headers_for=lambda url: {"Authorization": "Bearer ü€"}))
    with FaultServer({"b": A}) as srv:
        with pytest.raises(SourceError) as e:
            f.open(f"{srv.url}/b").identity(Deadline.after(5))
        assert e.value.reason == "bad-header"
        with pytest.raises(SourceError) as e:
            f.open(f"{srv.url}/b").fetch_into(0, memoryview(bytearray(4)), Deadline.after(5))
        assert e.value.reason == "bad-header"
    f.close()


def test_configured_headers_cannot_override_the_protocol(factory: SourceFactory) -> None:
    with FaultServer({"b": A}) as srv:
        src = HttpSource(
            f"{srv.url}/b",
            pool=factory._http_pools()[0],
            headers={"range": "bytes=0-99999", "X-Token": "t", "If-Match": '"x"'},
        )
        assert fetch(src, 10, 10) == A[10:20]
        sent = srv.request_headers[-1]
        assert sent["Range"] == "bytes=10-19" and sent["X-Token"] == "t"
        assert sent["If-Match"] != '"x"'


# -- item 6: deadlines hold for the whole exchange ----------------------------------------


def test_trickled_body_ends_at_the_deadline(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, trickle_seconds=0.05) as srv:
        src = open_blob(factory, srv)
        src.identity(Deadline.after(5))
        srv.fault("b", "trickle-body", times=10)  # 4096 bytes would take 200 s
        start = time.monotonic()
        with pytest.raises(SourceError) as e:
            fetch(src, 0, 4096, deadline=1.5)
        took = time.monotonic() - start
        assert e.value.reason == "deadline"
        assert took < 1.5 + 1.0, f"a 1.5 s deadline held the fetch {took:.1f} s"


def test_trickled_headers_end_at_the_deadline(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, trickle_seconds=0.5) as srv:
        srv.fault("b", "trickle", times=10)  # 1 byte / 0.5 s, as in the issue
        start = time.monotonic()
        with pytest.raises(SourceError):
            open_blob(factory, srv).identity(Deadline.after(2))
        took = time.monotonic() - start
        assert took < 2 + 1.0, f"a 2 s identity deadline held {took:.1f} s"


def test_a_deadline_does_not_poison_the_pool(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, trickle_seconds=0.05) as srv:
        src = open_blob(factory, srv)
        src.identity(Deadline.after(5))
        srv.fault("b", "trickle-body", times=1)
        with pytest.raises(SourceError):
            fetch(src, 0, 4096, deadline=0.5)
        for off in range(0, 200_000, 40_000):  # the next fetches are correct
            assert fetch(src, off, 40_000) == A[off : off + 40_000]


# -- item 9: sizes and bodies are bounded ------------------------------------------------


def test_huge_content_length_is_refused(factory: SourceFactory) -> None:
    with FaultServer({"b": A}) as srv:
        srv.fault("b", "huge")
        with pytest.raises(SourceError) as e:
            open_blob(factory, srv).identity(Deadline.after(5))
        assert e.value.reason == "too-large"


def test_range_fallback_never_preloads_a_body(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, flood_bytes=512 << 20) as srv:
        srv.fault("b", "no-length")  # HEAD without Content-Length → Range: bytes=0-0
        srv.fault("b", "flood")  # ... answered by a 200 with 512 MiB
        with pytest.raises(SourceError) as e:
            open_blob(factory, srv).identity(Deadline.after(10))
        assert e.value.reason == "no-range"
        time.sleep(0.2)
        assert srv.sent["b"] < 32 << 20, f"{srv.sent['b']} bytes of the body were pulled"


def test_range_fallback_learns_the_size(factory: SourceFactory) -> None:
    with FaultServer({"b": A}) as srv:
        srv.fault("b", "no-length")
        src = open_blob(factory, srv)
        assert src.identity(Deadline.after(5)).size == len(A)
        assert fetch(src, 7, 7) == A[7:14]


def test_200_for_a_range_is_not_read(factory: SourceFactory) -> None:
    with FaultServer({"b": A}, flood_bytes=512 << 20) as srv:
        src = open_blob(factory, srv)
        src.identity(Deadline.after(5))
        srv.fault("b", "flood")
        with pytest.raises(SourceError) as e:
            fetch(src, 0, 4096)
        assert e.value.reason == "not-partial"
        time.sleep(0.2)
        assert srv.sent["b"] < 32 << 20
        assert fetch(src, 0, 4096) == A[:4096]


# -- redirects, connections ------------------------------------------------------------


def test_redirects_are_not_followed(factory: SourceFactory) -> None:
    with FaultServer({"b": A, "moved": B}) as srv:
        srv.fault("b", "redirect")
        with pytest.raises(SourceError) as e:
            open_blob(factory, srv).identity(Deadline.after(5))
        assert e.value.reason == "redirect"
        assert not any(name == "moved" for _m, name, _r in srv.requests)


def test_connections_per_origin_are_bounded_and_waits_end_at_the_deadline() -> None:
    f = SourceFactory(SourceSettings(pool_size=1, retries=0))
    with FaultServer({"b": A}, stall_seconds=3) as srv:
        srv.fault("b", "stall")
        first, second = f.open(f"{srv.url}/b"), f.open(f"{srv.url}/b")
        first.identity(Deadline.after(5))
        second.identity(Deadline.after(5))
        srv.fault("b", "stall")
        errors: list[BaseException] = []

        def slow() -> None:
            try:
                fetch(first, 0, 10, deadline=10)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)  # the one connection is now busy with the stalled answer
        start = time.monotonic()
        with pytest.raises(SourceError) as e:
            fetch(second, 0, 10, deadline=1)
        assert e.value.reason in ("pool-wait", "deadline")
        assert time.monotonic() - start < 2
        t.join(10)
        assert not errors
        # identities have their own connections: an OPEN never waits behind fills
        srv.fault("b", "stall")
        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        start = time.monotonic()
        f.open(f"{srv.url}/b").identity(Deadline.after(2))
        assert time.monotonic() - start < 1.5
        t.join(10)
    f.close()


def test_fetches_in_flight_are_bounded_in_total() -> None:
    f = SourceFactory(SourceSettings(max_inflight=1, retries=0))
    with FaultServer({"b": A}, stall_seconds=2) as srv:
        a, b = f.open(f"{srv.url}/b"), f.open(f"{srv.url}/b")
        a.identity(Deadline.after(5))
        b.identity(Deadline.after(5))
        srv.fault("b", "stall")
        t = threading.Thread(target=lambda: fetch(a, 0, 10))
        t.start()
        time.sleep(0.3)
        with pytest.raises(SourceError) as e:
            fetch(b, 0, 10, deadline=0.5)
        assert e.value.reason == "busy"
        t.join(10)
        assert fetch(b, 0, 10) == A[:10]
    f.close()


def test_retries_still_recover(factory: SourceFactory) -> None:
    with FaultServer({"b": A}) as srv:
        src = HttpSource(
            f"{srv.url}/b",
            pool=factory._http_pools()[0],
            retry=RetryPolicy(total=3, backoff=0.01),
        )
        src.identity(Deadline.after(5))
        for kind in ("500", "reset", "truncate", "bad-range", "long"):
            srv.fault("b", kind)
            assert fetch(src, 5000, 20_000) == A[5000:25_000], kind
