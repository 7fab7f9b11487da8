"""``cachefilesctl install`` (the pipx/pip path): the unit names this installation's
daemon, an existing configuration is kept, the manual pages land under the prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachefilesd_py.control.host_files import SOURCES, data_file
from cachefilesd_py.control.install import install, installed_daemon, render_unit

TREE = Path(__file__).resolve().parents[2]


def test_every_host_file_exists_in_the_tree() -> None:
    for name, source in SOURCES.items():
        assert (TREE / source).is_file(), source
        assert data_file(name).read_bytes() == (TREE / source).read_bytes()


def test_unit_names_the_installed_daemon() -> None:
    unit = (TREE / "packaging" / "cachefilesd-py.service").read_text()
    out = render_unit(unit, Path("/opt/pipx/venvs/cachefilesd-py/bin/cachefilesd-py"))
    assert "\nExecStart=/opt/pipx/venvs/cachefilesd-py/bin/cachefilesd-py -n " in out
    assert out.count("cachefilesd-py -n") == 1
    with pytest.raises(ValueError):
        render_unit("[Service]\nExecStart=/bin/true\n", Path("/x/cachefilesd-py"))


def test_install_below_a_root(tmp_path: Path) -> None:
    daemon = installed_daemon()
    assert daemon.is_file()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "cachefilesd.conf").write_text("dir /srv/cache\n")
    done = install(tmp_path, "/usr/local", daemon)
    assert "kept      /etc/cachefilesd.conf (already there)" in done
    assert (tmp_path / "etc" / "cachefilesd.conf").read_text() == "dir /srv/cache\n"
    unit = (tmp_path / "etc/systemd/system/cachefilesd-py.service").read_text()
    assert f"ExecStart={daemon} -n" in unit
    for page in ("man8/cachefilesd-py.8", "man8/cachefilesctl.8", "man5/cachefilesd-py.conf.5"):
        assert (tmp_path / "usr/local/share/man" / page).is_file()
    assert (tmp_path / "etc/tmpfiles.d/cachefilesd-py.conf").read_text().count("\nd ") == 1
    policy = tmp_path / "etc/dbus-1/system.d/org.cachefilesd_py.Cache1.conf"
    assert '<allow own="org.cachefilesd_py.Cache1"/>' in policy.read_text()
    (tmp_path / "etc" / "cachefilesd.conf").unlink()
    install(tmp_path, "/usr/local", daemon)
    sample = (TREE / "conf" / "cachefilesd.conf").read_text()
    assert (tmp_path / "etc" / "cachefilesd.conf").read_text() == sample


def test_a_daemon_under_a_home_directory_is_refused(tmp_path: Path) -> None:
    fake = Path("/root/.local/bin/cachefilesd-py")
    with pytest.raises((PermissionError, FileNotFoundError)):
        install(tmp_path, "/usr/local", fake)


def test_package_pins_are_the_tested_versions_and_in_range() -> None:
    """packaging/requirements.txt pins what the Debian package ships; scripts/setup
    installs the same versions in .venv, so the suite runs on what is shipped."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pins = {}
    for line in (TREE / "packaging" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[name] = pinned
    declared = tomllib.loads((TREE / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {Requirement(d).name: Requirement(d).specifier for d in declared}
    assert pins.keys() == ranges.keys()
    for name, pinned in pins.items():
        assert pinned in ranges[name], (name, pinned, ranges[name])
        assert version(name) == pinned, (name, version(name), pinned)


def test_the_package_build_and_its_cache_key_read_the_same_files() -> None:
    import re

    from tests.deb import SOURCES as KEYED

    script = (TREE / "packaging" / "build-deb").read_text()
    m = re.search(r"^SOURCES=\(([^)]*)\)", script, re.MULTILINE)
    assert m is not None
    assert tuple(m.group(1).split()) == KEYED
