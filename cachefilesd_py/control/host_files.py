"""The files a host needs besides the Python package, and where the tree keeps them.

The wheel carries them in ``cachefilesd_py/data/`` (``setup.py`` copies them there when
it builds), so that ``cachefilesctl install`` can put them in place after a ``pipx``
or ``pip`` installation; the Debian package installs them from the tree. This module
imports nothing but the standard library: ``setup.py`` reads :data:`SOURCES` from it.
"""

from __future__ import annotations

from pathlib import Path

#: name in ``cachefilesd_py/data/`` → path in the source tree
SOURCES: dict[str, str] = {
    "cachefilesd-py.service": "packaging/cachefilesd-py.service",
    "cachefilesd.conf": "conf/cachefilesd.conf",
    "tmpfiles.conf": "packaging/tmpfiles.d/cachefilesd-py.conf",
    "cachefilesd-py.8": "packaging/man/cachefilesd-py.8",
    "cachefilesctl.8": "packaging/man/cachefilesctl.8",
    "cachefilesd-py.conf.5": "packaging/man/cachefilesd-py.conf.5",
    "dbus-policy.conf": "packaging/dbus/org.cachefilesd_py.Cache1.conf",
}


def data_file(name: str) -> Path:
    """The file as installed with the package, else (a source checkout, an editable
    installation) where the tree keeps it."""
    here = Path(__file__).resolve().parents[1]
    packaged = here / "data" / name
    if packaged.is_file():
        return packaged
    return here.parent / SOURCES[name]
