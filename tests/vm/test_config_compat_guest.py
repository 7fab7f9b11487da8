"""The ``c`` column of the compatibility table, checked against cachefilesd itself.

Debian's ``cachefilesd`` 0.10.10 binary (unpacked by scripts/setup, not installed)
reads each row's file on the real kernel. Its cache directory is a tmpfs, which the
kernel refuses at ``bind`` (no ``sync_fs``): a file it accepts ends in "CacheFiles
bind failed: errno 95" (exit 1); a file it refuses ends with exit status 2 ("config
error") or with "Can't confirm cache location" (exit 1) before any bind. The ``debug``
rows are also checked for the mask the kernel ended up with.

Then one file using every accepted form is bound for real, on ext4, by cachefilesd and
by this daemon's commands (``kernel_commands`` of the parsed file): the kernel's state
line gives the same six limits for both.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.config import check
from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.frontends.bind import kernel_commands
from tests.unit.c_config_table import ROWS
from tests.vm.rig import run

# one process of cachefilesd per row: minutes under TCG
pytestmark = [pytest.mark.guest, pytest.mark.timeout(1800)]

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cachefilesd-py"
CACHEFILESD = CACHE / "cachefilesd-c" / "root" / "sbin" / "cachefilesd"
DEBUG_PARAM = Path("/sys/module/cachefiles/parameters/debug")


@pytest.fixture(scope="module")
def tmpfs_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    assert CACHEFILESD.is_file(), f"{CACHEFILESD} missing: run scripts/setup"
    mnt = tmp_path_factory.mktemp("compat") / "tmpfs"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "none", str(mnt))
    yield mnt
    run("umount", str(mnt), check=False)


def run_c(conf: Path, cwd: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CACHEFILESD), "-n", "-s", *flags, "-f", str(conf)],
        capture_output=True,
        text=True,
        errors="replace",
        cwd=cwd,
        timeout=60,
    )


def outcome(res: subprocess.CompletedProcess[str]) -> str:
    err = res.stderr
    if res.returncode == 1 and "CacheFiles bind failed: errno 95" in err:
        return "accept"
    if res.returncode == 2:
        return "reject"
    if res.returncode == 1 and (
        "Can't confirm cache location" in err or "CacheFiles bind failed: errno 22" in err
    ):
        return "reject"
    raise AssertionError(f"unexpected end of cachefilesd: {res.returncode} {err!r}")


def test_cachefilesd_outcome_of_every_row(tmpfs_cache: Path, tmp_path: Path) -> None:
    """One test for the whole table (a pytest test per row costs seconds under TCG);
    every disagreement is collected and reported at once."""
    lsms = check.active_lsms() or []
    wrong = []
    for number, row in enumerate(ROWS):
        conf = tmp_path / f"row-{number}.conf"
        conf.write_bytes(row.text(str(tmpfs_cache)).encode())
        DEBUG_PARAM.write_text("0")
        res = run_c(conf, tmpfs_cache)
        got = outcome(res)
        want = row.c
        if want == "lsm":
            want = "accept" if set(lsms) & set(check.SECCTX_LSMS) else "reject"
        if got != want:
            wrong.append(f"{row.line!r}: cachefilesd {got}s, table says {want}: {res.stderr!r}")
            continue
        expected = row.expected(str(tmpfs_cache))
        if got == "accept" and isinstance(expected, dict) and expected["debug"] is not None:
            mask = int(DEBUG_PARAM.read_text())
            if mask != expected["debug"]:
                wrong.append(f"{row.line!r}: kernel debug mask {mask}, table says {expected}")
    DEBUG_PARAM.write_text("0")
    assert not wrong, "\n".join(wrong)
    assert len(ROWS) > 100


EVERY_FORM = "\n".join(
    [
        "# every accepted form at once",
        "dir\t{DIR}",
        "tag  compat tag ",
        "brun   20%",
        "bcull\t08%",
        "bstop 2%",
        "fstop %",
        "fcull 3%",
        "frun 12%",
        "frun 15%",
        "debug 0x0",
        "  culltable +14",
        "",
    ]
)


def kernel_limits(state: bytes) -> dict[str, int]:
    fields = dict(f.split("=", 1) for f in state.decode().split() if "=" in f)
    names = ("brun", "bcull", "bstop", "frun", "fcull", "fstop")
    return {n: int(fields[n], 16) for n in names}


def read_state(fd: int) -> bytes:
    select.select([fd], [], [], 10)
    return os.read(fd, 4096)


def test_same_limits_in_the_kernel(loop_fs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """cachefilesd, and this daemon's commands for the same file, leave the kernel with
    the same free-space limits (what the state line reports after bind)."""
    cache = loop_fs(64)
    conf = tmp_path / "every.conf"
    conf.write_text(EVERY_FORM.replace("{DIR}", str(cache)))
    cfg = parse_config(conf.read_text(), str(conf))
    assert cfg.tag == "compat tag " and cfg.culltable == 14 and cfg.debug == 0

    # cachefilesd binds and, at -ddd, logs the state line each pass
    proc = subprocess.Popen(
        [str(CACHEFILESD), "-n", "-s", "-d", "-d", "-d", "-f", str(conf)],
        stderr=subprocess.PIPE,
        cwd=cache,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    state = b""
    try:
        while time.monotonic() < deadline and not state:
            line = proc.stderr.readline()
            if not line:
                break
            if line.startswith(b"KERNEL: "):
                state = line[len(b"KERNEL: ") :]
        caches = Path("/proc/fs/fscache/caches")
        listed = caches.read_text() if caches.exists() else ""
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert state, "cachefilesd logged no state line"
    c_limits = kernel_limits(state)
    if listed:
        assert "compat tag" in listed

    # this daemon's commands for the same file, bound the same way
    fd = os.open("/dev/cachefiles", os.O_RDWR)
    try:
        for cmd in [*kernel_commands(cfg), b"bind"]:
            os.write(fd, cmd)
        ours = kernel_limits(read_state(fd))
    finally:
        os.close(fd)
    assert ours == c_limits
    sv = os.statvfs(cache)
    assert c_limits["brun"] == sv.f_blocks // 100 * 20
    assert c_limits["bcull"] == sv.f_blocks // 100 * 8
    assert c_limits["fstop"] == 0
    assert c_limits["frun"] == sv.f_files // 100 * 15
