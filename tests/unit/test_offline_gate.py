"""The engine's offline gate, held READs and the ``offline_policy`` directive."""

from __future__ import annotations

import threading
import time

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.config.render import render_config
from cachefilesd_py.daemon.offline import pinned_by, policies_of, tracked_origins
from cachefilesd_py.engine.offline import HeldReads, OfflineError, OfflineGate
from cachefilesd_py.engine.offline_policy import FailNow, Fetch, OfflinePolicy, WaitUntil
from cachefilesd_py.errors import ConfigError
from cachefilesd_py.sources.online import Status
from cachefilesd_py.testing.connectivity import ScriptedConnectivity

ORIGIN = "http://10.9.0.2:80"


class FakeSource:
    origin = ORIGIN


class FakeBlob:
    def __init__(self, name: bytes = b"b") -> None:
        self.key = BlobKey(b"erofs,vol", name)
        self.source = FakeSource()


def gate(policy: str = "error") -> tuple[OfflineGate, ScriptedConnectivity]:
    net = ScriptedConnectivity([ORIGIN])
    g = OfflineGate(net, frozenset({ORIGIN}))
    g.set_policy(None, OfflinePolicy.parse(policy))
    return g, net


def test_untracked_origins_are_always_fetched() -> None:
    g = OfflineGate()
    assert isinstance(g.decide(FakeBlob(), 0, 4096, 0.0), Fetch)  # type: ignore[arg-type]
    g.admit("file:")  # no connectivity: nothing to refuse


def test_offline_source_is_not_admitted_and_decisions_follow_the_policy() -> None:
    g, net = gate("wait 30")
    blob = FakeBlob()
    assert isinstance(g.decide(blob, 0, 4096, 0.0), Fetch)  # type: ignore[arg-type]
    net.link(ORIGIN, up=False)
    with pytest.raises(OfflineError):
        g.admit(ORIGIN)
    d = g.decide(blob, 0, 4096, 0.0)  # type: ignore[arg-type]
    assert isinstance(d, WaitUntil) and "link" in d.reason
    assert isinstance(g.decide(blob, 0, 4096, 30.0), FailNow)  # type: ignore[arg-type]
    g.is_pinned = lambda key: True
    assert isinstance(g.decide(blob, 0, 4096, 0.0), FailNow)  # type: ignore[arg-type]
    g.is_pinned = lambda key: False
    g.set_policy("vol/*", OfflinePolicy.parse("error"))
    assert isinstance(g.decide(blob, 0, 4096, 0.0), FailNow)  # type: ignore[arg-type]
    net.link(ORIGIN, up=True)
    assert isinstance(g.decide(blob, 0, 4096, 0.0), Fetch)  # type: ignore[arg-type]
    assert g.states()[ORIGIN].status is Status.ONLINE


def test_fetch_outcomes_reach_the_tracker() -> None:
    g, net = gate()

    def refused() -> None:
        raise ConnectionRefusedError

    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            g.fetch(ORIGIN, refused)
    assert net.status(ORIGIN) is Status.OFFLINE
    ran = []
    with pytest.raises(OfflineError):
        g.fetch(ORIGIN, lambda: ran.append(1))  # type: ignore[func-returns-value]
    assert not ran, "a fetch to an offline source was attempted"


def test_held_reads_wake_on_change_at_deadline_and_at_close() -> None:
    held = HeldReads()
    woke: list[str] = []
    done = threading.Event()

    def note(name: str) -> None:
        woke.append(name)
        if len(woke) == 3:
            done.set()

    held.hold("a", time.monotonic() + 3600, lambda: note("a"))
    held.hold("b", time.monotonic() + 0.05, lambda: note("b"))
    held.hold("c", time.monotonic() + 3600, lambda: note("c"))
    held.source_changed("a")
    deadline = time.monotonic() + 10
    while len(woke) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(woke) == ["a", "b"]
    assert len(held) == 1
    held.close()
    assert done.wait(10) and sorted(woke) == ["a", "b", "c"]
    held.hold("d", time.monotonic() + 3600, lambda: woke.append("d"))  # after close: at once
    assert woke[-1] == "d"


def test_offline_policy_directive_parses_renders_and_rejects_with_file_line() -> None:
    text = (
        "dir /var/cache/x\nondemand\nsource * http://10.9.0.2/{cookie}\n"
        "offline_policy wait 5m\noffline_policy img/* error\n"
    )
    cfg = parse_config(text, "c.conf")
    rules = [(r.pattern, r.policy) for r in cfg.offline_policies]
    assert rules == [(None, "wait 300s"), ("img/*", "error")]
    pol = policies_of(cfg)
    assert str(pol.default) == "wait 300s" and pol.for_blob("img", "x").mode.value == "error"
    rendered = "\n".join(render_config(cfg)) + "\n"
    assert parse_config(rendered, "r.conf").offline_policies == cfg.offline_policies
    for bad in ("offline_policy wait", "offline_policy sometimes", "offline_policy wait 0",
                "offline_policy img/* wait 2d", "offline_policy"):
        with pytest.raises(ConfigError, match=r"c\.conf:4: offline_policy"):
            parse_config(text.replace("offline_policy wait 5m", bad), "c.conf")


def test_tracked_origins_and_pins() -> None:
    assert tracked_origins(
        ["http://h1/{cookie}", "https://h2:8443/x/{cookie}", "file:///srv/{cookie}",
         "http://{volume}.example/{cookie}"]
    ) == {"http://h1:80": "h1", "https://h2:8443": "h2"}
    cfg = parse_config("dir /x\nondemand\nsource * file:///s/{cookie}\npin vol/keep*\n", "c")
    pinned = pinned_by(lambda: cfg, lambda: frozenset({"erofs,vol/cli"}))
    assert pinned(BlobKey(b"erofs,vol", b"cli")) and pinned(BlobKey(b"erofs,vol", b"keep1"))
    assert not pinned(BlobKey(b"erofs,vol", b"other"))
