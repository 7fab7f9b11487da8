"""Credentials rejected and reloaded, on the real 6.12 kernel, watched on D-Bus.

nginx in another network namespace behind a veth pair (``remote_nginx``) answers 401
unless the request carries the bearer token it expects; the daemon sends the token of
its ``source_headers`` file. A private system bus runs in the guest
(``testing/dbus_bus.py``: the system bus's default policy plus the project's policy
file), the daemon is pointed at it by ``DBUS_SYSTEM_BUS_ADDRESS``, and
``dbus-monitor`` records what reaches it.

The token is rotated upstream while an image is mounted: a read of a file not in the
cache fails with EIO, ``CredentialsRejected`` reaches the monitor (once), ``status``
shows it; the new token written to the file and ``cachefilesctl credentials reload``
make the same file on the same mount read with the right sha256. Then the link goes
down and up: ``SourceOffline`` and ``SourceOnline`` reach the monitor too.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.control.cli import main as ctl
from cachefilesd_py.control.client import call
from cachefilesd_py.daemon.notify_dbus import INTERFACE
from cachefilesd_py.testing.dbus_bus import monitor, private_bus, signals_seen
from tests.vm.remote import RemoteNginx
from tests.vm.rig import Daemon, mkfs_erofs, mount_tracked

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "packaging" / "dbus" / "org.cachefilesd_py.Cache1.conf"
WAIT = 30.0
FIRST, SECOND = "first-t0ken", "second-t0ken"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_token(path: Path, token: str) -> None:
    path.write_text(f"Authorization: Bearer {token}\n")
    path.chmod(0o600)


def wait_for_signal(out: Path, member: str, timeout: float = WAIT) -> list[list[str]]:
    """The argument lists of every ``member`` signal seen, once there is at least one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = signals_seen(out.read_text(errors="replace"), INTERFACE)
        got = [args for name, args in seen if name == member]
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"no {member} on the bus:\n{out.read_text(errors='replace')}")


@pytest.mark.timeout(600)
def test_token_rotated_upstream_then_credentials_reload_resumes_the_mount(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
    remote_nginx: Callable[..., RemoteNginx],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    blobs, src = workdir / "blobs", workdir / "src"
    blobs.mkdir()
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(1 << 20))
    mkfs_erofs(blobs / "img.erofs", src, "-Enoinline_data")
    remote = remote_nginx(blobs, bearer=FIRST)
    origin = remote.url.rstrip("/")
    token_file = workdir / "registry.headers"
    write_token(token_file, FIRST)

    bus_dir = Path(tempfile.mkdtemp(prefix="cfdpy-bus-", dir=workdir))
    bus_dir.chmod(0o755)
    transcript = workdir / "dbus-monitor.txt"
    with private_bus(bus_dir, POLICY) as address, monitor(address, INTERFACE, transcript):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        cache = loop_fs(64)
        sock = str(workdir / "control.sock")
        d = daemon(
            f"dir {cache}\ntag creds\nondemand\nsource * {origin}/{{cookie}}\n"
            f"source_headers * {token_file}\n"
            f"chunk_size 256K\nreadahead 0\nfetch_timeout 10\nfetch_retries 0\n"
            f"control_socket {sock}\noffline_policy error\n"
        )
        d.start(timeout=300)
        assert d.wait_for("connectivity.watching", 60)
        mnt = workdir / "img"
        mount_tracked(mnt, "img.erofs", mounts)
        assert sha(read_file(mnt / "f0.bin")) == sha((src / "f0.bin").read_bytes())
        assert call(sock, "status")["sources"][origin]["credentials"] == "ok"

        # the token is rotated upstream: what is not cached yet cannot be fetched
        remote.nginx.require_bearer(SECOND)
        for _ in range(2):
            with pytest.raises(OSError) as err:
                read_file(mnt / "f1.bin")
            assert err.value.errno == errno.EIO
        assert wait_for_signal(transcript, "CredentialsRejected") == [
            [f'string "{origin}"', "uint16 401"]
        ]
        assert d.count("source.credentials_rejected") == 1
        st = call(sock, "status")["sources"][origin]
        assert st["credentials"] == "rejected (HTTP 401)", st

        # the new token, and the reload: the same file on the same mount reads right
        write_token(token_file, SECOND)
        capsys.readouterr()
        # cachefilesctl's own entry point, in this process (a fresh interpreter costs
        # about 15 s in the loaded guest)
        assert ctl(["credentials", "reload", "--socket", sock]) == 0
        out = capsys.readouterr().out
        assert f"reloaded      *: {token_file} (Authorization)" in out, out
        assert d.wait_for("credentials.reloaded", WAIT)
        assert sha(read_file(mnt / "f1.bin")) == sha((src / "f1.bin").read_bytes())
        assert call(sock, "status")["sources"][origin]["credentials"] == "ok"

        # the link: SourceOffline, SourceOnline on the bus
        remote.link(up=False)
        offline = wait_for_signal(transcript, "SourceOffline")
        assert offline[-1] == [f'string "{origin}"', f'string "link {remote.net.client_if} down"']
        remote.link(up=True)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            seen = signals_seen(transcript.read_text(errors="replace"), INTERFACE)
            if [m for m, _a in seen][-1:] == ["SourceOnline"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no SourceOnline after the link came back: {seen}")
        assert d.stop() == 0
    members = [m for m, _a in signals_seen(transcript.read_text(errors="replace"), INTERFACE)]
    assert members.count("CredentialsRejected") == 1, members
