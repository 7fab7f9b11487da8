"""The D-Bus notifier on a private bus: a ``dbus-daemon`` started by the test with the
system bus's default policy (nobody may own a name, method calls denied) plus the
policy file the project ships (``packaging/dbus/``). The daemon's side runs as root
and must get the name; the receiver runs as user ``nobody`` and must get every signal
with its arguments. Without a bus, emitting costs the caller nothing and logs once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import jeepney
import pytest
import structlog
import structlog.testing
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, Proxy, open_dbus_connection

from cachefilesd_py.daemon.notify_dbus import BUS_NAME, INTERFACE, DbusNotifier
from cachefilesd_py.testing.dbus_bus import BUS_CONFIG, BusNotStarted, private_bus

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "packaging" / "dbus" / "org.cachefilesd_py.Cache1.conf"

SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    shutil.which("dbus-daemon") is None or os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists(),
    reason="needs dbus-daemon (scripts/setup), root and the system's python3",
)

RECEIVER = """
import json, sys
from jeepney import HeaderFields, MatchRule, MessageType
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import Proxy, open_dbus_connection
conn = open_dbus_connection(sys.argv[1])
Proxy(message_bus, conn, timeout=5).AddMatch(MatchRule(type="signal", interface=sys.argv[2]))
print(json.dumps(["ready"]), flush=True)
got = 0
while got < int(sys.argv[3]):
    msg = conn.receive(timeout=20)
    if msg.header.message_type is MessageType.signal:
        if msg.header.fields.get(HeaderFields.interface) == sys.argv[2]:
            print(json.dumps([msg.header.fields[HeaderFields.member], list(msg.body)]), flush=True)
            got += 1
"""


@pytest.fixture
def folder() -> Iterator[Path]:
    made = Path(tempfile.mkdtemp(prefix="cfdpy-dbus-"))
    made.chmod(0o755)
    yield made
    shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
def bus(folder: Path) -> Iterator[str]:
    try:
        with private_bus(folder, POLICY) as address:
            yield address
    except BusNotStarted as exc:
        pytest.fail(str(exc))


def start_receiver(address: str, count: int, folder: Path) -> subprocess.Popen[str]:
    """A jeepney receiver as user ``nobody``, with the system's Python (the virtualenv's
    interpreter may sit where nobody can read) and a world-readable copy of jeepney."""
    lib = folder / "lib"
    shutil.copytree(Path(jeepney.__file__).parent, lib / "jeepney")
    for p in [lib, *lib.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)

    def as_nobody() -> None:
        os.setgid(65534)
        os.setgroups([])
        os.setuid(65534)

    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", RECEIVER, address, INTERFACE, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_nobody,
        cwd="/",
        env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if json.loads(first or '["dead"]') != ["ready"]:
        proc.kill()
        pytest.fail("receiver did not start: " + proc.communicate()[1])
    return proc


def test_every_signal_reaches_an_unprivileged_receiver(bus: str, folder: Path) -> None:
    receiver = start_receiver(bus, 5, folder)
    notifier = DbusNotifier(bus)
    try:
        notifier.source_offline("nginx", "link veth0 down")
        notifier.read_waiting("img", "img.erofs", 4096, 65536, 120.0)
        notifier.source_online("nginx", "route via veth0")
        notifier.conflict("img", "img.erofs", '100:"a"', '120:"b"')
        notifier.credentials_rejected("nginx", 401)
        assert notifier.flush(10)
        out, err = receiver.communicate(timeout=30)
    finally:
        notifier.close()
    got = [json.loads(line) for line in out.splitlines()]
    assert got == [
        ["SourceOffline", ["nginx", "link veth0 down"]],
        ["ReadWaiting", ["img", "img.erofs", 4096, 65536, 120.0]],
        ["SourceOnline", ["nginx", "route via veth0"]],
        ["Conflict", ["img", "img.erofs", '100:"a"', '120:"b"']],
        ["CredentialsRejected", ["nginx", 401]],
    ], err
    assert notifier.sent == 5 and notifier.dropped == 0


def test_root_owns_the_name_by_the_shipped_policy(bus: str) -> None:
    notifier = DbusNotifier(bus)
    try:
        notifier.source_online("s", "start")
        assert notifier.flush(10)
        with open_dbus_connection(bus) as conn:
            owner = Proxy(message_bus, conn, timeout=5).GetNameOwner(BUS_NAME)[0]
        assert owner.startswith(":")
    finally:
        notifier.close()


def test_without_the_policy_the_name_is_refused(tmp_path: Path) -> None:
    """The check above can fail: the same bus without the policy file refuses root."""
    folder = Path(tempfile.mkdtemp(prefix="cfdpy-dbus-"))
    conf = folder / "bus.conf"
    empty = folder / "empty.conf"
    empty.write_text("<busconfig/>")
    conf.write_text(BUS_CONFIG.format(socket=folder / "bus", policy=empty))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        with (
            open_dbus_connection(address) as conn,
            pytest.raises(Exception, match=r"AccessDenied|not allowed"),
        ):
            Proxy(message_bus, conn, timeout=5).RequestName(BUS_NAME, 4)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def test_no_bus_costs_the_caller_nothing(tmp_path: Path) -> None:
    hung = threading.Event()
    release = threading.Event()

    def connect(_bus: str) -> DBusConnection:
        hung.set()
        release.wait(30)  # a bus that does not answer, then is not there at all
        raise ConnectionRefusedError("no bus")

    notifier = DbusNotifier("SYSTEM", connect=connect, retry_seconds=3600)
    try:
        with structlog.testing.capture_logs() as logs:
            notifier.source_offline("s", "first")
            assert hung.wait(10)
            # the sender is stuck in connect: emitting still returns at once
            for i in range(1000):
                notifier.source_offline("s", f"reason {i}")
            assert notifier.dropped > 0  # the bounded queue dropped the oldest
            release.set()
            assert notifier.flush(10)
            for i in range(10):  # within retry_seconds: no new attempt, no new log line
                notifier.source_online("s", f"again {i}")
            assert notifier.flush(10)
        assert notifier.sent == 0 and notifier.dropped == 1011
        assert [e["event"] for e in logs] == ["dbus.unavailable"]
    finally:
        release.set()
        notifier.close()


def test_unknown_signals_are_a_programming_error() -> None:
    notifier = DbusNotifier("unix:path=/nonexistent", retry_seconds=3600)
    try:
        with pytest.raises(ValueError):
            notifier.emit("Bogus")
    finally:
        notifier.close()
