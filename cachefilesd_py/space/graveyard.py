"""Reaping ``<dir>/graveyard/``: the kernel moves culled and retired objects there and
never deletes them; the daemon must (in both modes). Errors are logged, never fatal
(cachefilesd C exits on any unlink error)."""

from __future__ import annotations

import os
import shutil

import structlog

from cachefilesd_py.kernel import inotify

log = structlog.get_logger("graveyard")


def reap(graveyard: str) -> int:
    """Delete everything in ``graveyard``; returns how many entries went."""
    removed = 0
    try:
        entries = list(os.scandir(graveyard))
    except OSError as exc:
        log.warning("graveyard.unreadable", path=graveyard, error=str(exc))
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError as exc:
            log.warning("graveyard.unlink_failed", path=entry.path, error=str(exc))
    return removed


class GraveyardWatch:
    """inotify on the graveyard: ``fileno()`` is pollable, ``changed()`` drains it."""

    def __init__(self, graveyard: str) -> None:
        self._inotify = inotify.open_inotify()
        flags = inotify.flags
        self._inotify.add_watch(graveyard, flags.MOVED_TO | flags.CREATE)

    def fileno(self) -> int:
        return int(self._inotify.fileno())

    def changed(self) -> bool:
        try:
            return bool(self._inotify.read(timeout=0))
        except BlockingIOError:
            return False

    def close(self) -> None:
        self._inotify.close()
