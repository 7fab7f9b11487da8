"""The durability primitives on real files: the order of the steps of an atomic save,
crashes and failures between them, and what sits at the temporary file's name."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.kernel import durable


class Crash(Exception):
    pass


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "state.bin"
    durable.save_file_atomically(path, b"old")
    return path


@pytest.fixture
def crash_at() -> Iterator[list[str]]:
    points: list[str] = []

    def hook(name: str) -> None:
        if name in points:
            raise Crash(name)

    durable.set_crash_hook(hook)
    yield points
    durable.set_crash_hook(None)


def temp_name(path: Path) -> Path:
    """The temporary name this thread's saves of ``path`` use, as seen on disk."""
    seen: list[str] = []
    durable.set_crash_hook(lambda point: seen.extend(leftovers(path.parent)))
    try:
        durable.save_file_atomically(path, path.read_bytes())
    finally:
        durable.set_crash_hook(None)
    assert len(seen) >= 1 and len(set(seen)) == 1, seen
    return path.with_name(seen[0])


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_save_replaces_the_content_and_leaves_no_temporary(target: Path) -> None:
    durable.save_file_atomically(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000
    assert leftovers(target.parent) == []
    assert target.stat().st_mode & 0o777 == 0o600


def test_steps_run_in_order_file_sync_rename_directory_sync(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data durable before the name points at it; the name durable before returning."""
    tmp = temp_name(target).name
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        steps.append(f"rename {Path(src).name} {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    durable.save_file_atomically(target, b"new")
    assert steps == [f"fsync {tmp}", f"rename {tmp} state.bin", f"fsync {target.parent.name}"]


@pytest.mark.parametrize("point", ["save.before_rename", "save.before_dir_sync"])
def test_a_crash_between_steps_leaves_old_or_new_and_no_temporary(
    target: Path, crash_at: list[str], point: str
) -> None:
    crash_at.append(point)
    with pytest.raises(Crash):
        durable.save_file_atomically(target, b"new")
    assert target.read_bytes() == (b"old" if point == "save.before_rename" else b"new")
    assert leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_content_and_removes_the_temporary(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        durable.save_file_atomically(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert leftovers(target.parent) == []


def test_a_symlink_planted_at_the_temporary_name_is_not_written_through(
    target: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    temp_name(target).symlink_to(victim)
    durable.save_file_atomically(target, b"new")
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"new" and not target.is_symlink()
    assert leftovers(target.parent) == []


def test_a_leftover_temporary_of_this_writer_is_replaced(target: Path) -> None:
    temp_name(target).write_bytes(b"half a save from before a crash")
    durable.save_file_atomically(target, b"new")
    assert target.read_bytes() == b"new" and leftovers(target.parent) == []


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    names = {
        f".a.presence.tmp-{dead_pid}-1": False,  # its writer is gone
        f".b.presence.tmp-{os.getpid()}-1": True,  # alive: maybe saving now
        f".c.presence.tmp-{10**30}-1": False,  # no such pid can exist
        ".d.presence.tmp-0-1": True,  # not a name we write
        "e.presence": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert durable.remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, k in names.items() if k)


_DIE_AT = """
import os, sys
from pathlib import Path
from cachefilesd_py.kernel import durable

def die(point: str) -> None:
    if point == sys.argv[2]:
        os._exit(9)  # no cleanup runs: a crash, not an exception

durable.set_crash_hook(die)
durable.save_file_atomically(Path(sys.argv[1]), b"new")
"""


@pytest.mark.parametrize(
    ("point", "expected"), [("save.before_rename", b"old"), ("save.before_dir_sync", b"new")]
)
def test_a_writer_killed_between_steps_leaves_old_or_new_and_the_next_start_sweeps(
    target: Path, point: str, expected: bytes
) -> None:
    """A real death (no ``except`` runs), then what the next daemon start sees: the
    target whole (old or new, never a mix or empty) and the dead writer's temporary,
    which :class:`PresenceStore` removes when it opens the directory."""
    from cachefilesd_py.presence.store import PresenceStore

    died = subprocess.run([sys.executable, "-c", _DIE_AT, str(target), point], check=False)
    assert died.returncode == 9
    assert target.read_bytes() == expected
    left = leftovers(target.parent)
    if point == "save.before_rename":
        assert len(left) == 1  # fsynced new bytes under the temporary name, never renamed
        assert (target.parent / left[0]).read_bytes() == b"new"
    else:
        assert left == []
    PresenceStore(target.parent)
    assert leftovers(target.parent) == []
    assert target.read_bytes() == expected


def test_what_cannot_be_removed_at_a_stale_name_does_not_stop_the_sweep(tmp_path: Path) -> None:
    """Anyone who can write the directory can put a directory at a temporary's name
    (unlink: EISDIR); the sweep runs when the store opens, so it must not raise: it
    skips that entry and removes the rest."""
    (tmp_path / f".a.presence.tmp-{10**30}-1").mkdir()
    (tmp_path / f".b.presence.tmp-{10**30}-1").write_bytes(b"x")
    assert durable.remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f".a.presence.tmp-{10**30}-1"]
