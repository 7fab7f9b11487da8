"""Credentials rejected, and ``cachefilesctl credentials reload``, on the live on-demand
stack over the fake kernel (``test_control_daemon.Live``) with the daemon's own wiring
(``daemon/offline.py``) and the fault HTTP server requiring an ``Authorization`` value.

The token is rotated upstream while an image is open: READs of missing bytes get EIO,
``status`` and the metrics show the source's credentials rejected, the log says so
once, and D-Bus carries ``CredentialsRejected`` once (a private system bus,
``testing/dbus_bus.py``). Writing the new token and ``credentials reload`` (or
``reload``, as SIGHUP) makes the *same open blob* read the right bytes, without a
remount. A refused headers file changes nothing; a caller who is not root is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing

from cachefilesd_py.control.client import call
from cachefilesd_py.daemon.offline import OfflineWiring
from cachefilesd_py.testing.fault_server import FaultServer
from tests.integration.test_control_daemon import DATA, Live, metrics_of
from tests.integration.test_control_server import NOBODY, as_user

GOOD = "Bearer first-token"
ROTATED = "Bearer second-token"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="source_headers files are root's")


def write_headers(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)


class Rig:
    def __init__(self, root: Path, server: FaultServer) -> None:
        self.server = server
        self.headers = root / "token.headers"
        write_headers(self.headers, f"# the registry token\nAuthorization: {GOOD}\n")
        self.live = Live(
            root, source=server.url + "/{cookie}", extra=f"source_headers * {self.headers}\n"
        )
        self.wiring = OfflineWiring(self.live.daemon.config, self.live.engine, lambda _s: None)

    def close(self) -> None:
        self.wiring.close()
        self.live.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="ctl-creds-"))
    root.chmod(0o755)  # the control socket, for the caller who is not root
    with FaultServer({"img": DATA}, require_authorization=GOOD) as server:
        r = Rig(root, server)
        try:
            yield r
        finally:
            r.close()
            shutil.rmtree(root, ignore_errors=True)


def rotate_upstream(rig: Rig, token: str) -> None:
    rig.server.require_authorization = token


def test_rejected_then_credentials_reload_resumes_the_open_blob(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    live, url = rig.live, rig.server.url
    obj = live.fake.lookup(b"erofs,img", b"img")
    assert obj.read(0, 65536) == DATA[:65536]
    rc, st = live.ctl(capsys, "status")
    assert st["sources"][url]["credentials"] == "ok"

    rotate_upstream(rig, ROTATED)
    with structlog.testing.capture_logs() as logs:
        for offset in (300_000, 500_000, 700_000):  # three READs, one transition
            with pytest.raises(OSError) as exc:
                obj.read(offset, 4096)
            assert exc.value.errno == errno.EIO
    rejected = [e for e in logs if e["event"] == "source.credentials_rejected"]
    assert [(e["source"], e["status"]) for e in rejected] == [(url, 401)]

    rc, st = live.ctl(capsys, "status")
    assert rc == 0 and st["sources"][url]["credentials"] == "rejected (HTTP 401)"
    assert st["sources"][url]["state"] in ("online", "unknown")  # an answer: reachable
    m = metrics_of(call(live.sock, "metrics")["text"])
    assert m[f"cachefilesd_source_credentials_rejected{{source={url}}}"] == 1.0
    from cachefilesd_py.control.cli import main as ctl

    capsys.readouterr()
    assert ctl(["status", "--socket", live.sock]) == 0
    assert "credentials rejected (HTTP 401)" in capsys.readouterr().out

    write_headers(rig.headers, f"Authorization: {ROTATED}\n")
    with structlog.testing.capture_logs() as logs:
        rc, reply = live.ctl(capsys, "credentials", "reload")
    assert rc == 0, live.last_err
    assert reply["rules"] == [
        {"pattern": "*", "file": str(rig.headers), "headers": "Authorization"}
    ]
    assert reply["cleared"] == [url]
    assert [e["event"] for e in logs if e["event"].startswith("credentials.")] == [
        "credentials.reloaded"
    ]
    # the same open blob, no remount: the next READ goes with the new token
    assert obj.read(500_000, 4096) == DATA[500_000:504_096]
    assert rig.server.request_headers[-1]["Authorization"] == ROTATED
    rc, st = live.ctl(capsys, "status")
    assert st["sources"][url]["credentials"] == "ok"
    m = metrics_of(call(live.sock, "metrics")["text"])
    assert m[f"cachefilesd_source_credentials_rejected{{source={url}}}"] == 0.0


def test_a_refused_headers_file_changes_nothing(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    live = rig.live
    obj = live.fake.lookup(b"erofs,img", b"img")
    assert obj.read(0, 4096) == DATA[:4096]

    write_headers(rig.headers, f"Authorization: {ROTATED}\nthis is no header\n")
    rc, _ = live.ctl(capsys, "credentials", "reload")
    assert rc == 1 and f"{rig.headers}:2" in live.last_err, live.last_err
    write_headers(rig.headers, f"Authorization: {ROTATED}\n", mode=0o644)
    rc, _ = live.ctl(capsys, "credentials", "reload")
    assert rc == 1 and "must be owned by root with mode 0600" in live.last_err
    # still the first token: a fetch still works with it
    assert obj.read(400_000, 4096) == DATA[400_000:404_096]
    assert rig.server.request_headers[-1]["Authorization"] == GOOD


def test_reload_reaches_open_blobs_too(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    """``reload`` (SIGHUP's path) re-reads the headers files the same way."""
    live = rig.live
    obj = live.fake.lookup(b"erofs,img", b"img")
    assert obj.read(0, 4096) == DATA[:4096]
    rotate_upstream(rig, ROTATED)
    with pytest.raises(OSError):
        obj.read(600_000, 4096)
    write_headers(rig.headers, f"Authorization: {ROTATED}\n")
    rc, _ = live.ctl(capsys, "reload")
    assert rc == 0, live.last_err
    assert obj.read(600_000, 4096) == DATA[600_000:604_096]
    assert live.engine.gate.credentials.describe(rig.server.url) == "ok"


def test_403_counts_too_and_non_root_is_refused(rig: Rig) -> None:
    live = rig.live
    obj = live.fake.lookup(b"erofs,img", b"img")
    rig.server.auth_status = 403
    rotate_upstream(rig, ROTATED)
    with pytest.raises(OSError):
        obj.read(800_000, 4096)
    assert live.engine.gate.credentials.describe(rig.server.url) == "rejected (HTTP 403)"
    code, message = as_user(NOBODY, NOBODY, [], lambda: call(live.sock, "credentials_reload"))
    assert code == "forbidden" and "root only" in message, message
    assert live.engine.gate.credentials.status(rig.server.url) == 403  # not cleared


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_credentials_rejected_reaches_dbus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cachefilesd_py.testing.dbus_bus import private_bus
    from tests.integration.test_notify_dbus import POLICY, start_receiver

    folder = Path(tempfile.mkdtemp(prefix="cfdpy-dbus-"))
    folder.chmod(0o755)
    root = tmp_path / "rig"
    root.mkdir()
    try:
        with (
            private_bus(folder, POLICY) as address,
            FaultServer({"img": DATA}, require_authorization=GOOD) as server,
        ):
            # the connectivity driver's first SourceOnline, then ours
            receiver = start_receiver(address, 2, folder)
            monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
            rig = Rig(root, server)
            try:
                obj = rig.live.fake.lookup(b"erofs,img", b"img")
                rotate_upstream(rig, ROTATED)
                for offset in (300_000, 700_000):
                    with pytest.raises(OSError):
                        obj.read(offset, 4096)
                assert rig.wiring.notifier is not None and rig.wiring.notifier.flush(10)
                out, err = receiver.communicate(timeout=30)
            finally:
                rig.close()
        assert [json.loads(line) for line in out.splitlines()] == [
            ["SourceOnline", [server.url, "route via lo"]],
            ["CredentialsRejected", [server.url, 401]],
        ], err
    finally:
        shutil.rmtree(folder, ignore_errors=True)
