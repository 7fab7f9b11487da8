"""A private D-Bus system bus for tests: ``dbus-daemon`` with the system bus's policy.

The configuration is the default policy of Debian's system bus
(``/usr/share/dbus-1/system.conf``: nobody may own a name, method calls are denied,
signals may be sent and received) plus one included policy file, normally the one the
project ships (``packaging/dbus/org.cachefilesd_py.Cache1.conf``), which lets root own
the daemon's name. Used on the host (``tests/integration/test_notify_dbus.py``) and in
the test guest, which runs no bus of its own (``tests/vm/test_credentials_guest.py``).

    with private_bus(folder, policy) as address:
        ...  # DBUS_SYSTEM_BUS_ADDRESS=address for the daemon
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

#: the default policy of Debian's system bus, with ``{socket}`` and ``{policy}``
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


class BusNotStarted(RuntimeError):
    """``dbus-daemon`` printed no address (its stderr is the message)."""


@contextlib.contextmanager
def private_bus(folder: Path, policy: Path) -> Iterator[str]:
    """Run a bus listening on ``folder/bus`` with ``policy`` included; yields its
    address and stops it (terminate, then wait) on the way out."""
    conf = folder / "bus.conf"
    conf.write_text(BUS_CONFIG.format(socket=folder / "bus", policy=policy))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        if not address:
            proc.kill()
            _out, err = proc.communicate()
            raise BusNotStarted(f"dbus-daemon did not start: {err}")
        yield address
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def monitor(address: str, interface: str, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``dbus-monitor`` on ``address`` for the signals of ``interface``, writing what it
    sees to ``out`` (its usual text form) until the block ends."""
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["dbus-monitor", "--address", address, f"type='signal',interface='{interface}'"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)


def signals_seen(text: str, interface: str) -> list[tuple[str, list[str]]]:
    """``(member, [argument lines])`` of each signal of ``interface`` in a
    ``dbus-monitor`` transcript (arguments as printed: ``string "x"``, ``uint16 401``)."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("signal ") and f"interface={interface};" in line:
            member = line.rsplit("member=", 1)[-1].strip()
            out.append((member, []))
        elif out and line.startswith("   ") and stripped:
            out[-1][1].append(stripped)
        elif not line.startswith(" "):
            pass
    return out
