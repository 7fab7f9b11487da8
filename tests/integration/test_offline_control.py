"""Disconnected operation through the control socket and the metrics, on the live
on-demand stack over the fake kernel (``test_control_daemon.Live``): each source's
state and reason in ``status``, the ``source_online`` gauge, ``cachefilesctl
offline-policy`` switching the policy at run time; and the daemon's wiring
(``daemon/offline.py``) running the real netlink driver on this host's own
namespace, read-only (a loopback origin: its route is ``local`` through ``lo``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.control.client import call
from cachefilesd_py.control.schema import ControlError
from cachefilesd_py.daemon.offline import OfflineWiring
from cachefilesd_py.sources.online import Status
from cachefilesd_py.testing.connectivity import ScriptedConnectivity
from cachefilesd_py.testing.fault_server import FaultServer
from tests.integration.test_control_daemon import DATA, Live, metrics_of


@pytest.fixture
def http_live() -> Iterator[tuple[Live, FaultServer, ScriptedConnectivity]]:
    root = Path(tempfile.mkdtemp(prefix="ctl-offline-"))
    with FaultServer({"img": DATA}) as server:
        d = Live(root, source=server.url + "/{cookie}", extra="offline_policy error\n")
        net = ScriptedConnectivity([server.url])
        d.engine.gate.connectivity = net
        d.engine.gate.tracked = frozenset({server.url})
        net.on_transition.append(lambda tr: d.driver.source_changed(tr.source))
        try:
            yield d, server, net
        finally:
            d.close()
            shutil.rmtree(root, ignore_errors=True)


def test_status_metrics_and_run_time_policy(
    http_live: tuple[Live, FaultServer, ScriptedConnectivity],
    capsys: pytest.CaptureFixture[str],
) -> None:
    live, server, net = http_live
    rc, st = live.ctl(capsys, "status")
    assert rc == 0 and st["sources"][server.url]["state"] == "unknown"
    assert st["offline_policy"] == {"default": "error", "rules": []}
    net.link(server.url, up=True)
    m = metrics_of(call(live.sock, "metrics")["text"])
    assert m[f"cachefilesd_source_online{{source={server.url}}}"] == 1.0

    net.link(server.url, up=False)
    rc, st = live.ctl(capsys, "status")
    src = st["sources"][server.url]
    assert src["state"] == "offline" and src["reason"] == "link veth100 down"
    m = metrics_of(call(live.sock, "metrics")["text"])
    assert m[f"cachefilesd_source_online{{source={server.url}}}"] == 0.0

    rc, reply = live.ctl(capsys, "offline-policy", "wait", "60")
    assert rc == 0 and reply["policy"] == "wait 60s" and reply["pattern"] is None
    rc, reply = live.ctl(capsys, "offline-policy", "img/*", "error")
    assert rc == 0
    assert reply["offline_policy"]["rules"] == [{"pattern": "img/*", "policy": "error"}]
    assert str(live.engine.gate.policy_for(BlobKey(b"erofs,img", b"img"))) == "error"
    rc, _ = live.ctl(capsys, "offline-policy", "wait", "soon")
    assert rc == 1 and "bad duration 'soon'" in live.last_err
    # the text form
    assert live.ctl(capsys, "status")[0] == 0
    from cachefilesd_py.control.cli import main as ctl

    capsys.readouterr()
    assert ctl(["status", "--socket", live.sock]) == 0
    out = capsys.readouterr().out
    assert f"source        {server.url}: offline (link" in out
    assert "offline       wait 60s, img/*: error" in out


def test_the_wiring_runs_the_netlink_driver_for_http_origins(tmp_path: Path) -> None:
    from cachefilesd_py.config.parse import parse_config
    from cachefilesd_py.engine.service import Engine
    from cachefilesd_py.presence.store import PresenceStore

    cfg = parse_config(
        f"dir {tmp_path}\nondemand\nsource a/* http://127.0.0.1:9/{{cookie}}\n"
        f"source b/* file://{tmp_path}/{{cookie}}\noffline_policy wait 90\n",
        "c.conf",
    )
    engine = Engine(
        resolve=lambda v, n: None,
        open_source=lambda url: None,  # type: ignore[arg-type, return-value]
        presence=PresenceStore(tmp_path / "p"),
    )
    changed: list[str] = []
    wiring = OfflineWiring(cfg, engine, changed.append)
    try:
        assert engine.gate.tracked == {"http://127.0.0.1:9"}
        assert str(engine.gate.policies.default) == "wait 90s"
        assert wiring.connectivity is not None, "the netlink driver did not start"
        state = wiring.connectivity.state("http://127.0.0.1:9")
        assert state.status is Status.ONLINE and state.reason == "route via lo"
        assert wiring.offline() == []
    finally:
        wiring.close()
        engine.presence.close()


def test_conflicts_and_resolve_through_the_socket(
    http_live: tuple[Live, FaultServer, ScriptedConnectivity],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A blob changed upstream while open: the resync after a reconnect lists it in
    ``status``, ``conflicts`` and the metrics; ``resolve`` ends it (kept on disk)."""
    live, server, net = http_live
    obj = live.fake.lookup(b"erofs,img", b"img")
    assert obj.read(0, 100_000) == DATA[:100_000]
    net.link(server.url, up=False)
    server.replace("img", DATA[::-1] + b"more")
    net.link(server.url, up=True)
    [found] = live.engine.resync(server.url)
    blob = "erofs,img/img"
    assert found.blob == blob

    rc, st = live.ctl(capsys, "status")
    assert rc == 0 and st["conflicts"] == 1
    rc, reply = live.ctl(capsys, "conflicts")
    [c] = reply["conflicts"]
    assert rc == 0 and c["blob"] == blob and c["resolution"] == "open" and c["open"] is True
    assert c["cached"].startswith(f"{len(DATA)}:")
    assert c["upstream"].startswith(f"{len(DATA) + 4}:")
    m = metrics_of(call(live.sock, "metrics")["text"])
    assert m["cachefilesd_conflicts"] == 1.0

    rc, _ = live.ctl(capsys, "resolve", "erofs,img/other", "keep")
    assert rc == 1 and "no conflict" in live.last_err
    with pytest.raises(ControlError, match="must be 'keep' or 'refetch'"):
        call(live.sock, "resolve", blob=blob, how="maybe")
    rc, reply = live.ctl(capsys, "resolve", blob, "refetch")
    assert rc == 0 and reply["resolution"] == "refetch" and reply["open"] is True
    assert "open objects keep the cached version" in reply["note"]
    assert live.ctl(capsys, "status")[1]["conflicts"] == 0
    saved = json.loads((live.cache / "cachefilesd-py" / "conflicts.json").read_text())
    assert [c["resolution"] for c in saved["conflicts"]] == ["refetch"]
    # the text form
    from cachefilesd_py.control.cli import main as ctl

    capsys.readouterr()
    assert ctl(["conflicts", "--socket", live.sock]) == 0
    out = capsys.readouterr().out
    assert f"{blob}  refetch" in out and "0 needing attention" in out


def test_without_netlink_fetch_outcomes_still_drive_the_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver cannot start (no netlink): sources are still gated, on fetch
    outcomes; and a reconnect starts a resync."""
    import errno

    import structlog.testing

    from cachefilesd_py.config.parse import parse_config
    from cachefilesd_py.engine.service import Engine
    from cachefilesd_py.presence.store import PresenceStore
    from cachefilesd_py.sources import netlink

    def no_netlink(self: object, timeout: float = 30.0) -> None:
        raise PermissionError(errno.EACCES, "netlink refused by the sandbox")

    monkeypatch.setattr(netlink.NetlinkConnectivity, "start", no_netlink)
    cfg = parse_config(
        f"dir {tmp_path}\nondemand\nsource a/* http://127.0.0.1:9/{{cookie}}\n", "c.conf"
    )
    engine = Engine(
        resolve=lambda v, n: None,
        open_source=lambda url: None,  # type: ignore[arg-type, return-value]
        presence=PresenceStore(tmp_path / "p"),
    )
    origin = "http://127.0.0.1:9"
    with structlog.testing.capture_logs() as logs:
        wiring = OfflineWiring(cfg, engine, lambda _s: None)
        try:
            assert engine.gate.connectivity is not None and engine.gate.tracked == {origin}
            for _ in range(3):
                engine.gate.failed(origin, ConnectionRefusedError(errno.ECONNREFUSED, "no"))
            assert engine.gate.states()[origin].status is Status.OFFLINE
            engine.gate.succeeded(origin)  # an answer: back online, and a resync
            assert engine.gate.states()[origin].status is Status.ONLINE
            for t in wiring._resyncs:
                t.join(10)
        finally:
            wiring.close()
            engine.presence.close()
    events = [e["event"] for e in logs]
    assert "connectivity.unavailable" in events
    assert "resync.done" in events
