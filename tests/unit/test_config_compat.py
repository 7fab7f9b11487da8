"""Drop-in compatibility with cachefilesd's configuration, row by row.

Every row of ``c_config_table.ROWS`` is written to a file and loaded as the daemon
loads it (:func:`load_config`: parse, then confirm the cache directory). A row
cachefilesd accepts must give the same settings here; a row it refuses must be refused
here with ``file:line: rule``; the few rows where the two differ on purpose say why.
The ``c`` column itself is checked against Debian's cachefilesd binary on the real
kernel by ``tests/vm/test_config_compat_guest.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.config.load import load_config
from cachefilesd_py.config.model import Config
from cachefilesd_py.errors import ConfigError
from cachefilesd_py.frontends.bind import kernel_commands
from tests.unit.c_config_table import DEFAULTS, ROWS, Row


def c_visible(cfg: Config) -> dict[str, Any]:
    """The settings cachefilesd and the kernel would hold (keys of DEFAULTS)."""
    plain = ("dir", "tag", "secctx", "debug", "culltable", "nocull")
    out: dict[str, Any] = {k: getattr(cfg, k) for k in (*plain, "resume_blocks", "resume_files")}
    for name in ("brun", "bcull", "bstop", "frun", "fcull", "fstop"):
        out[name] = cfg.threshold(name)
    assert out.keys() == DEFAULTS.keys()
    return out


def load_row(row: Row, tmp_path: Path) -> tuple[Path, str, dict[str, Any] | ConfigError]:
    cache = tmp_path / "cache"
    cache.mkdir()
    conf = tmp_path / "cachefilesd.conf"
    conf.write_bytes(row.text(str(cache)).encode())
    try:
        return conf, str(cache), c_visible(load_config(str(conf)))
    except ConfigError as exc:
        return conf, str(cache), exc


def row_id(row: Row) -> str:
    return repr(row.line)[1:-1][:40] + ("" if row.final_newline else "<no newline>")


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_row(row: Row, tmp_path: Path) -> None:
    conf, cache, got = load_row(row, tmp_path)
    want = row.expected(cache)
    if isinstance(want, str):
        assert isinstance(got, ConfigError), f"accepted, expected refusal ({want}): {got}"
        assert want in got.rule, str(got)
        assert got.file == str(conf)
        assert got.line is not None or "no 'dir'" in got.rule
        assert str(got).startswith(f"{conf}:")
    else:
        assert not isinstance(got, ConfigError), f"refused: {got}"
        assert got == want


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_differences_are_exactly_the_documented_ones(row: Row) -> None:
    """A row whose outcome differs from cachefilesd's names why; no other row does."""
    c_accepts = row.c in ("accept", "lsm")
    we_accept = not isinstance(row.ours, str)
    assert bool(row.why) == (c_accepts != we_accept), row


def test_the_table_covers_what_the_issue_names() -> None:
    lines = [r.line for r in ROWS]
    assert "dir\t{DIR}" in lines and "brun  10%" in lines
    assert any(line.count("secctx") == 2 for line in lines)
    for word in ("culltable", "nocull", "debug", "resume_thresholds", "tag", "secctx"):
        assert any(line.lstrip().startswith(word) for line in lines), word
    assert sum(r.c == "accept" for r in ROWS) >= 40 and sum(r.c == "reject" for r in ROWS) >= 40


def test_cachefilesd_sample_file_loads_with_the_same_settings(tmp_path: Path) -> None:
    """cachefilesd's own sample (its secctx line commented out, as Debian ships it)."""
    cache = tmp_path / "fscache"
    cache.mkdir()
    conf = tmp_path / "cachefilesd.conf"
    conf.write_text(
        "###############\n# comment\n###############\n\n"
        f"dir {cache}\ntag mycache\nbrun 10%\nbcull 7%\nbstop 3%\nfrun 10%\nfcull 7%\n"
        "fstop 3%\n\n# Assuming you're using SELinux\n#secctx system_u:system_r:x:s0\n"
    )
    got = c_visible(load_config(str(conf)))
    assert got == {
        **DEFAULTS,
        "dir": str(cache),
        "tag": "mycache",
        **{"brun": 10, "bcull": 7, "bstop": 3, "frun": 10, "fcull": 7, "fstop": 3},
    }


@pytest.mark.parametrize("row", [r for r in ROWS if not isinstance(r.ours, str)], ids=row_id)
def test_accepted_rows_reach_the_kernel_as_cachefilesd_sends_them(row: Row, tmp_path: Path) -> None:
    """What cachefilesd writes for ``tag``/``secctx`` is the value to the end of the
    line, trailing blanks included (the kernel keeps them): the daemon's commands carry
    the same bytes, so an accepted file never fails later, at bind time."""
    _, _, got = load_row(row, tmp_path)
    assert not isinstance(got, ConfigError)
    cfg = load_config(str(tmp_path / "cachefilesd.conf"))
    cmds = kernel_commands(cfg)
    assert cmds[0] == b"dir " + os.fsencode(str(tmp_path / "cache"))
    for word in ("tag", "secctx"):
        value = getattr(cfg, word)
        sent = [c for c in cmds if c.startswith(word.encode() + b" ")]
        assert sent == ([f"{word} {value}".encode()] if value else []), sent
    if cfg.debug is not None:
        assert cmds[-1] == b"debug %d" % cfg.debug
