"""The supervisor's hold on ``/dev/cachefiles``: bind it, or take it back, and restore.

Start-up (docs/failover.md):

1. **Taken back from systemd's fd store** (on-demand mode, a restart after a crash, a
   watchdog kill or ``systemctl restart``): the fd named ``cachefiles`` in
   ``LISTEN_FDNAMES`` must be a character device with the device number of
   ``/dev/cachefiles``, and the bind record stored next to it (``cachefiles-bind``, a
   memfd: the cache directory's device and inode and the commands sent before
   ``bind``) must name the configured cache directory. Then, **no** ``dir``/``tag``/
   ``bind`` (the kernel would answer EEXIST/EBUSY): ``restore`` instead, which marks
   every request the previous process had read as new again (Linux 6.8+). The worker
   that starts next receives, for each object whose anonymous fd died, an OPEN with a
   new object id and a new anonymous fd, then that object's READs with their old msg
   ids.
2. **Otherwise** a fresh ``open`` (CAP_SYS_ADMIN), the configuration commands, one per
   write, and ``bind``/``bind ondemand``. In on-demand mode a ``restore`` right after
   binding is harmless (nothing is pending) and tells whether the kernel has it; if it
   does, the fd and the bind record go into the fd store (only under systemd).

When the stored fd cannot be used — no ``restore`` (kernels before 6.8 answer
EOPNOTSUPP), a dead cache (EIO), another device, another cache directory, classic mode
— it is taken out of the store (``FDSTOREREMOVE``) and closed, which unbinds that
cache, and the daemon binds afresh: one log line says why, and that mounts served by
the old binding now fail with EIO until they are mounted again. The fresh ``open``
may see EBUSY for a moment while systemd closes its copy; it is retried for a few
seconds in that case only.

Classic mode never uses the store: the kernel has no ``restore`` for it and keeps no
request state a successor could pick up, so a restart re-binds (nothing is lost on
disk: the kernel commits its objects when the cache is withdrawn, and the new binding
finds them).
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.daemon import systemd
from cachefilesd_py.frontends.bind import kernel_commands
from cachefilesd_py.kernel import commands
from cachefilesd_py.kernel.device import CachefilesDevice, Device, NotTheDevice

log = structlog.get_logger("daemon")

RECORD_FDNAME = "cachefiles-bind"
#: how long a fresh open retries EBUSY after the stored fd was given up
EBUSY_RETRY = 10.0


class BindFailed(OSError):
    """A configuration command or ``bind`` was refused by the kernel (exit status 1)."""


@dataclass(frozen=True)
class BindRecord:
    """What a binding was made with, kept next to the device fd in the fd store."""

    dir: str
    st_dev: int
    st_ino: int
    ondemand: bool
    commands: list[str]

    @classmethod
    def of(cls, config: Config) -> BindRecord:
        assert config.dir is not None
        st = os.stat(config.dir)
        return cls(
            config.dir,
            st.st_dev,
            st.st_ino,
            config.ondemand,
            [c.decode(errors="replace") for c in kernel_commands(config)],
        )

    def to_fd(self) -> int:
        fd = os.memfd_create("cachefiles-bind", os.MFD_CLOEXEC)
        os.write(fd, json.dumps(asdict(self)).encode())
        return fd

    @classmethod
    def from_fd(cls, fd: int) -> BindRecord | None:
        try:
            data = os.pread(fd, 65536, 0)
            obj: Any = json.loads(data)
            return cls(
                str(obj["dir"]),
                int(obj["st_dev"]),
                int(obj["st_ino"]),
                bool(obj["ondemand"]),
                [str(c) for c in obj["commands"]],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def same_directory(self, config: Config) -> bool:
        if config.dir is None:
            return False
        try:
            st = os.stat(config.dir)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.st_dev, self.st_ino)


@dataclass
class Notifier:
    """The fd-store half of the sd_notify client (replaceable in tests)."""

    store: Callable[[int, str], bool] = systemd.fdstore
    remove: Callable[[str], bool] = systemd.fdstore_remove
    enabled: Callable[[], bool] = systemd.under_systemd


class DeviceKeeper:
    """Owns the supervisor's device fd (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        *,
        open_device: Callable[[], Device] = CachefilesDevice,
        inherit_device: Callable[[int], Device] = CachefilesDevice.inherit,
        notifier: Notifier | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._open = open_device
        self._inherit = inherit_device
        self._notify = notifier or Notifier()
        self._sleep = sleep
        self.device: Device | None = None
        #: how the device was obtained: "fdstore" or "bound"
        self.origin = ""
        #: whether ``restore`` works, i.e. whether a dead worker can be replaced
        self.can_restore = False
        #: why the stored fd was not used (for the log and tests), if it was not
        self.refused: str | None = None

    # -- start-up --------------------------------------------------------------------

    def acquire(self, passed: dict[str, int]) -> Device:
        """Take the device back from ``passed`` (``systemd.listen_fds()``) or bind it."""
        fd = passed.pop(systemd.DEVICE_FDNAME, None)
        record_fd = passed.pop(RECORD_FDNAME, None)
        record = BindRecord.from_fd(record_fd) if record_fd is not None else None
        if record_fd is not None:
            os.close(record_fd)
        for name, other in passed.items():
            log.warning("fdstore.unknown_fd", name=name, fd=other)
            os.close(other)
        if fd is not None and self._adopt(fd, record):
            assert self.device is not None
            return self.device
        return self._bind_fresh(after_refusal=fd is not None)

    def _refuse(self, fd: int, device: Device | None, why: str, **fields: Any) -> bool:
        self.refused = why
        log.error(
            "fdstore.device_given_up",
            why=why,
            consequence="binding afresh: mounts served by the previous binding fail with "
            "EIO until they are mounted again",
            **fields,
        )
        self._notify.remove(systemd.DEVICE_FDNAME)
        self._notify.remove(RECORD_FDNAME)
        if device is not None:
            device.close()
        else:
            os.close(fd)
        return False

    def _adopt(self, fd: int, record: BindRecord | None) -> bool:
        try:
            device = self._inherit(fd)
        except NotTheDevice as exc:
            return self._refuse(fd, None, "not /dev/cachefiles", error=str(exc))
        if not self.config.ondemand:
            return self._refuse(fd, device, "classic mode keeps no device across restarts")
        if record is None:
            return self._refuse(fd, device, "no bind record stored with the device")
        if not record.ondemand:
            return self._refuse(fd, device, "the stored device was bound in classic mode")
        if not record.same_directory(self.config):
            return self._refuse(
                fd, device, "the stored device serves another cache directory",
                stored=record.dir, configured=self.config.dir,
            )
        try:
            device.write_command(commands.encode_restore())
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                why = "the kernel has no 'restore' (Linux 6.8 or later is needed)"
            elif exc.errno == errno.EIO:
                why = "the cache is dead (an I/O error of the cache filesystem)"
            else:
                why = f"restore failed: {exc.strerror}"
            return self._refuse(fd, device, why, errno=exc.errno)
        current = [c.decode(errors="replace") for c in kernel_commands(self.config)]
        if current != record.commands:
            log.warning(
                "fdstore.settings_differ",
                note="tag/secctx/thresholds are fixed at bind; they apply after a stop "
                "and start (which unbinds: unmount first)",
                bound=record.commands,
                configured=current,
            )
        self.device, self.origin, self.can_restore = device, "fdstore", True
        log.info("fdstore.restored", fd=fd, cache_dir=self.config.dir)
        return True

    def _open_fresh(self, after_refusal: bool) -> Device:
        deadline = time.monotonic() + (EBUSY_RETRY if after_refusal else 0.0)
        while True:
            try:
                return self._open()
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
            self._sleep(0.1)

    def _bind_fresh(self, *, after_refusal: bool = False) -> Device:
        device = self._open_fresh(after_refusal)
        try:
            for cmd in kernel_commands(self.config):
                try:
                    device.write_command(cmd)
                except OSError as exc:
                    raise BindFailed(
                        exc.errno or errno.EIO,
                        f"CacheFiles gave config error on '{cmd.decode(errors='replace')}': "
                        f"{exc.strerror}",
                    ) from exc
            log.info("binding", mode="ondemand" if self.config.ondemand else "classic")
            try:
                device.write_command(commands.encode_bind(ondemand=self.config.ondemand))
            except OSError as exc:
                raise BindFailed(
                    exc.errno or errno.EIO, f"CacheFiles bind failed: {exc.strerror}"
                ) from exc
        except BaseException:
            device.close()
            raise
        self.device, self.origin = device, "bound"
        log.info("bound", mode="ondemand" if self.config.ondemand else "classic",
                 cache_dir=self.config.dir)
        if self.config.ondemand:
            self.can_restore = self._probe_restore(device)
            if self.can_restore and self._notify.enabled():
                self._store(device)
        return device

    def _probe_restore(self, device: Device) -> bool:
        """``restore`` on a cache nobody has read from yet changes nothing."""
        try:
            device.write_command(commands.encode_restore())
        except OSError as exc:
            log.warning(
                "kernel.no_restore",
                errno=exc.errno,
                consequence="a worker that dies cannot be replaced and a restart unbinds "
                "the cache (restore needs Linux 6.8 or later)",
            )
            return False
        return True

    def _store(self, device: Device) -> None:
        record_fd = BindRecord.of(self.config).to_fd()
        try:
            stored = self._notify.store(device.fileno(), systemd.DEVICE_FDNAME) and \
                self._notify.store(record_fd, RECORD_FDNAME)
        finally:
            os.close(record_fd)
        if stored:
            log.info("fdstore.stored", fd=device.fileno())

    # -- while running ---------------------------------------------------------------

    def restore(self) -> None:
        """After a worker died and was reaped: have the kernel deliver again every
        request it had read. OSError (EIO: the cache died) ends the daemon."""
        assert self.device is not None
        self.device.write_command(commands.encode_restore())
        log.info("restored")

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None
