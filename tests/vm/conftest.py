"""Fixtures of the guest tier: they run inside the test VM as root, on the real kernel.

- ``loop_fs(size_mb, fstype)``: a fresh loop-mounted ext4/xfs filesystem (cachefiles
  refuses tmpfs at ``bind``), unmounted at teardown.
- ``erofs``: builds EROFS images with the guest's ``mkfs.erofs``.
- ``nginx``: Debian's nginx on a loopback port serving a folder (range requests, 206).
- ``remote_nginx``: nginx in another network namespace behind a veth pair, whose
  link the test can cut (``tests/vm/remote.py``).
- ``daemon``: runs ``cachefilesd-py`` as a real process with a config of the test's,
  logging JSON to a file, stopped with SIGTERM after the test's mounts are gone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.remote import RemoteNginx, start_remote_nginx
from tests.vm.rig import WORK, Daemon, Nginx, run, start_nginx

pytestmark = pytest.mark.guest


def free(path: Path) -> None:
    """Remove a test's files: the guest's /tmp is RAM (tmpfs), and a whole guest tier
    leaving every test's images and caches behind ran it out of space (ENOSPC in the
    later tests). Whatever a failed test left mounted below ``path`` is unmounted
    first, so the removal never reaches into another filesystem."""
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    below = [p for p in points if p == str(path) or p.startswith(f"{path}/")]
    for point in sorted(below, key=len, reverse=True):
        run("umount", "-l", point, check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _tmp_path_freed(tmp_path: Path) -> Iterator[None]:
    """Every guest test's ``tmp_path`` is removed after it (see :func:`free`)."""
    yield
    free(tmp_path)


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    path = tmp_path_factory.mktemp("vm")
    yield path
    free(path)


@pytest.fixture
def loop_fs(workdir: Path) -> Iterator[Callable[..., Path]]:
    mounted: list[Path] = []

    def make(size_mb: int, fstype: str = "ext4", name: str = "cache") -> Path:
        image = workdir / f"{name}.{fstype}.img"
        mnt = workdir / name
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        if fstype == "ext4":
            run("mkfs.ext4", "-q", "-F", "-b", "4096", str(image))
        elif fstype == "xfs":
            run("mkfs.xfs", "-q", "-f", str(image))
        else:
            raise ValueError(fstype)
        run("mount", "-o", "loop", str(image), str(mnt))
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in reversed(mounted):
        run("umount", str(mnt), check=False)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at teardown (before the daemon stops)."""
    points: list[Path] = []
    yield points
    for mnt in reversed(points):
        run("umount", str(mnt), check=False)


@pytest.fixture
def nginx(workdir: Path) -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def start(root: Path, access_log: bool = False) -> Nginx:
        n = start_nginx(root, workdir, access_log=access_log)
        started.append(n)
        return n

    yield start
    for n in started:
        n.proc.terminate()
        n.proc.wait(10)


@pytest.fixture
def remote_nginx(workdir: Path) -> Iterator[Callable[..., RemoteNginx]]:
    started: list[RemoteNginx] = []

    def start(root: Path, bearer: str | None = None) -> RemoteNginx:
        r = start_remote_nginx(root, workdir, bearer=bearer)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Callable[[str], Daemon]]:
    made: list[Daemon] = []

    def make(config_text: str) -> Daemon:
        conf = workdir / f"cachefilesd-{len(made)}.conf"
        conf.write_text(config_text)
        d = Daemon(conf, workdir / f"daemon-{len(made)}.log")
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None:
            d.stop()
        # leave the log for the host on failure
        results = os.environ.get("CACHEFILESD_VM_RESULTS")
        if results and d.log_path.exists():
            dest = Path(results) / "logs"
            dest.mkdir(exist_ok=True)
            (dest / f"{d.log_path.parent.name}-{d.log_path.name}").write_bytes(
                d.log_path.read_bytes()
            )
