"""The fuzz seeds are what the real kernel sends: messages of one EROFS mount (OPEN,
READ, CLOSE) and a classic-mode state line, read from ``/dev/cachefiles`` here and
compared with the ``kernel-6.12-*`` seeds in ``fuzz/corpus/`` (ids and fd numbers
masked: they depend on the run). ``CACHEFILESD_CAPTURE_SEEDS=<dir>`` writes this run's
messages as seeds into ``<dir>/<harness>/`` instead (e.g. the vmtest results folder),
to be copied into ``fuzz/corpus/``."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.frontends.classic.commands import parse_state
from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.kernel.device import CachefilesDevice
from cachefilesd_py.testing.kernel_contract import MiniDaemon
from tests.vm.test_kernel_contract_guest import RealHarness

pytestmark = pytest.mark.guest

CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus"
CAPTURE = os.environ.get("CACHEFILESD_CAPTURE_SEEDS")


def masked(raw: bytes) -> bytes:
    """msg_id, object_id and an OPEN's fd zeroed."""
    out = bytearray(raw)
    struct.pack_into("=I", out, 0, 0)
    struct.pack_into("=I", out, 12, 0)
    if isinstance(wire.decode(raw), wire.OpenRequest):
        struct.pack_into("=I", out, 24, 0)
    return bytes(out)


def keep_or_compare(group: str, name: str, raw: bytes, same: Callable[[bytes], bool]) -> None:
    if CAPTURE:
        (Path(CAPTURE) / group).mkdir(parents=True, exist_ok=True)
        (Path(CAPTURE) / group / name).write_bytes(raw)
        return
    path = CORPUS / group / name
    assert path.exists(), f"{path}: capture it with CACHEFILESD_CAPTURE_SEEDS=<dir>"
    assert same(path.read_bytes()), f"{path} is not what the kernel sent: {raw!r}"


def test_wire_seeds_are_messages_of_a_real_mount(
    workdir: Path, loop_fs: Callable[..., Path]
) -> None:
    h = RealHarness(workdir, loop_fs(64))
    raw: list[bytes] = []
    read_message = h.device.read_message

    def recording() -> bytes:
        buf = read_message()
        if buf:
            raw.append(buf)
        return buf

    h.device.read_message = recording  # type: ignore[method-assign]
    d = MiniDaemon(h)
    try:
        m = d.mount("seed.img")
        assert isinstance(d.read(m, 0, 4096), bytes)
        d.umount(m)
    finally:
        d.finish()
        h.device.close()
    by_kind: dict[type, bytes] = {}
    for buf in raw:
        assert wire.encode_message(wire.decode(buf)) == buf
        by_kind.setdefault(type(wire.decode(buf)), buf)
    assert set(by_kind) == {wire.OpenRequest, wire.ReadRequest, wire.CloseRequest}
    kinds = {"open": wire.OpenRequest, "read": wire.ReadRequest, "close": wire.CloseRequest}
    for label, kind in kinds.items():
        captured = by_kind[kind]
        keep_or_compare(
            "wire",
            f"kernel-6.12-{label}.bin",
            captured,
            lambda seed, captured=captured: masked(seed) == masked(captured),
        )


def test_classic_state_seed_is_a_real_state_line(loop_fs: Callable[..., Path]) -> None:
    cache = loop_fs(64)
    device = CachefilesDevice()
    try:
        for cmd in (b"dir " + str(cache).encode(), b"tag seeds", b"bind"):
            device.write_command(cmd)
        line = device.read_message().rstrip(b"\0")
    finally:
        device.close()
    state = parse_state(line)
    assert state.malformed == () and {"cull", "brun", "bcull", "bstop"} <= set(state.values)
    keep_or_compare(
        "classic_state",
        "kernel-6.12.bin",
        line,
        lambda seed: set(parse_state(seed).values) == set(state.values),
    )
