"""Dropping capabilities (kernel/caps.py), in a forked child so pytest keeps its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachefilesd_py.kernel import caps


def status_caps() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
            out[key] = int(value.strip(), 16 if key.startswith("Cap") else 10)
    return out


def in_child(fn) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_names_and_masks() -> None:
    assert caps.names(caps.mask_of(["CAP_SYS_ADMIN", "CAP_CHOWN"])) == [
        "CAP_CHOWN",
        "CAP_SYS_ADMIN",
    ]


@pytest.mark.skipif(
    not caps.CapState.now().effective >> caps.CAP_SYS_ADMIN & 1, reason="needs CAP_SYS_ADMIN"
)
def test_drop_everything_for_good(tmp_path: Path) -> None:
    def child() -> int:
        result = caps.drop_all_but(0)
        s = status_caps()
        ok = s["CapEff"] == s["CapPrm"] == s["CapInh"] == s["CapAmb"] == 0
        ok = ok and s["NoNewPrivs"] == 1 and result.before.permitted != 0
        if result.bounding_reduced:
            ok = ok and s["CapBnd"] == 0
        try:
            os.open("/dev/null", os.O_RDONLY)  # plain access still works
        except OSError:
            return 1
        return 0 if ok else 1

    assert in_child(child) == 0


@pytest.mark.skipif(
    not caps.CapState.now().effective >> caps.CAP_SYS_ADMIN & 1, reason="needs CAP_SYS_ADMIN"
)
def test_keep_one(tmp_path: Path) -> None:
    keep = caps.mask_of(["CAP_SYS_ADMIN"])

    def child() -> int:
        caps.drop_all_but(keep)
        s = status_caps()
        return 0 if s["CapEff"] == s["CapPrm"] == keep else 1

    assert in_child(child) == 0
