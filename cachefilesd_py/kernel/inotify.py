"""inotify instances through ``inotify_simple``, without its C library lookup.

``inotify_simple.INotify()`` finds libc the first time with
``ctypes.util.find_library("c")``, which imports ``subprocess`` and runs ``ldconfig -p``:
1.2 s of a classic-mode start in a TCG guest, between ``bind`` and the first cull
decision. The process's own C library (``dlopen(NULL)``, as ``_sys.py`` uses) has
``inotify_init1``/``inotify_add_watch``/``inotify_rm_watch`` too, so it is handed to
``inotify_simple`` (its module-level ``_libc``, which it fills lazily and only when
empty) before the first instance is made. Everything else — event parsing, flags,
the fd — stays ``inotify_simple``'s.
"""

from __future__ import annotations

import ctypes

import inotify_simple
from inotify_simple import Event, INotify, flags

__all__ = ["Event", "INotify", "flags", "open_inotify"]


def open_inotify() -> INotify:
    """A non-blocking, close-on-exec inotify instance (``inotify_init1``)."""
    if getattr(inotify_simple, "_libc", None) is None:
        setattr(inotify_simple, "_libc", ctypes.CDLL(None, use_errno=True))  # noqa: B010
    return INotify(inheritable=False, nonblocking=True)
