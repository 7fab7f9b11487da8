"""Host figures and the control CLI's surface."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachefilesd_py.control.cli import COMMANDS, main
from cachefilesd_py.daemon.host import cache_device, footprint


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
