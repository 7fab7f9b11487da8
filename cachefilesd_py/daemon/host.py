"""What the daemon reports about its host: the cache's block device (pyudev, from
sysfs; works without udevd) and its own footprint (psutil), for the start-up line and
the stats line at exit."""

from __future__ import annotations

import os
from typing import Any

import psutil


def cache_device(path: str) -> dict[str, Any]:
    """The block device under ``path``: name, model, rotational, read-only. (pyudev is
    imported here: only on-demand mode asks, and its import is slow on a cold start.)"""
    import pyudev

    try:
        st = os.stat(path)
        dev = pyudev.Devices.from_device_number(pyudev.Context(), "block", st.st_dev)
    except (OSError, ValueError, pyudev.DeviceNotFoundError) as exc:
        return {"device": "unknown", "why": str(exc)}
    attrs = dev.attributes

    def attr(name: str) -> str | None:
        try:
            value = attrs.asstring(name)
        except (KeyError, UnicodeDecodeError):
            return None
        return str(value).strip()

    return {
        "device": dev.device_node or dev.sys_name,
        "model": dev.properties.get("ID_MODEL") or attr("device/model"),
        "rotational": attr("queue/rotational"),
        "read_only": attr("ro"),
        "size_bytes": int(attr("size") or 0) * 512,
    }


def footprint() -> dict[str, Any]:
    """Resident memory, open fds and CPU seconds of this process."""
    proc = psutil.Process()
    with proc.oneshot():
        cpu = proc.cpu_times()
        return {
            "rss_mib": round(proc.memory_info().rss / 2**20, 1),
            "open_fds": proc.num_fds(),
            "threads": proc.num_threads(),
            "cpu_s": round(cpu.user + cpu.system, 2),
        }
