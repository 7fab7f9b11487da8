"""structlog without the optional modules the daemon never uses.

Importing ``structlog`` imports all of it: ``structlog.dev`` imports ``rich`` (and
``better_exceptions``) whenever they are installed, for pretty tracebacks on a
developer's console, and ``structlog.stdlib`` imports ``asyncio``, which imports
``ssl``, for its ``async`` logging methods. The daemon writes one escaped line per
event (``daemon/logging.py``) and has no event loop, so none of that is used — but at
start-up it costs: on the host ~0.5 s of ~1.2 s of imports, and in the TCG test guest,
whose root is 9p, ~30 s (``docs/benchmarks.md``, "Classic mode vs cachefilesd C").

:func:`import_structlog` is called by the command line before anything imports
structlog. While structlog is imported:

- ``rich`` and ``better_exceptions`` are marked as absent (``sys.modules[name] = None``
  makes ``import name`` raise ImportError, the case structlog handles: plain
  tracebacks), and unmarked right after, so whoever imports them later gets them;
- ``asyncio`` is a :class:`_DeferredModule`: structlog's modules keep it as their
  ``asyncio`` global, and it imports the real ``asyncio`` on the first attribute
  access (only from inside structlog's ``async`` methods). It is taken out of
  ``sys.modules`` right after, so every later ``import asyncio`` gets the real one.

Nothing changes when structlog is already imported (tests, tools that import the
package first): the function just returns it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

#: imported by structlog only when installed, never used by the daemon
ABSENT_WHILE_IMPORTING = ("rich", "better_exceptions")
#: imported by structlog at module level, used only inside its ``async`` methods
DEFERRED_WHILE_IMPORTING = ("asyncio",)


class _DeferredModule(ModuleType):
    """Stands for module ``name`` until an attribute is asked for, then imports it."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # the import system probing (__spec__, __path__…)
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)


def import_structlog() -> ModuleType:
    """Import structlog as described in the module docstring; return it."""
    if "structlog" in sys.modules:
        return sys.modules["structlog"]
    marked = [n for n in ABSENT_WHILE_IMPORTING if n not in sys.modules]
    deferred = [n for n in DEFERRED_WHILE_IMPORTING if n not in sys.modules]
    for name in marked:
        sys.modules[name] = None  # type: ignore[assignment]
    for name in deferred:
        sys.modules[name] = _DeferredModule(name)
    try:
        import structlog
    finally:
        for name in marked:
            if sys.modules.get(name) is None:
                del sys.modules[name]
        for name in deferred:
            if isinstance(sys.modules.get(name), _DeferredModule):
                del sys.modules[name]
    return structlog
