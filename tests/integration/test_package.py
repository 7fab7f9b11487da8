"""The Debian package, built from ``packaging/debian/`` with ``dpkg-buildpackage -us -uc
-b``: what it holds, that lintian finds no error, that the unpacked daemon checks a
configuration, and that its unit passes ``systemd-analyze verify``.

Installing it, the conffile cases and serving a mount with the installed daemon are
guest tests (``tests/vm/test_package_guest.py``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.deb import TREE, built_deb

pytestmark = pytest.mark.slow

VENV = "usr/lib/cachefilesd-py"
SITE = f"{VENV}/lib/python3.11/site-packages"


@pytest.fixture(scope="module")
def deb() -> Path:
    return built_deb()


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def pins() -> dict[str, str]:
    lines = (TREE / "packaging" / "requirements.txt").read_text().splitlines()
    return dict(
        line.split("==") for line in (raw.strip() for raw in lines) if line and line[0] != "#"
    )


def field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_control_fields(deb: Path) -> None:
    version = tomllib.loads((TREE / "pyproject.toml").read_text())["project"]["version"]
    assert field(deb, "Version") == version
    for name in ("Conflicts", "Replaces", "Provides"):
        assert field(deb, name) == "cachefilesd"
    depends = field(deb, "Depends")
    assert "python3 (>= 3.11~), python3 (<< 3.12~), python3.11" in depends
    assert field(deb, "Recommends") == "libudev1"
    control = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(deb)], check=True, capture_output=True
    ).stdout
    listing = subprocess.run(
        ["tar", "-xOf", "-", "./conffiles"], input=control, check=True, capture_output=True
    ).stdout.decode()
    assert listing.split() == ["/etc/cachefilesd.conf"]
    postinst = subprocess.run(
        ["tar", "-xOf", "-", "./postinst"], input=control, check=True, capture_output=True
    ).stdout.decode()
    # installing does not enable the unit (the configuration comes first): it is
    # enabled again only on upgrades of an installation where it was enabled
    assert "if deb-systemd-helper debian-installed 'cachefilesd-py.service'; then" in postinst
    assert "--create cachefilesd-py.conf" in postinst


def test_file_list(deb: Path, unpacked: Path) -> None:
    files = {str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if not p.is_dir()}
    for want in (
        "usr/sbin/cachefilesd-py",
        "usr/sbin/cachefilesctl",
        "lib/systemd/system/cachefilesd-py.service",
        "etc/cachefilesd.conf",
        "usr/lib/tmpfiles.d/cachefilesd-py.conf",
        "usr/share/man/man8/cachefilesd-py.8.gz",
        "usr/share/man/man8/cachefilesctl.8.gz",
        "usr/share/man/man5/cachefilesd-py.conf.5.gz",
        "usr/share/doc/cachefilesd-py/copyright",
        "usr/share/dbus-1/system.d/org.cachefilesd_py.Cache1.conf",
        "usr/lib/systemd/system-generators/cachefilesd-py-generator",
        f"{VENV}/pyvenv.cfg",
        f"{VENV}/installed-versions.txt",
        f"{SITE}/cachefilesd_py/daemon/cli.py",
        f"{SITE}/cachefilesd_py/data/cachefilesd-py.service",
        f"{SITE}/cachefilesd_py/data/cachefilesd.conf",
    ):
        assert want in files, want
    for name, version in pins().items():
        dist = name.replace("-", "_")
        assert f"{SITE}/{dist}-{version}.dist-info/METADATA" in files, (name, version)
    # no bytecode shipped (postinst writes it), nothing outside the expected trees
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    tops = {f.split("/")[0] + "/" + f.split("/")[1] for f in files}
    assert tops <= {"etc/cachefilesd.conf", "lib/systemd", "usr/lib", "usr/sbin", "usr/share"}
    # the environment's interpreter is Debian's, whatever the build host had on PATH
    python = unpacked / VENV / "bin" / "python3.11"
    assert os.path.normpath(python.parent / os.readlink(python)) == str(
        unpacked / "usr/bin/python3.11"
    )
    assert "home = /usr/bin\n" in (unpacked / VENV / "pyvenv.cfg").read_text()
    # no trace of the build directory anywhere
    leaks = subprocess.run(
        ["grep", "-rlE", "debian/cachefilesd-py|debian/wheels|/tmp/tmp", str(unpacked)],
        capture_output=True,
        text=True,
    ).stdout
    assert leaks == ""
    versions = (unpacked / VENV / "installed-versions.txt").read_text()
    for name, version in pins().items():
        assert re.search(rf"(?im)^{name.replace('-', '[-_]')}=={re.escape(version)}$", versions)


def test_commands_run_from_the_unpacked_tree(unpacked: Path, tmp_path: Path) -> None:
    """``/usr/sbin/cachefilesd-py --check-config`` of the package, run where it lies:
    Debian's python3, isolated, importing only from the package's environment."""
    daemon = unpacked / "usr/sbin/cachefilesd-py"
    assert daemon.read_text().startswith("#!/usr/bin/python3 -IS\n")
    conf = tmp_path / "cachefilesd.conf"
    sample = (unpacked / "etc/cachefilesd.conf").read_text()
    conf.write_text(sample.replace("\ndir /var/cache/fscache\n", f"\ndir {tmp_path}\n"))
    res = subprocess.run(
        [str(daemon), "--check-config", "-f", str(conf)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
    )
    assert res.returncode == 0, res.stderr
    assert f"\ndir {tmp_path}\ntag mycache\n#secctx <label>\nbrun 10%\n" in res.stdout
    assert "#   bind\n" in res.stdout
    # every module of the project and of its dependencies comes from the package
    ctl = unpacked / "usr/sbin/cachefilesctl"
    traced = subprocess.run(
        ["/usr/bin/python3", "-IS", "-v", str(ctl)], capture_output=True, text=True, cwd=TREE
    )
    assert traced.returncode == 0 and "verify" in traced.stdout, traced.stderr[-2000:]
    loaded = re.findall(r"^# code object from '?([^'\n]+?)'?$", traced.stderr, re.MULTILINE)
    ours = [p for p in loaded if re.search(r"/(cachefilesd_py|urllib3|structlog)/", p)]
    assert ours and all(p.startswith(str(unpacked / SITE)) for p in ours), ours[:5]
    # the generator finds the package's environment from three levels below /usr
    conf = tmp_path / "gen.conf"
    conf.write_text(f"dir {tmp_path}/cache\nondemand\nsource * file:///srv/blobs/{{cookie}}\n")
    out = tmp_path / "generated"
    gen = unpacked / "usr/lib/systemd/system-generators/cachefilesd-py-generator"
    res = subprocess.run(
        [str(gen), str(out)], capture_output=True, text=True,
        env={**os.environ, "CACHEFILESD_PY_CONFIG": str(conf)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    dropins = list(out.rglob("*.conf"))
    assert dropins and f"{tmp_path}/cache" in dropins[0].read_text()
    bad = tmp_path / "bad.conf"
    bad.write_text(f"dir {tmp_path}\nbrun  10%\nbcull 7% \n")
    res = subprocess.run([str(daemon), "--check-config", "-f", str(bad)], capture_output=True)
    assert res.returncode == 2 and f"{bad}:3: bcull: ".encode() in res.stderr


def test_unit_passes_systemd_analyze_verify(unpacked: Path, tmp_path: Path) -> None:
    """The installed unit, checked with the package as the root: its commands exist and
    are executable, and its Documentation= pages are the package's."""
    root = tmp_path / "root"
    shutil.copytree(unpacked, root, symlinks=True)
    unit = (root / "lib/systemd/system/cachefilesd-py.service").read_text()
    assert "\nExecStart=/usr/sbin/cachefilesd-py -n " in unit
    assert "\nExecReload=/usr/sbin/cachefilesd-py --check-config " in unit
    # the unit's other commands are the host's own tools: put them in the root
    for tool in re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", unit, re.MULTILINE):
        target = root / tool.lstrip("/")
        if not target.exists() and os.path.exists(tool):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tool, target)
    res = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={root}",
            "/lib/systemd/system/cachefilesd-py.service",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MANPATH": str(root / "usr/share/man")},
    )
    assert res.returncode == 0, res.stderr
    assert "failed" not in res.stderr and "not executable" not in res.stderr, res.stderr


def test_lintian_finds_no_error(deb: Path) -> None:
    res = subprocess.run(
        ["lintian", "--fail-on", "error", str(deb)],
        capture_output=True,
        text=True,
    )
    tags = [line for line in res.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert res.returncode == 0 and not tags, res.stdout + res.stderr


def run_maintainer_scripts(
    deb: Path, tmp_path: Path, steps: list[tuple[str, ...]], *, installed: bool
) -> list[list[str]]:
    """Run the package's maintainer scripts in the order dpkg would (``steps``: script
    name and arguments) with systemd "running" and every command that would touch the
    unit replaced by a stub that records its arguments; returns those records.
    ``installed``: deb-systemd-helper's answer to ``debian-installed`` and
    ``was-enabled`` (an earlier version was installed and its unit enabled).

    The scripts come from the built package, as dpkg runs them. Only two paths are
    moved into ``tmp_path``: ``/run/systemd/system`` (whose presence tells a script
    that systemd runs) and the package's environment, which prerm cleans."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    running = tmp_path / "run-systemd-system"
    running.mkdir()
    venv = tmp_path / "venv"
    (venv / "lib" / "__pycache__").mkdir(parents=True)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    record = tmp_path / "calls"
    for tool in ("deb-systemd-invoke", "deb-systemd-helper", "systemctl", "systemd-tmpfiles",
                 "invoke-rc.d", "service"):
        stub = stubs / tool
        answer = 0 if installed or tool != "deb-systemd-helper" else 1
        stub.write_text(
            f'#!/bin/sh\necho "{tool} $*" >>"{record}"\n'
            f'case " $* " in *" debian-installed "*|*" was-enabled "*) exit {answer};; esac\n'
            "exit 0\n"
        )
        stub.chmod(0o755)
    for name, *args in steps:
        script = control / name
        if not script.exists():
            continue
        text = script.read_text()
        text = text.replace("/run/systemd/system", str(running))
        text = text.replace("/usr/lib/cachefilesd-py", str(venv))
        text = text.replace("/usr/bin/deb-systemd-helper", str(stubs / "deb-systemd-helper"))
        moved = tmp_path / f"{name}.sh"
        moved.write_text(text)
        res = subprocess.run(
            ["/bin/sh", str(moved), *args], capture_output=True, text=True,
            env={"PATH": f"{stubs}:/usr/bin:/bin", "DPKG_MAINTSCRIPT_NAME": name},
        )
        assert res.returncode == 0, (name, args, res.stderr)
    return [line.split() for line in record.read_text().splitlines()] if record.exists() else []


def unit_actions(calls: list[list[str]]) -> list[str]:
    """What the scripts asked systemd to do with the unit: "restart", "stop", ..."""
    out = []
    for call in calls:
        if call[-1] != "cachefilesd-py.service":
            continue
        if call[0] in ("deb-systemd-invoke", "invoke-rc.d", "service"):
            out.append(call[1] if call[0] == "deb-systemd-invoke" else call[-2])
        elif call[0] == "systemctl":
            out.append(next(a for a in call[1:] if not a.startswith("-")))
    return out


def test_an_upgrade_restarts_the_unit_and_never_stops_it(deb: Path, tmp_path: Path) -> None:
    """An upgrade must keep an on-demand cache bound (docs/failover.md, "Upgrades"):
    ``systemctl restart`` keeps systemd's fd store, so the new version takes the
    device back; a ``stop`` (in the old prerm or the new preinst, as
    ``dh_installsystemd --no-restart-after-upgrade`` would generate) closes the store,
    unbinds the cache and fails every read on the mounts it served. dpkg's order for
    an upgrade (Debian Policy 6.6): old prerm, new preinst, unpack, old postrm, new
    postinst. Here old and new are this package."""
    old, new = "0.0.9", field(deb, "Version")
    upgrade = run_maintainer_scripts(deb, tmp_path, [
        ("prerm", "upgrade", new),
        ("preinst", "upgrade", old),
        ("postrm", "upgrade", new),
        ("postinst", "configure", old),
    ], installed=True)
    assert unit_actions(upgrade) == ["restart"], upgrade
    # after the daemon-reload that loads the new unit file
    reload = upgrade.index(["systemctl", "--system", "daemon-reload"])
    assert reload < upgrade.index(["deb-systemd-invoke", "restart", "cachefilesd-py.service"])


def test_install_does_not_start_and_remove_stops(deb: Path, tmp_path: Path) -> None:
    """A first install asks for a start, which deb-systemd-invoke skips for a unit that
    is not enabled (the package does not enable it: configure first); a removal stops
    the daemon (and so unbinds the cache: unmount first)."""
    install = run_maintainer_scripts(deb, tmp_path / "install", [
        ("preinst", "install"),
        ("postinst", "configure"),
    ], installed=False)
    assert unit_actions(install) == ["start"], install
    assert not [c for c in install if c[:2] == ["deb-systemd-helper", "enable"]], install
    remove = run_maintainer_scripts(deb, tmp_path / "remove", [
        ("prerm", "remove"),
        ("postrm", "remove"),
    ], installed=True)
    assert unit_actions(remove) == ["stop"], remove
