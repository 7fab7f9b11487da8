"""What the daemon reports about its host: the cache's block device and its own
footprint (psutil), for the start-up line and the stats line at exit.

Host facts are optional: nothing here may stop the daemon. The block device is read
through pyudev (udev's properties, such as ``ID_MODEL``, when udevd runs; sysfs
otherwise). pyudev needs ``libudev.so.1``, which slim containers lack: it raises
ImportError when its ``Context`` is made, after the daemon told systemd it is ready.
Then the same facts are read from sysfs directly (``/sys/dev/block/MAJ:MIN``), and
that is logged once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("daemon.host")

#: the fallback to sysfs is logged once per process
_logged = threading.Event()


def cache_device(path: str, *, udev: bool = True) -> dict[str, Any]:
    """The block device under ``path``: name, model, rotational, read-only, size.

    ``udev=False`` reads sysfs only: classic mode logs this between ``bind`` and its
    first cull, and importing pyudev (``ctypes.util`` and its search for libudev)
    takes seconds in a slow guest."""
    try:
        dev = os.stat(path).st_dev
    except OSError as exc:
        return {"device": "unknown", "why": str(exc)}
    if not udev:
        try:
            return _from_sysfs(dev)
        except Exception as exc:
            return {"device": "unknown", "why": repr(exc)}
    try:
        return _from_udev(dev)
    except ImportError as exc:  # no libudev.so.1
        _once("host.libudev_missing", error=str(exc), fallback="sysfs")
    except Exception as exc:  # optional facts: never fatal
        _once("host.udev_failed", error=repr(exc), fallback="sysfs")
    try:
        return _from_sysfs(dev)
    except Exception as exc:
        return {"device": "unknown", "why": repr(exc)}


def _once(event: str, **fields: Any) -> None:
    if not _logged.is_set():
        _logged.set()
        log.info(event, **fields)


def _from_udev(dev: int) -> dict[str, Any]:
    import pyudev

    try:
        device = pyudev.Devices.from_device_number(pyudev.Context(), "block", dev)
    except (OSError, ValueError, pyudev.DeviceNotFoundError) as exc:
        return {"device": "unknown", "why": str(exc)}
    attrs = device.attributes

    def attr(name: str) -> str | None:
        try:
            value = attrs.asstring(name)
        except (KeyError, UnicodeDecodeError):
            return None
        return str(value).strip()

    return {
        "device": device.device_node or device.sys_name,
        "model": device.properties.get("ID_MODEL") or attr("device/model"),
        "rotational": attr("queue/rotational"),
        "read_only": attr("ro"),
        "size_bytes": int(attr("size") or 0) * 512,
    }


def _from_sysfs(dev: int, sys_root: str = "/sys") -> dict[str, Any]:
    """The same facts from ``/sys/dev/block/MAJ:MIN`` (a partition's disk holds the
    model and the queue)."""
    node = Path(sys_root, "dev", "block", f"{os.major(dev)}:{os.minor(dev)}")
    if not node.exists():
        return {"device": "unknown", "why": f"no block device {os.major(dev)}:{os.minor(dev)}"}
    disk = node.resolve().parent if (node / "partition").exists() else node

    def read(base: Path, name: str) -> str | None:
        try:
            return (base / name).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    uevent = dict(
        line.partition("=")[::2] for line in (read(node, "uevent") or "").splitlines()
    )
    name = uevent.get("DEVNAME")
    return {
        "device": f"/dev/{name}" if name else node.resolve().name,
        "model": read(disk, "device/model"),
        "rotational": read(disk, "queue/rotational"),
        "read_only": read(node, "ro"),
        "size_bytes": int(read(node, "size") or 0) * 512,
    }


def footprint() -> dict[str, Any]:
    """Resident memory, open fds and CPU seconds of this process."""
    import psutil  # not before the first stats line: start-up in a slow guest

    proc = psutil.Process()
    with proc.oneshot():
        cpu = proc.cpu_times()
        return {
            "rss_mib": round(proc.memory_info().rss / 2**20, 1),
            "open_fds": proc.num_fds(),
            "threads": proc.num_threads(),
            "cpu_s": round(cpu.user + cpu.system, 2),
        }
