"""The offline policy value: what a READ of missing bytes does while its source is
offline (tables), and which rule applies to a blob."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.engine.offline_policy import (
    FailNow,
    Fetch,
    Mode,
    OfflinePolicies,
    OfflinePolicy,
    Pin,
    ReadSituation,
    WaitUntil,
    decide,
)
from cachefilesd_py.sources.online import Status

ERROR = OfflinePolicy(Mode.ERROR)
WAIT60 = OfflinePolicy(Mode.WAIT, 60.0)
OFF = Status.OFFLINE


@pytest.mark.parametrize(
    ("policy", "read", "answer"),
    [
        # not offline: fetch, whatever the policy
        (ERROR, ReadSituation(Status.ONLINE), Fetch()),
        (WAIT60, ReadSituation(Status.UNKNOWN), Fetch()),
        # offline but the tracker admits a probe: fetch
        (ERROR, ReadSituation(OFF, admitted=True), Fetch()),
        # error: at once
        (ERROR, ReadSituation(OFF, "link eth0 down"), FailNow("source offline (link eth0 down)")),
        (ERROR, ReadSituation(OFF), FailNow("source offline")),
        # wait: until the cap, counted from when the READ was first held
        (WAIT60, ReadSituation(OFF, "x", now=100.0), WaitUntil(160.0, "source offline (x)")),
        (WAIT60, ReadSituation(OFF, "x", waited=45.0, now=145.0),
         WaitUntil(160.0, "source offline (x)")),
        (WAIT60, ReadSituation(OFF, "x", waited=60.0, now=160.0),
         FailNow("source offline (x); waited 60.0 s, the cap")),
        # pinned blobs and metadata never wait
        (WAIT60, ReadSituation(OFF, "x", pin=Pin.PINNED),
         FailNow("source offline (x); pinned data not all present")),
        (WAIT60, ReadSituation(OFF, "x", metadata=True),
         FailNow("source offline (x); metadata reads never wait")),
        (ERROR, ReadSituation(OFF, "x", pin=Pin.PINNED, metadata=True),
         FailNow("source offline (x); pinned data not all present")),
        # ... but a pinned blob of an online source is fetched as usual
        (WAIT60, ReadSituation(Status.ONLINE, pin=Pin.PINNED, metadata=True), Fetch()),
    ],
)
def test_decide(policy: OfflinePolicy, read: ReadSituation, answer: object) -> None:
    assert decide(policy, read) == answer


def test_failures_are_eio() -> None:
    answer = decide(ERROR, ReadSituation(OFF))
    assert isinstance(answer, FailNow) and answer.errno == errno.EIO


@given(st.floats(1, 3600), st.floats(0, 7200), st.floats(0, 1e6))
def test_a_wait_never_ends_after_the_cap(cap: float, waited: float, now: float) -> None:
    answer = decide(OfflinePolicy(Mode.WAIT, cap), ReadSituation(OFF, waited=waited, now=now))
    if waited >= cap:
        assert isinstance(answer, FailNow)
    else:
        assert isinstance(answer, WaitUntil)
        assert now < answer.deadline <= now + cap + 1e-6
        # the READ's whole hold (already waited + still to wait) is the cap
        assert answer.deadline - now + waited == pytest.approx(cap)


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("error", ERROR),
        ("wait 60", WAIT60),
        ("wait 60s", WAIT60),
        ("wait 1m", WAIT60),
        ("wait 1.5h", OfflinePolicy(Mode.WAIT, 5400.0)),
    ],
)
def test_parse(text: str, policy: OfflinePolicy) -> None:
    assert OfflinePolicy.parse(text) == policy
    assert OfflinePolicy.parse(str(policy)) == policy


@pytest.mark.parametrize(
    "text", ["", "wait", "wait 0", "wait -1", "wait 2d", "wait 25h", "error 5", "retry", "wait 5 m"]
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        OfflinePolicy.parse(text)


def test_rules_first_match_wins_and_switch_at_run_time() -> None:
    table = OfflinePolicies.of([("ci-*/*", "error"), ("*/*", "wait 5m")], default="error")
    assert table.for_blob("ci-images", "base.img") == ERROR
    assert table.for_blob("desktop", "home.img") == OfflinePolicy(Mode.WAIT, 300)
    # switching a rule replaces it where it stands
    switched = table.with_rule("ci-*/*", WAIT60)
    assert switched.for_blob("ci-images", "base.img") == WAIT60
    assert [r.pattern for r in switched.rules] == ["ci-*/*", "*/*"]
    # a new rule goes in front
    pinned_vol = table.with_rule("desktop/*", ERROR)
    assert pinned_vol.for_blob("desktop", "home.img") == ERROR
    # the old value is untouched
    assert table.for_blob("ci-images", "base.img") == ERROR
    assert OfflinePolicies().for_blob("a", "b") == ERROR
