"""Build hook (everything else is in pyproject.toml): the wheel carries the files a
host installation needs (``cachefilesctl install``): the systemd unit, the sample
configuration, the tmpfiles.d entry and the manual pages, copied from where the tree
keeps them (``cachefilesd_py/control/host_files.py``) into ``cachefilesd_py/data/``."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SOURCES: dict[str, str] = runpy.run_path(str(HERE / "cachefilesd_py/control/host_files.py"))[
    "SOURCES"
]


class BuildPyWithHostFiles(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "cachefilesd_py" / "data"
        target.mkdir(parents=True, exist_ok=True)
        for name, source in SOURCES.items():
            shutil.copyfile(HERE / source, target / name)


setup(cmdclass={"build_py": BuildPyWithHostFiles})
