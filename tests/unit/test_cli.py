"""The daemon's command line: cachefilesd's flags and exit statuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cachefilesd_py.daemon.cli import main, parse_args


def test_flags_like_cachefilesd() -> None:
    o = parse_args(["-d", "-d", "-s", "-n", "-N", "-f", "/x.conf", "-p", "/p.pid"])
    assert (o.debug, o.stderr, o.foreground, o.nocull) == (2, True, True, True)
    assert (o.config_path, o.pidfile) == ("/x.conf", "/p.pid")


def test_version_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["-v"])
    assert e.value.code == 0
    assert "cachefilesd-py version" in capsys.readouterr().out


def test_unknown_option_exits_2() -> None:
    with pytest.raises(SystemExit) as e:
        main(["-F"])
    assert e.value.code == 2


def test_check_config_good_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.conf"
    good.write_text(f"dir {tmp_path}\nondemand\nsource * http://h/{{cookie}}\nbrun 20%\n")
    assert main(["--check-config", "-f", str(good)]) == 0
    out = capsys.readouterr().out
    assert "brun 20%" in out and "bind ondemand" in out
    bad = tmp_path / "bad.conf"
    bad.write_text(f"dir {tmp_path}\nbcull 9%\n")
    assert main(["--check-config", "-f", str(bad)]) == 2
    assert f"{bad}:2: " in capsys.readouterr().err


def test_shipped_sample_config_is_valid(tmp_path: Path) -> None:
    """The sample, with its cache directory moved to one that exists here."""
    sample = (Path(__file__).parents[2] / "conf" / "cachefilesd.conf").read_text()
    assert "\ndir /var/cache/fscache\n" in sample
    conf = tmp_path / "cachefilesd.conf"
    conf.write_text(sample.replace("\ndir /var/cache/fscache\n", f"\ndir {tmp_path}\n"))
    assert main(["--check-config", "-f", str(conf)]) == 0


def test_console_script_reports_errors_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("dir /x\nbogus\n")
    res = subprocess.run(
        [sys.executable, "-m", "cachefilesd_py.daemon.cli", "--check-config", "-f", str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert f"{bad}:2: unknown directive 'bogus'" in res.stderr


def test_missing_config_file_is_an_os_error(tmp_path: Path) -> None:
    assert main(["--check-config", "-f", str(tmp_path / "absent.conf")]) == 1

