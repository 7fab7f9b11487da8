"""The Debian package of this tree, built once per state of what the build reads.

:func:`tree_key` digests the files ``packaging/build-deb`` copies into its build
(``SOURCES``); a build is kept in ``.vmtest/deb/<key>/`` of the checkout. The host tier
builds it there (``tests/integration/test_package.py``); the guest tier, which sees the
checkout read-only and runs too slowly under TCG to build, uses that build and says
how to make one when there is none.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

TREE = Path(__file__).resolve().parents[1]
BUILD_DEB = TREE / "packaging" / "build-deb"
CACHE = TREE / ".vmtest" / "deb"
#: what the build reads (packaging/build-deb copies the same)
SOURCES = (
    "cachefilesd_py",
    "conf",
    "packaging",
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "LICENSE",
    "README.md",
)


def tree_key() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        top = TREE / name
        paths = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in paths:
            if "__pycache__" in path.parts or not path.is_file():
                continue
            digest.update(str(path.relative_to(TREE)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def built_deb() -> Path:
    """The .deb of the tree as it is: a kept build of the same tree, else (on the host)
    a new one."""
    key = tree_key()
    found = sorted((CACHE / key).glob("cachefilesd-py_*.deb"))
    if found:
        return found[-1]
    if os.environ.get("CACHEFILESD_GUEST"):
        raise RuntimeError(
            f"no package built for this tree ({CACHE / key}): build it on the host first, "
            "with: python -c 'from tests.deb import built_deb; built_deb()'"
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=CACHE))
    res = subprocess.run([str(BUILD_DEB), str(work)], capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"packaging/build-deb failed:\n{res.stderr[-4000:]}")
    try:
        os.rename(work, CACHE / key)
    except OSError:  # another process finished the same build first
        shutil.rmtree(work, ignore_errors=True)
    for stale in CACHE.iterdir():  # builds of earlier states of the tree
        if stale.name != key and "." not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return sorted((CACHE / key).glob("cachefilesd-py_*.deb"))[-1]
