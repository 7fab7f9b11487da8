"""``cachefilesctl verify`` names a blob the way the configuration does.

Regression (issue 11, item 5): the configuration's patterns spell a volume ``img`` and
the daemon's keys ``erofs,img``; ``verify`` wanted the kernel's spelling, so a volume
copied from the configuration found no cache file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachefilesd_py.control.cli import main
from tests.integration.test_ondemand_fake import CHUNK, DATA, SIZE, Daemon


def test_verify_takes_the_configuration_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blobs, cache = tmp_path / "blobs", tmp_path / "cache"
    blobs.mkdir()
    cache.mkdir()
    (blobs / "img").write_bytes(DATA)
    d = Daemon(cache, f"file://{blobs}/{{cookie}}")
    try:
        obj = d.fake.lookup(b"erofs,img", b"img")
        assert obj.read(0, SIZE) == DATA
        obj.withdraw()
    finally:
        d.shutdown()
    conf = tmp_path / "c.conf"
    conf.write_text(
        f"dir {cache}\nondemand\nsource img/* file://{blobs}/{{cookie}}\n"
        f"chunk_size {CHUNK // 1024}K\n"
    )
    assert main(["verify", "--offline", "-f", str(conf), "img", "img"]) == 0
    out = capsys.readouterr().out
    assert "trusted=True" in out and "errors=0" in out
    assert main(["verify", "--offline", "-f", str(conf), "erofs,img", "img"]) == 2
    assert "spell the volume as the configuration does: 'img'" in capsys.readouterr().err
