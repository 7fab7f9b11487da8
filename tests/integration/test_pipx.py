"""The non-Debian path of README.md: ``pipx install .`` then ``cachefilesctl install``.

The wheel must carry what a host needs besides the code (the unit, the sample
configuration, the tmpfiles.d entry, the D-Bus policy, the manual pages: ``setup.py``
copies them into ``cachefilesd_py/data/``), and ``cachefilesctl install`` must put
them in place with the unit naming the daemon pipx installed. pipx runs with a private PIPX_HOME and
installs from the wheelhouse scripts/setup fills (no index)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cachefilesd_py.control import host_files
from tests.deb import TREE

pytestmark = pytest.mark.slow

WHEELHOUSE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
    "cachefilesd-py/wheelhouse"
)
#: what the build reads (as packaging/build-deb copies it)
SOURCES = ("cachefilesd_py", "conf", "packaging", "pyproject.toml", "setup.py", "MANIFEST.in")


def test_pipx_install_then_cachefilesctl_install(tmp_path: Path) -> None:
    pipx = shutil.which("pipx")
    assert pipx, "pipx missing: run scripts/setup"
    src = tmp_path / "src"
    src.mkdir()
    for name in (*SOURCES, "LICENSE", "README.md"):
        if (TREE / name).is_dir():
            shutil.copytree(TREE / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(TREE / name, src / name)
    home, bin_dir = tmp_path / "pipx", tmp_path / "bin"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PIPX_HOME": str(home),
        "PIPX_BIN_DIR": str(bin_dir),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(WHEELHOUSE),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    res = subprocess.run(
        [pipx, "install", str(src)], capture_output=True, text=True, env=env, timeout=900
    )
    assert res.returncode == 0, res.stdout + res.stderr
    venv = home / "venvs" / "cachefilesd-py"
    carried = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from cachefilesd_py.control.host_files import SOURCES, data_file\n"
            "for name in SOURCES: print(data_file(name))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not the checkout: python -c puts the working directory first
    ).stdout.split()
    assert len(carried) == len(host_files.SOURCES)
    assert all("/site-packages/cachefilesd_py/data/" in p for p in carried), carried

    root = tmp_path / "root"
    res = subprocess.run(
        [str(bin_dir / "cachefilesctl"), "install", "--root", str(root)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    unit = (root / "etc/systemd/system/cachefilesd-py.service").read_text()
    assert f"\nExecStart={venv}/bin/cachefilesd-py -n " in unit
    assert (root / "etc/cachefilesd.conf").read_bytes() == (
        TREE / "conf/cachefilesd.conf"
    ).read_bytes()
    assert (root / "usr/local/share/man/man5/cachefilesd-py.conf.5").is_file()
    assert (root / "etc/tmpfiles.d/cachefilesd-py.conf").is_file()
    assert (root / "etc/dbus-1/system.d/org.cachefilesd_py.Cache1.conf").is_file()

    conf = tmp_path / "c.conf"
    conf.write_text(f"dir {tmp_path}\n")
    res = subprocess.run(
        [str(bin_dir / "cachefilesd-py"), "--check-config", "-f", str(conf)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0 and f"\ndir {tmp_path}\n" in res.stdout, res.stderr
