"""Host figures and the control CLI's surface."""

from __future__ import annotations

import pytest

from cachefilesd_py.control.cli import COMMANDS, main
from cachefilesd_py.daemon.host import cache_device, footprint


def test_cache_device_of_this_filesystem() -> None:
    info = cache_device("/")
    assert "device" in info


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
