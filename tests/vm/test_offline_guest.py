"""Disconnected operation, phase 1, on the real 6.12 kernel: nginx in another network
namespace behind a veth pair (``remote_nginx``), the connectivity driver in the
guest's own namespace (where the daemon runs).

The time from ``ip link set down`` to the offline transition is measured in the
guest and written to ``$CACHEFILESD_VM_RESULTS/offline-detect.txt`` (and printed);
``docs/benchmarks.md`` records it. The waits are generous: the test checks that the
transition comes and why; the figure is the measurement.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import urllib3

from cachefilesd_py.control.client import call
from cachefilesd_py.daemon.notify_dbus import INTERFACE
from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.http import HttpSource
from cachefilesd_py.sources.netlink import failure_kind
from cachefilesd_py.sources.online import FailureKind
from cachefilesd_py.sources.policy import Deadline, RetryPolicy
from cachefilesd_py.testing.dbus_bus import monitor, private_bus, signals_seen
from cachefilesd_py.testing.netns import InProcessWatcher
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.vm.remote import RemoteNginx
from tests.vm.rig import Daemon, mkfs_erofs, mount_tracked, tree_digests, umount_tracked

pytestmark = pytest.mark.guest

WAIT = 30.0
POLICY = Path(__file__).resolve().parents[2] / "packaging/dbus/org.cachefilesd_py.Cache1.conf"


def record(line: str) -> None:
    print(line)
    results = os.environ.get("CACHEFILESD_VM_RESULTS")
    if results:
        with open(Path(results) / "offline-detect.txt", "a") as f:
            f.write(line + "\n")


def fetch(url: str, n: int = 4096, timeout: float = 60.0) -> bytes:
    src = HttpSource(url, pool=urllib3.PoolManager(), retry=RetryPolicy(total=0),
                     timeout=timeout)
    buf = bytearray(n)
    src.fetch_into(0, memoryview(buf), Deadline.after(timeout))
    return bytes(buf)


def test_link_down_takes_the_source_offline_and_up_brings_it_back(
    workdir: Path, remote_nginx: Callable[[Path], RemoteNginx]
) -> None:
    root = workdir / "blobs"
    root.mkdir()
    data = pattern_bytes(5, 0, 1 << 20)
    (root / "blob").write_bytes(data)
    remote = remote_nginx(root)
    url = f"{remote.url}/blob"
    assert fetch(url) == data[:4096]

    # the driver in this process: the guest's own namespace, where the daemon runs
    watch = InProcessWatcher([remote.host])
    try:
        assert watch.wait_for(remote.host, "online", WAIT)
        for round_ in range(3):
            t0 = time.monotonic()
            remote.link(up=False)
            down = watch.wait_for(remote.host, "offline", WAIT)
            assert down is not None, "no offline transition after ip link set down"
            assert down["reason"] == f"link {remote.net.client_if} down"
            record(f"guest link down -> offline: {(float(down['at']) - t0) * 1000:.1f} ms"  # type: ignore[arg-type]
                   f" (round {round_ + 1})")
            # what the engine would see if it fetched anyway: unreachable
            with pytest.raises(SourceError) as info:
                fetch(url)
            assert failure_kind(info.value) is FailureKind.UNREACHABLE
            remote.link(up=True)
            assert watch.wait_for(remote.host, "online", WAIT)
            assert fetch(url) == data[:4096]

        t0 = time.monotonic()
        remote.peer(up=False)  # the far end goes: the guest's end loses its carrier
        down = watch.wait_for(remote.host, "offline", WAIT)
        assert down is not None and down["reason"] == f"link {remote.net.client_if} down"
        record(f"guest peer down -> offline: {(float(down['at']) - t0) * 1000:.1f} ms")  # type: ignore[arg-type]
        remote.peer(up=True)
        assert watch.wait_for(remote.host, "online", WAIT)
    finally:
        watch.close()


def test_a_blob_changed_upstream_has_a_new_identity(
    workdir: Path, remote_nginx: Callable[[Path], RemoteNginx]
) -> None:
    root = workdir / "blobs"
    root.mkdir()
    (root / "blob").write_bytes(pattern_bytes(6, 0, 100_000))
    remote = remote_nginx(root)
    pool = urllib3.PoolManager()
    before = HttpSource(f"{remote.url}/blob", pool=pool).identity(Deadline.after(5))
    remote.link(up=False)
    remote.change_blob("blob", pattern_bytes(7, 0, 120_000))
    remote.link(up=True)
    after = HttpSource(f"{remote.url}/blob", pool=pool).identity(Deadline.after(5))
    assert (before.size, after.size) == (100_000, 120_000)
    assert before.etag and after.etag and before.etag != after.etag


# -- phase 2: the daemon, end to end ---------------------------------------------------


def _read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.timeout(600)
def test_daemon_offline_pinned_reads_error_then_wait(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
    remote_nginx: Callable[[Path], RemoteNginx],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon fetches from nginx in another namespace. A pinned image reads whole
    while the link is down; an unpinned image's missing file gets EIO at once under
    ``error``; after ``offline-policy wait 60`` a read blocks and completes (right
    bytes) once the link is back. The pinned image and a third, half-read one changed
    upstream meanwhile: the resync shows both conflicts; the pinned image still reads
    as its cached version, the half-read one serves its cached file and EIO for the
    other, never bytes of the new version (same layout, other contents). A
    ``dbus-monitor`` on a private system bus receives SourceOffline, ReadWaiting,
    SourceOnline and both Conflict signals."""
    blobs = workdir / "blobs"
    blobs.mkdir()
    pin_src, img_src = workdir / "pin-src", workdir / "img-src"
    mix_src, mix2_src = workdir / "mix-src", workdir / "mix2-src"
    for d in (pin_src, img_src):
        (d / "sub").mkdir(parents=True)
    for i in range(3):
        (pin_src / f"p{i}.bin").write_bytes(os.urandom(1 << 20))
        (img_src / f"f{i}.bin").write_bytes(os.urandom(1 << 20))
    for d in (mix_src, mix2_src):  # two versions: same names and sizes, other bytes
        d.mkdir()
        for i in range(2):
            (d / f"m{i}.bin").write_bytes(os.urandom(1 << 20))
    mkfs_erofs(blobs / "mix.erofs", mix_src, "-Enoinline_data")
    mkfs_erofs(workdir / "mix2.erofs", mix2_src, "-Enoinline_data")
    (pin_src / "sub" / "small.txt").write_text("pinned\n")
    (img_src / "sub" / "small.txt").write_text("unpinned\n")
    mkfs_erofs(blobs / "pin.erofs", pin_src, "-Enoinline_data")
    mkfs_erofs(blobs / "img.erofs", img_src, "-Enoinline_data")
    remote = remote_nginx(blobs)
    origin = remote.url.rstrip("/")

    bus_dir = Path(tempfile.mkdtemp(prefix="cfdpy-bus-", dir=workdir))
    bus_dir.chmod(0o755)
    transcript = workdir / "dbus-monitor.txt"
    bus = contextlib.ExitStack()
    request.addfinalizer(bus.close)
    address = bus.enter_context(private_bus(bus_dir, POLICY))
    bus.enter_context(monitor(address, INTERFACE, transcript))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)

    cache = loop_fs(128)
    sock = str(workdir / "control.sock")
    d = daemon(
        f"dir {cache}\ntag offline\nondemand\nsource * {origin}/{{cookie}}\n"
        f"chunk_size 256K\nreadahead 0\nfetch_timeout 10\nfetch_retries 0\n"
        f"control_socket {sock}\noffline_policy error\n"
    )
    d.start(timeout=300)
    assert d.wait_for("control.listening", 60)
    assert d.wait_for("connectivity.watching", 60)

    pin_mnt, img_mnt = workdir / "pin", workdir / "img"
    mount_tracked(pin_mnt, "pin.erofs", mounts)
    mount_tracked(img_mnt, "img.erofs", mounts)
    mix_mnt = workdir / "mix"
    mount_tracked(mix_mnt, "mix.erofs", mounts)
    assert _read_all(mix_mnt / "m0.bin") == (mix_src / "m0.bin").read_bytes()
    reply = call(sock, "pin", blob="erofs,pin.erofs/pin.erofs", path="/", timeout=300)
    assert all(b["present_pct"] == 100.0 for b in reply["blobs"]), reply
    assert _read_all(img_mnt / "f0.bin") == (img_src / "f0.bin").read_bytes()
    st = call(sock, "status")
    assert st["sources"][origin]["state"] == "online", st["sources"]

    # link down: status says offline, with the reason
    t0, wall0 = time.monotonic(), time.time()
    remote.link(up=False)
    seen = None
    while time.monotonic() - t0 < WAIT:
        src = call(sock, "status")["sources"][origin]
        if src["state"] == "offline":
            seen = time.monotonic() - t0
            break
        time.sleep(0.02)
    assert seen is not None, "status never showed the source offline"
    assert src["reason"] == f"link {remote.net.client_if} down", src
    record(f"daemon: link down -> status offline: {seen * 1000:.0f} ms")
    assert d.wait_for("source.offline", WAIT)
    [ev] = [e for e in d.read_events() if e.get("event") == "source.offline"]
    logged = datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp()
    record(f"daemon: link down -> source.offline logged: {(logged - wall0) * 1000:.0f} ms")

    # pinned: the whole image reads right, offline
    assert tree_digests(pin_mnt) == tree_digests(pin_src)
    # ... and mounts again offline: the OPEN is answered from its cache file
    umount_tracked(pin_mnt, mounts)
    mount_tracked(pin_mnt, "pin.erofs", mounts)
    assert tree_digests(pin_mnt) == tree_digests(pin_src)
    assert d.count("open.offline_from_cache") == 1

    # unpinned, missing, policy error: EIO at once
    began = time.monotonic()
    with pytest.raises(OSError) as err:
        _read_all(img_mnt / "f1.bin")
    assert err.value.errno == errno.EIO
    answered = (time.monotonic() - began) * 1000
    record(f"daemon: offline READ under error answered in {answered:.0f} ms")
    assert d.count("read.offline") >= 1

    # switched at run time to wait: the read blocks until the link is back
    reply = call(sock, "offline_policy", policy="wait 60", pattern="")
    assert reply["policy"] == "wait 60s"
    assert call(sock, "status")["offline_policy"]["default"] == "wait 60s"
    out: dict[str, object] = {}

    def reader() -> None:
        try:
            out["data"] = _read_all(img_mnt / "f2.bin")
        except OSError as exc:
            out["error"] = exc

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert d.wait_for("read.waiting_for_network", WAIT)
    thread.join(2.0)
    assert thread.is_alive(), f"the read did not wait: {out}"
    # the pinned image changes upstream during the outage
    old_pin = (blobs / "pin.erofs").read_bytes()
    remote.change_blob("pin.erofs", old_pin + bytes(4096))
    remote.change_blob("mix.erofs", (workdir / "mix2.erofs").read_bytes())
    remote.link(up=True)
    thread.join(WAIT)
    assert not thread.is_alive(), "the held read did not complete after the link came up"
    assert "error" not in out, out
    assert hashlib.sha256(out["data"]).hexdigest() == hashlib.sha256(  # type: ignore[arg-type]
        (img_src / "f2.bin").read_bytes()
    ).hexdigest()
    assert d.wait_for("source.online", WAIT)
    assert call(sock, "status")["sources"][origin]["state"] == "online"

    # back online, the resync finds both conflicts; readers see the cached versions,
    # never bytes of the new ones
    t0 = time.monotonic()
    while call(sock, "status")["conflicts"] < 2 and time.monotonic() - t0 < WAIT:
        time.sleep(0.1)
    found = {c["blob"]: c for c in call(sock, "conflicts")["conflicts"]}
    assert set(found) == {"erofs,pin.erofs/pin.erofs", "erofs,mix.erofs/mix.erofs"}, found
    c = found["erofs,pin.erofs/pin.erofs"]
    assert c["open"] is True, c
    assert c["cached"].startswith(f"{len(old_pin)}:"), c
    assert c["upstream"].startswith(f"{len(old_pin) + 4096}:"), c
    Path("/proc/sys/vm/drop_caches").write_text("3\n")  # read the cache files again
    assert tree_digests(pin_mnt) == tree_digests(pin_src)
    assert _read_all(mix_mnt / "m0.bin") == (mix_src / "m0.bin").read_bytes()
    with pytest.raises(OSError) as err:
        _read_all(mix_mnt / "m1.bin")
    assert err.value.errno == errno.EIO
    reply = call(sock, "resolve", blob=c["blob"], how="keep")
    assert reply["resolution"] == "keep"
    assert call(sock, "status")["conflicts"] == 1

    # the same events reached the system bus
    seen = signals_seen(transcript.read_text(errors="replace"), INTERFACE)
    members = [m for m, _a in seen]
    for member in ("SourceOffline", "ReadWaiting", "SourceOnline"):
        assert member in members, members
    conflicted = sorted(a[1] for m, a in seen if m == "Conflict")
    assert conflicted == ['string "mix.erofs"', 'string "pin.erofs"'], seen
    assert d.stop() == 0
