"""Host figures and the control CLI's surface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachefilesd_py.control.cli import COMMANDS, main
from cachefilesd_py.daemon.host import _from_sysfs, cache_device, footprint


def test_cache_device_of_a_filesystem_on_a_block_device(tmp_path: Path) -> None:
    """The figures come from the block device under the path: checked against sysfs."""
    st = os.stat(tmp_path)
    sysfs = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not sysfs.exists():
        pytest.skip(f"{tmp_path} is not on a block device here (major {os.major(st.st_dev)})")
    info = cache_device(str(tmp_path))
    assert "why" not in info and info["device"] != "unknown", info
    assert info["size_bytes"] == int((sysfs / "size").read_text()) * 512
    assert info["read_only"] == (sysfs / "ro").read_text().strip()


def test_cache_device_of_a_filesystem_without_one_says_why() -> None:
    info = cache_device("/proc")  # no block device: an anonymous st_dev
    assert info["device"] == "unknown" and info["why"]


def test_footprint_counts_this_process() -> None:
    fp = footprint()
    assert fp["rss_mib"] > 1 and fp["open_fds"] >= 3


def test_cachefilesctl_surface(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert main([]) == 0
    assert "verify" in capsys.readouterr().out
    assert "verify" in COMMANDS


NO_LIBUDEV = """
import ctypes.util, json, sys
real = ctypes.util.find_library
ctypes.util.find_library = lambda name: None if name == "udev" else real(name)
import structlog
structlog.configure(
    processors=[structlog.processors.JSONRenderer()],
    logger_factory=structlog.PrintLoggerFactory(sys.stderr),
)
from cachefilesd_py.daemon.host import cache_device
first = cache_device(sys.argv[1])
second = cache_device(sys.argv[1])
print(json.dumps([first, second]))
"""


def test_without_libudev_device_facts_come_from_sysfs(tmp_path: Path) -> None:
    """A host without libudev.so.1 (slim containers): pyudev.Context() raises
    ImportError; the facts come from sysfs instead, with one log line, and nothing
    raises (it used to end the daemon with status 3 after READY=1)."""
    res = subprocess.run(
        [sys.executable, "-c", NO_LIBUDEV, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    first, second = json.loads(res.stdout)
    assert first == second
    logged = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in logged] == ["host.libudev_missing"]
    with_udev = cache_device(str(tmp_path))
    if with_udev["device"] != "unknown":  # a block device: the two readings agree
        for key in ("device", "rotational", "read_only", "size_bytes"):
            assert first[key] == with_udev[key], key


def test_sysfs_reading_of_a_partition(tmp_path: Path) -> None:
    """``/sys/dev/block/M:m`` of a partition: size and ro of the partition, model and
    queue of its disk."""
    disk = tmp_path / "devices" / "vda"
    part = disk / "vda1"
    (disk / "queue").mkdir(parents=True)
    (disk / "device").mkdir()
    part.mkdir()
    (disk / "queue" / "rotational").write_text("0\n")
    (disk / "device" / "model").write_text("FAST DISK  \n")
    (part / "partition").write_text("1\n")
    (part / "size").write_text("2048\n")
    (part / "ro").write_text("0\n")
    (part / "uevent").write_text("MAJOR=254\nMINOR=1\nDEVNAME=vda1\nDEVTYPE=partition\n")
    (tmp_path / "dev" / "block").mkdir(parents=True)
    (tmp_path / "dev" / "block" / "254:1").symlink_to(part)
    got = _from_sysfs(os.makedev(254, 1), str(tmp_path))
    assert got == {
        "device": "/dev/vda1",
        "model": "FAST DISK",
        "rotational": "0",
        "read_only": "0",
        "size_bytes": 2048 * 512,
    }
    assert _from_sysfs(os.makedev(254, 9), str(tmp_path))["device"] == "unknown"
