"""The Debian package of this tree, built once per state of the tree.

``packaging/build-deb --key`` digests every file the build reads; a build is kept in
``.vmtest/deb/<key>/`` of the checkout. The host tier builds it there (the packaging
test), and the guest tier, which sees the checkout read-only, finds it; a guest that
finds none builds one in its own ``/tmp`` (slowly: the guest runs under TCG).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

TREE = Path(__file__).resolve().parents[1]
BUILD_DEB = TREE / "packaging" / "build-deb"
CACHES = (TREE / ".vmtest" / "deb", Path(tempfile.gettempdir()) / "cachefilesd-py-deb")


def tree_key() -> str:
    return subprocess.run(
        [str(BUILD_DEB), "--key"], check=True, capture_output=True, text=True
    ).stdout.strip()


def built_deb() -> Path:
    """The .deb of the tree as it is: a kept build of the same tree, else a new one."""
    key = tree_key()
    for cache in CACHES:
        found = sorted((cache / key).glob("cachefilesd-py_*.deb"))
        if found:
            return found[-1]
    for cache in CACHES:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache))
        except OSError:
            continue  # read-only (the checkout, seen from the guest)
        res = subprocess.run([str(BUILD_DEB), str(work)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"packaging/build-deb failed:\n{res.stderr[-4000:]}")
        try:
            os.rename(work, cache / key)
        except OSError:  # another process finished the same build first
            shutil.rmtree(work, ignore_errors=True)
        return sorted((cache / key).glob("cachefilesd-py_*.deb"))[-1]
    raise RuntimeError("no writable directory to build the package in")
