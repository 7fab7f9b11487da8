"""space/scan.py's walk of a ``<tree>/<volume>/<name>`` tree (the fanotify frontend's
cache files): candidates, per-volume totals under ``I<volume>``, strays."""

from __future__ import annotations

import os
from pathlib import Path

from cachefilesd_py.space.scan import scan_volume_files


def test_every_file_of_every_volume_is_a_candidate(tmp_path: Path) -> None:
    tree = tmp_path / "fanotify"
    (tree / "imgs").mkdir(parents=True)
    (tree / "other").mkdir()
    (tree / "imgs" / "a.erofs").write_bytes(b"a" * 8192)
    (tree / "imgs" / "b.erofs").write_bytes(b"b" * 4096)
    (tree / "other" / "c.erofs").write_bytes(b"c" * 4096)
    (tree / "imgs" / "nested").mkdir()  # not a cache file
    (tree / "top-level-file").write_bytes(b"x")
    os.utime(tree / "imgs" / "b.erofs", (1, 1))
    result = scan_volume_files(str(tree), limit=2)
    assert result.objects == 3
    assert [c.name for c in result.oldest] == ["b.erofs", "a.erofs"]  # oldest kept, in order
    assert set(result.volume_blocks) == {"Iimgs", "Iother"}
    assert result.volume_blocks["Iimgs"] == sum(
        os.stat(tree / "imgs" / n).st_blocks for n in ("a.erofs", "b.erofs")
    )
    assert sorted(Path(s).name for s in result.strays) == ["nested", "top-level-file"]


def test_a_missing_tree_is_empty(tmp_path: Path) -> None:
    result = scan_volume_files(str(tmp_path / "absent"), limit=10)
    assert result.objects == 0 and result.oldest == []
