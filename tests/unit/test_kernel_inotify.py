"""kernel/inotify.py: inotify instances without ``find_library`` (which runs
``ldconfig -p``, seconds in a slow guest)."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import inotify_simple
import pytest

from cachefilesd_py.kernel import inotify


def test_an_instance_is_made_without_looking_libc_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_lookup(name: str) -> str:
        raise AssertionError(f"find_library({name!r}) was called")

    # inotify_simple imported the name itself (``from ctypes.util import find_library``)
    monkeypatch.setattr(ctypes.util, "find_library", no_lookup)
    monkeypatch.setattr(inotify_simple, "find_library", no_lookup, raising=False)
    monkeypatch.setattr(inotify_simple, "_libc", None)
    with inotify.open_inotify() as ino:
        ino.add_watch(tmp_path, inotify.flags.CREATE)
        (tmp_path / "new").touch()
        events = ino.read(timeout=1000)
    assert [e.name for e in events] == ["new"]


def test_the_instance_is_non_blocking_and_close_on_exec() -> None:
    import fcntl
    import os

    with inotify.open_inotify() as ino:
        assert fcntl.fcntl(ino.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(ino.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with pytest.raises(BlockingIOError):
            os.read(ino.fileno(), 4096)
