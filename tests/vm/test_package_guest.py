"""The Debian package installed for real (the guest's /etc, /usr and /var are
writable overlays): README.md's "Install on a host" steps, short of systemd as PID 1.

- conffile cases: a fresh install gets the sample ``/etc/cachefilesd.conf``; an
  administrator's own file is kept; replacing an installed cachefilesd (C) removes it
  and keeps its edited configuration, which then belongs to this package and survives
  purging cachefilesd;
- the installed ``cachefilesd-py --check-config``, ``systemd-analyze verify`` of the
  installed unit, and of the mount unit systemd makes from README's fstab line;
- the installed daemon (started directly: the systemd-as-PID-1 rig comes later) serves
  an EROFS image mounted through it.

The guest is left as it was found: the package is purged at the end, and a cachefilesd
the host had installed is installed again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deb import built_deb
from tests.vm.rig import mkfs_erofs, mount_erofs, run, tree_digests

# dpkg and postinst's byte-compilation are slow under TCG
pytestmark = [pytest.mark.guest, pytest.mark.timeout(1800)]

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cachefilesd-py"
C_DEB = sorted((CACHE / "cachefilesd-c").glob("cachefilesd_*.deb"))
CONF = Path("/etc/cachefilesd.conf")
SAMPLE = Path(__file__).resolve().parents[2] / "conf" / "cachefilesd.conf"
POLICY = Path("/usr/sbin/policy-rc.d")
MANDB_AUTO = Path("/var/lib/man-db/auto-update")
UNIT = "/lib/systemd/system/cachefilesd-py.service"
#: README.md's fstab line
FSTAB = (
    "none /srv/images/base erofs "
    "fsid=base.erofs,_netdev,nofail,x-systemd.requires=cachefilesd-py.service 0 0\n"
)


def apt_install(deb: Path) -> subprocess.CompletedProcess[str]:
    """README's command, unattended (an existing configuration is kept)."""
    return dpkg(
        "-y",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        "install",
        str(deb),
        tool="apt-get",
    )


def dpkg(*args: str, check: bool = True, tool: str = "dpkg") -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [tool, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        timeout=600,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"{tool} {' '.join(args)}: {res.returncode}\n{res.stdout}\n{res.stderr}"
        )
    return res


def status(package: str) -> str:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], capture_output=True, text=True
    )
    return res.stdout.strip() if res.returncode == 0 else "absent"


def purge_all() -> None:
    for package in ("cachefilesd-py", "cachefilesd"):
        if status(package) != "absent":
            dpkg("--purge", package)
    CONF.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    assert C_DEB, "cachefilesd's .deb missing: run scripts/setup"
    deb = built_deb()
    had_c = status("cachefilesd").startswith("ii")
    saved_conf = CONF.read_bytes() if CONF.exists() else None
    # no maintainer script may start a daemon here; no man-db index rebuild per install
    POLICY.write_text("#!/bin/sh\nexit 101\n")
    POLICY.chmod(0o755)
    mandb = MANDB_AUTO.exists()
    MANDB_AUTO.unlink(missing_ok=True)
    purge_all()
    yield deb
    purge_all()
    if had_c:
        dpkg("-i", str(C_DEB[-1]))
    if saved_conf is not None:
        CONF.write_bytes(saved_conf)
    POLICY.unlink(missing_ok=True)
    if mandb:
        MANDB_AUTO.touch()


def test_fresh_install_then_purge(deb: Path) -> None:
    apt_install(deb)
    assert status("cachefilesd-py") == "ii"
    assert CONF.read_bytes() == SAMPLE.read_bytes()
    # tmpfiles.d made the sample's cache directory; the unit is installed, not enabled
    st = os.stat("/var/cache/fscache")
    assert oct(st.st_mode & 0o777) == "0o700"
    assert Path(UNIT).is_file()
    assert not Path("/etc/systemd/system/multi-user.target.wants/cachefilesd-py.service").exists()
    # postinst compiled the environment; purge leaves nothing behind
    assert list(Path("/usr/lib/cachefilesd-py/lib").rglob("cachefilesd_py/__pycache__/*.pyc"))
    dpkg("--purge", "cachefilesd-py")
    assert not CONF.exists() and not Path("/usr/lib/cachefilesd-py").exists()


def test_an_administrators_configuration_is_kept(deb: Path) -> None:
    mine = "# mine\ndir /var/cache/fscache\ntag mine\n"
    CONF.write_text(mine)
    dpkg("-i", "--force-confdef", "--force-confold", str(deb))
    assert CONF.read_text() == mine
    assert Path(f"{CONF}.dpkg-dist").read_bytes() == SAMPLE.read_bytes()
    dpkg("--purge", "cachefilesd-py")
    Path(f"{CONF}.dpkg-dist").unlink(missing_ok=True)


def test_replacing_cachefilesd_keeps_its_configuration(deb: Path) -> None:
    dpkg("-i", str(C_DEB[-1]))
    assert status("cachefilesd") == "ii"
    edited = CONF.read_text().replace("tag mycache", "tag edited-for-nfs")
    assert edited != CONF.read_text()
    CONF.write_text(edited)
    res = apt_install(deb)
    # Conflicts + Replaces: cachefilesd is removed
    assert status("cachefilesd") in ("absent", "rc", "un"), res.stdout
    assert status("cachefilesd-py") == "ii"
    assert CONF.read_text() == edited
    owner = subprocess.run(["dpkg", "-S", str(CONF)], capture_output=True, text=True).stdout
    assert owner.startswith("cachefilesd-py:"), owner
    # purging cachefilesd now leaves the configuration alone
    if status("cachefilesd") != "absent":
        dpkg("--purge", "cachefilesd")
    assert CONF.read_text() == edited
    assert not Path("/sbin/cachefilesd").exists() and not Path("/usr/sbin/cachefilesd").exists()


@pytest.fixture
def installed(deb: Path) -> Path:
    if status("cachefilesd-py") != "ii":
        dpkg("-i", "--force-confdef", "--force-confold", str(deb))
    return Path("/usr/sbin/cachefilesd-py")


def test_installed_check_config(installed: Path, loop_fs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = loop_fs(64)
    conf = tmp_path / "c.conf"
    conf.write_text(f"dir {cache}\nondemand\nsource * file:///srv/blobs/{{cookie}}\n")
    res = subprocess.run(
        [str(installed), "--check-config", "-f", str(conf)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    for probe in ("on ext4", "O_TMPFILE works", "user xattrs work", "SEEK_DATA", "O_DIRECT works"):
        assert probe in res.stdout
    assert "#   ok      /dev/cachefiles exists" in res.stdout and "#   bind ondemand" in res.stdout
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    run("mount", "-t", "tmpfs", "none", str(tmpfs))
    try:
        conf.write_text(f"dir {tmpfs}\n")
        res = subprocess.run(
            [str(installed), "--check-config", "-f", str(conf)], capture_output=True, text=True
        )
    finally:
        run("umount", str(tmpfs))
    assert res.returncode == 1 and "tmpfs has no sync_fs" in res.stderr


def test_installed_unit_and_fstab_mount_verify(installed: Path, tmp_path: Path) -> None:
    res = subprocess.run(["systemd-analyze", "verify", UNIT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "failed" not in res.stderr and "not executable" not in res.stderr, res.stderr
    # the mount unit systemd generates from README's fstab line, with the daemon's unit
    fstab, out = tmp_path / "fstab", tmp_path / "generated"
    fstab.write_text(FSTAB)
    out.mkdir()
    generator = "/lib/systemd/system-generators/systemd-fstab-generator"
    subprocess.run([generator, out, out, out], env={"SYSTEMD_FSTAB": str(fstab)}, check=True)
    mount = (out / "srv-images-base.mount").read_text()
    assert "Requires=cachefilesd-py.service" in mount and "After=cachefilesd-py.service" in mount
    res = subprocess.run(
        ["systemd-analyze", "verify", "srv-images-base.mount", "remote-fs.target"],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{out}:"},
    )
    assert res.returncode == 0, res.stderr
    assert "failed" not in res.stderr and "cycle" not in res.stderr, res.stderr


def test_installed_daemon_serves_an_erofs_mount(
    installed: Path,
    loop_fs,
    erofs_tree: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """README's configuration step: /etc/cachefilesd.conf edited for on-demand mode,
    the cache on its own filesystem at /var/cache/fscache; the installed daemon runs
    with its defaults (-f /etc/cachefilesd.conf) and serves one EROFS image."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    mkfs_erofs(blobs / "base.erofs", erofs_tree)
    cache = loop_fs(128)
    fscache = Path("/var/cache/fscache")
    fscache.mkdir(parents=True, exist_ok=True)
    run("mount", "--bind", str(cache), str(fscache))
    # the sample, whatever an earlier test left in /etc/cachefilesd.conf
    sample = SAMPLE.read_text()
    assert "\n#ondemand\n" in sample
    CONF.write_text(
        sample.replace("\n#ondemand\n", "\nondemand\n") + f"source * file://{blobs}/{{cookie}}\n"
    )
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(installed), "-n", "-s", "--log-format", "json"], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while not any(e.get("event") == "ready" for e in events(log)):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        ready = next(e for e in events(log) if e.get("event") == "ready")
        assert ready["mode"] == "ondemand", ready
        mount_erofs(mnt, "base.erofs")
        try:
            assert tree_digests(mnt) == tree_digests(erofs_tree)
        finally:
            run("umount", str(mnt))
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        run("umount", str(fscache), check=False)
    assert rc == 0, log.read_text()[-3000:]
    ready = next(e for e in events(log) if e.get("event") == "ready")
    assert ready["mode"] == "ondemand" and ready["cache_dir"] == str(fscache)


def events(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out


@pytest.fixture
def erofs_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("guest\n")
    (tree / "big.bin").write_bytes(os.urandom(3 << 20))
    shutil.copy(SAMPLE, tree / "cachefilesd.conf")
    return tree
