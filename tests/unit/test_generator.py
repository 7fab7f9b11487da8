"""The systemd generator (daemon/generator.py): the drop-in derived from the config."""

from __future__ import annotations

from pathlib import Path

from cachefilesd_py.daemon.generator import DROPIN, UNIT, generate, main, unit_path


def run(tmp_path: Path, conf_text: str) -> str | None:
    conf = tmp_path / "cachefilesd.conf"
    conf.write_text(conf_text)
    out = tmp_path / "gen"
    generate(out, str(conf))
    path = out / f"{UNIT}.d" / DROPIN
    return path.read_text() if path.exists() else None


def test_cache_dir_is_required_and_writable(tmp_path: Path) -> None:
    text = run(tmp_path, "dir /srv/fscache\nondemand\nsource * https://h/{cookie}\n")
    assert text is not None
    assert "RequiresMountsFor=/srv/fscache\n" in text
    assert "ReadWritePaths=/srv/fscache\n" in text
    assert "ProtectHome" not in text and "PrivateTmp" not in text


def test_file_sources_are_mounted_first_and_made_visible(tmp_path: Path) -> None:
    text = run(
        tmp_path,
        "dir /var/cache/fscache\nondemand\n"
        "source a/* file:///home/blobs/{cookie}\n"
        "source * file:///tmp/imgs/{volume}/{cookie}\n",
    )
    assert text is not None
    assert "RequiresMountsFor=/home/blobs\n" in text
    assert "RequiresMountsFor=/tmp/imgs\n" in text
    assert "ProtectHome=read-only\n" in text and "PrivateTmp=no\n" in text


def test_a_bad_config_writes_nothing_and_does_not_fail(tmp_path: Path) -> None:
    assert run(tmp_path, "dir /x\nbogus 1\n") is None
    conf = tmp_path / "absent.conf"
    assert main([str(tmp_path / "gen2")]) == 0 or conf.exists() is False


def test_paths_are_escaped_for_unit_files() -> None:
    assert unit_path("/var/cache/fscache") == "/var/cache/fscache"
    assert unit_path("/srv/my cache") == '"/srv/my cache"'
    assert unit_path("/srv/100%") == "/srv/100%%"


def test_without_arguments_it_is_a_usage_error() -> None:
    assert main([]) == 2
