"""Failover on the fake kernel: the device keeper's start-up paths, and a new worker's
serving stack picking up what a dead worker had read.

A dead worker is modelled as the kernel sees one: it read some requests, and then
every anonymous fd it held was closed (process exit), while the device stays open in
the supervisor. The worker that follows is the product's own stack
(``daemon/app.py``), started after the keeper's ``restore``, as the supervisor does.
The same kernel behaviour is checked on the real kernel by the contract cases
(``case_restore_*`` in ``testing/kernel_contract.py``).
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.config.load import load_config
from cachefilesd_py.config.model import Config
from cachefilesd_py.daemon.app import Daemon
from cachefilesd_py.daemon.keeper import RECORD_FDNAME, BindRecord, DeviceKeeper, Notifier
from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.kernel import commands
from cachefilesd_py.kernel.device import CachefilesDevice
from cachefilesd_py.testing.fake_kernel import Background, FakeCachefiles, FakeObjectHandle
from cachefilesd_py.testing.pattern import pattern_bytes

SIZE = 1_000_000 + 123
DATA = pattern_bytes(11, 0, SIZE)


class RecordingNotifier(Notifier):
    def __init__(self, enabled: bool = True) -> None:
        self.stored: dict[str, bytes | int] = {}
        self.removed: list[str] = []
        super().__init__(store=self._store, remove=self._remove, enabled=lambda: enabled)

    def _store(self, fd: int, name: str) -> bool:
        self.stored[name] = os.pread(fd, 4096, 0) if name == RECORD_FDNAME else fd
        return True

    def _remove(self, name: str) -> bool:
        self.removed.append(name)
        return True


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Config, Path]]:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "img").write_bytes(DATA)
    cache = tmp_path / "cache"
    cache.mkdir()
    conf = tmp_path / "cachefilesd.conf"
    conf.write_text(
        f"dir {cache}\ntag t\nondemand\nsource * file://{blobs}/{{cookie}}\n"
        "chunk_size 64K\nreadahead 0\nfetch_timeout 5\nfetch_concurrency 2\n"
    )
    yield load_config(str(conf)), conf


def next_request(fake: FakeCachefiles, timeout: float = 10.0) -> wire.Request:
    end = threading.Event()
    for _ in range(int(timeout / 0.01)):
        buf = fake.read_message()
        if buf:
            return wire.decode(buf)
        end.wait(0.01)
    raise AssertionError("no request")


def bound(config: Config, fake: FakeCachefiles, notifier: Notifier | None = None) -> DeviceKeeper:
    keeper = DeviceKeeper(
        config,
        open_device=lambda: fake,
        notifier=notifier or RecordingNotifier(enabled=False),
    )
    keeper.acquire({})
    return keeper


def serve(config: Config, conf: Path, fake: FakeCachefiles) -> tuple[Daemon, threading.Thread]:
    daemon = Daemon(config, str(conf), nocull=True)
    daemon.prepare(fake)
    t = threading.Thread(target=daemon.serve, daemon=True)
    t.start()
    return daemon, t


# -- a new worker after a dead one ---------------------------------------------------


def dead_worker_holding_a_read(
    fake: FakeCachefiles, offset: int, length: int
) -> tuple[wire.OpenRequest, FakeObjectHandle, Background[bytes]]:
    """A worker that answered a mount's OPEN, read a READ of a reader's, and died: its
    anonymous fd closed by process exit. Returns the OPEN, the mount's object and the
    reader."""
    mount = Background(fake.lookup, b"erofs,img", b"img")
    opened = next_request(fake)
    assert isinstance(opened, wire.OpenRequest)
    fake.write_command(commands.encode_copen(opened.msg_id, SIZE))
    handle = mount.result(10)
    reader: Background[bytes] = Background(handle.read, offset, length, 3.0)
    assert isinstance(next_request(fake), wire.ReadRequest)
    fake.close_fd(opened.fd)
    return opened, handle, reader


@pytest.mark.parametrize("restore", [True, False], ids=["restore", "control-without-restore"])
def test_a_new_worker_serves_the_read_the_dead_one_held(
    setup: tuple[Config, Path], restore: bool
) -> None:
    """With ``restore`` the next worker answers the re-sent OPEN and the held READ; the
    control, without it, shows the read never completes."""
    config, conf = setup
    fake = FakeCachefiles()
    keeper = bound(config, fake)
    assert keeper.can_restore
    opened, handle, reader = dead_worker_holding_a_read(fake, 100_000, 200_000)
    if restore:
        keeper.restore()
    daemon, t = serve(config, conf, fake)
    try:
        if not restore:
            with pytest.raises(TimeoutError):
                reader.result(10)
            return
        assert reader.result(10) == DATA[100_000:300_000]
        driver = daemon._driver
        assert driver is not None
        assert driver.stats.opens == 1, "the re-sent OPEN was not answered"
        assert driver.stats.reads_failed == 0
        assert handle.object_id not in (0, opened.object_id)
    finally:
        daemon.stop.set()
        t.join(10)
        fake.close()


def test_an_open_the_dead_worker_never_answered_is_answered_by_the_next(
    setup: tuple[Config, Path],
) -> None:
    config, conf = setup
    fake = FakeCachefiles()
    keeper = bound(config, fake)
    mount = Background(fake.lookup, b"erofs,img", b"img")
    opened = next_request(fake)
    assert isinstance(opened, wire.OpenRequest)
    fake.close_fd(opened.fd)  # died before its copen
    keeper.restore()
    daemon, t = serve(config, conf, fake)
    try:
        handle = mount.result(10)
        assert handle.size == SIZE
        assert handle.read(0, 4096) == DATA[:4096]
    finally:
        daemon.stop.set()
        t.join(10)
        fake.close()


# -- the keeper's start-up paths -------------------------------------------------------


def test_a_fresh_bind_probes_restore_and_stores_the_device(setup: tuple[Config, Path]) -> None:
    config, _conf = setup
    fake = FakeCachefiles()
    notifier = RecordingNotifier()
    keeper = bound(config, fake, notifier)
    assert fake.commands == [
        b"dir " + config.dir.encode(),  # type: ignore[union-attr]
        b"tag t",
        b"bind ondemand",
        b"restore",
    ]
    assert keeper.can_restore and keeper.origin == "bound"
    assert notifier.stored["cachefiles"] == fake.fileno()
    record = json.loads(notifier.stored[RECORD_FDNAME])  # type: ignore[arg-type]
    assert record["dir"] == config.dir and record["ondemand"] is True
    fake.close()


def test_a_kernel_without_restore_is_bound_but_not_stored(setup: tuple[Config, Path]) -> None:
    config, _conf = setup
    fake = FakeCachefiles(version=(6, 7))
    notifier = RecordingNotifier()
    keeper = bound(config, fake, notifier)
    assert fake.bound and not keeper.can_restore
    assert notifier.stored == {}
    fake.close()


def stored_pair(config: Config, fake: FakeCachefiles) -> dict[str, int]:
    """What systemd passes back: a dup of the device fd and the bind record."""
    return {"cachefiles": os.dup(fake.fileno()), RECORD_FDNAME: BindRecord.of(config).to_fd()}


def adopting(config: Config, stored: FakeCachefiles, fresh: FakeCachefiles,
             notifier: Notifier) -> DeviceKeeper:
    return DeviceKeeper(
        config,
        open_device=lambda: fresh,
        inherit_device=lambda fd: (os.close(fd), stored)[1],
        notifier=notifier,
    )


def test_a_stored_device_is_taken_back_and_restored(setup: tuple[Config, Path]) -> None:
    config, _conf = setup
    fake = FakeCachefiles()
    bound(config, fake)
    before = list(fake.commands)
    notifier = RecordingNotifier()
    keeper = adopting(config, fake, FakeCachefiles(), notifier)
    assert keeper.acquire(stored_pair(config, fake)) is fake
    assert fake.commands == [*before, b"restore"], "dir/bind must not be sent again"
    assert keeper.origin == "fdstore" and keeper.can_restore
    assert notifier.removed == [] and notifier.stored == {}
    fake.close()


@pytest.mark.parametrize("why", ["no-restore", "other-dir", "classic", "no-record"])
def test_an_unusable_stored_device_is_given_up_and_bound_afresh(
    setup: tuple[Config, Path], tmp_path: Path, why: str
) -> None:
    config, _conf = setup
    stored = FakeCachefiles(version=(6, 7) if why == "no-restore" else (6, 12))
    bound(config, stored)
    passed = stored_pair(config, stored)
    if why == "other-dir":
        other = tmp_path / "other"
        other.mkdir()
        os.close(passed[RECORD_FDNAME])
        passed[RECORD_FDNAME] = BindRecord.of(
            load_config_with_dir(config, other)).to_fd()
    if why == "classic":
        import dataclasses

        config = dataclasses.replace(config, ondemand=False)
    if why == "no-record":
        os.close(passed.pop(RECORD_FDNAME))
    fresh = FakeCachefiles()
    notifier = RecordingNotifier()
    keeper = adopting(config, stored, fresh, notifier)
    assert keeper.acquire(passed) is fresh
    assert stored.closed, "the stored device was not closed"
    assert notifier.removed == ["cachefiles", RECORD_FDNAME]
    assert fresh.bound and keeper.origin == "bound" and keeper.refused
    fresh.close()


def load_config_with_dir(config: Config, directory: Path) -> Config:
    import dataclasses

    return dataclasses.replace(config, dir=str(directory))


def test_an_fd_that_is_not_the_device_is_refused(
    setup: tuple[Config, Path], tmp_path: Path
) -> None:
    config, _conf = setup
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    fresh = FakeCachefiles()
    notifier = RecordingNotifier()
    keeper = DeviceKeeper(config, open_device=lambda: fresh, notifier=notifier)
    keeper.acquire({"cachefiles": os.open(plain, os.O_RDONLY)})
    assert keeper.refused == "not /dev/cachefiles"
    assert fresh.bound
    fresh.close()


def test_ebusy_is_retried_only_after_giving_up_a_stored_device(
    setup: tuple[Config, Path],
) -> None:
    config, _conf = setup
    fresh = FakeCachefiles()
    attempts: list[int] = []

    def busy_twice() -> FakeCachefiles:
        attempts.append(1)
        if len(attempts) <= 2:
            raise OSError(errno.EBUSY, "busy")
        return fresh

    keeper = DeviceKeeper(config, open_device=busy_twice, sleep=lambda _s: None,
                          notifier=RecordingNotifier(enabled=False))
    with pytest.raises(OSError) as e:
        keeper.acquire({})
    assert e.value.errno == errno.EBUSY and len(attempts) == 1
    stale = FakeCachefiles(version=(6, 7))
    bound(config, stale)
    keeper = DeviceKeeper(config, open_device=busy_twice, sleep=lambda _s: None,
                          inherit_device=lambda fd: (os.close(fd), stale)[1],
                          notifier=RecordingNotifier())
    assert keeper.acquire(stored_pair(config, stale)) is fresh
    assert len(attempts) == 3  # one EBUSY more, then the open worked
    fresh.close()


def test_the_real_inherit_checks_the_device_number(tmp_path: Path) -> None:
    from cachefilesd_py.kernel.device import NotTheDevice

    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(NotTheDevice, match="is device 1:3"):
            CachefilesDevice.inherit(fd, path="/dev/zero")
        dev = CachefilesDevice.inherit(fd, path="/dev/null")
        assert dev.fileno() == fd and not os.get_inheritable(fd)
    finally:
        os.close(fd)
    with pytest.raises(NotTheDevice, match="not open"):
        CachefilesDevice.inherit(fd, path="/dev/null")


def test_a_trim_leaves_alone_a_blob_opened_by_the_previous_worker(
    setup: tuple[Config, Path],
) -> None:
    """After a failover, objects the dead worker opened stay open in the kernel (closed
    on the daemon side, re-opened only by their next READ): the new worker's leases do
    not know them. A trim must ask the kernel (``inuse``) before punching holes into a
    file a mounted reader may be reading from."""
    from cachefilesd_py.blobkey import BlobKey
    from cachefilesd_py.engine.leases import BlobLeases
    from cachefilesd_py.frontends.ondemand.space import make_culler

    config, conf = setup
    big = pattern_bytes(5, 0, 40 * 64 * 1024 + 777)
    (conf.parent / "blobs" / "big").write_bytes(big)
    fake = FakeCachefiles()
    bound(config, fake)
    daemon, t = serve(config, conf, fake)
    try:
        key = BlobKey.ondemand(b"erofs,big", b"big")
        handle = fake.lookup(b"erofs,big", b"big")
        assert handle.read(0, len(big)) == big
        handle.withdraw()  # committed, sidecar bound once the worker saw the CLOSE
        path = key.cache_path(config.dir or "")
        assert daemon._engine is not None
        for _ in range(200):
            if daemon._engine.presence.load_bound(key, path) is not None:
                break
            threading.Event().wait(0.05)
        handle = fake.lookup(b"erofs,big", b"big")  # mounted again, by the worker that will die
        blocks = os.stat(path).st_blocks
        next_worker = make_culler(fake, Path(config.dir or ""), daemon._engine.presence,
                                  BlobLeases(), config)
        out = next_worker.cull_pass(need_bytes=5 * 64 * 1024).tally
        assert out.trimmed == 0 and out.culled == 0 and out.kept_in_use == 1, out
        assert os.stat(path).st_blocks == blocks, "holes were punched into a file in use"
        assert handle.read(0, len(big)) == big
        handle.withdraw()
        # once the kernel is done with it, the same trim goes ahead
        for _ in range(200):
            if next_worker.cull_pass(need_bytes=5 * 64 * 1024).tally.trimmed:
                break
            threading.Event().wait(0.05)
        assert os.stat(path).st_blocks < blocks
    finally:
        daemon.stop.set()
        t.join(10)
        fake.close()


def test_a_prepared_worker_has_built_its_http_pools(setup: tuple[Config, Path]) -> None:
    """A spare builds its HTTP(S) pools, whose TLS context loads the CA bundle (seconds
    under TCG), while it prepares: not in the reader thread answering the first OPEN,
    which after a failover is the re-sent OPEN of every live blob. A configuration
    with ``file://`` sources only builds none."""
    config, conf = setup
    fake = FakeCachefiles()
    bound(config, fake)
    files_only = Daemon(config, str(conf), nocull=True)
    files_only.prepare(fake)
    assert files_only._factory is not None and files_only._factory._pools is None
    http = load_config_with_sources(config, "source * http://127.0.0.1:9/{cookie}\n")
    daemon = Daemon(http, str(conf), nocull=True)
    daemon.prepare(fake)
    assert daemon._factory is not None and daemon._factory._pools is not None


def load_config_with_sources(config: Config, rule: str) -> Config:
    assert config.dir is not None
    conf = Path(config.dir).parent / "http.conf"
    conf.write_text(f"dir {config.dir}\ntag t\nondemand\n{rule}chunk_size 64K\nreadahead 0\n")
    return load_config(str(conf))
