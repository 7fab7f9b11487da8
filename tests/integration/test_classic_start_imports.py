"""What classic mode imports before it binds the cache, and what it does not.

Start-up in a slow guest is mostly imports (docs/benchmarks.md, "Classic mode vs
cachefilesd C"): every module classic mode imports before ``bind`` delays its first
cull. The daemon's own command line runs in a fresh interpreter with a classic
configuration; an audit hook notes ``sys.modules`` at the moment ``/dev/cachefiles`` is
opened (the bind) and refuses the open, so the run ends there whatever the host has.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: never needed by classic mode before bind (most never at all)
HEAVY = (
    "cachefilesd_py.frontends.ondemand",  # the on-demand frontend
    "cachefilesd_py.engine",  # the fill engine
    "cachefilesd_py.sources",  # sources and their HTTP client
    "cachefilesd_py.presence",
    "cachefilesd_py.daemon.control",  # the control server
    "cachefilesd_py.daemon.metrics",
    "urllib3",
    "prometheus_client",
    "http.server",
    "pyroute2",
    "pyudev",
    "psutil",
    "argcomplete",
    "rich",  # structlog's developer console
    "better_exceptions",
    "asyncio",  # structlog.stdlib's async methods, and ssl with it
    "ssl",
    "hashlib",  # OpenSSL's libcrypto: blob digests are on-demand's
    "ctypes.util",  # find_library runs ldconfig
    "subprocess",
)

PROBE = r"""
import json, sys

seen = {}

def hook(event, args):
    if event == "open" and args and args[0] == "/dev/cachefiles" and not seen:
        seen["modules"] = sorted(k for k, v in sys.modules.items() if v is not None)
        raise PermissionError(13, "refused by the test at bind")

sys.addaudithook(hook)
from cachefilesd_py.daemon.cli import main

rc = main(["-n", "-s", "-f", sys.argv[1]])
print(json.dumps({"rc": rc, **seen}))
"""


def modules_at_bind(tmp_path: Path, mode_lines: str) -> list[str]:
    cache = tmp_path / "cache"
    cache.mkdir()
    conf = tmp_path / "cachefilesd.conf"
    conf.write_text(f"dir {cache}\ntag probe\n{mode_lines}")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(conf)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.splitlines()[-1])
    assert data["rc"] == 1, out.stderr  # the refused open: an OS error, exit status 1
    assert "modules" in data, out.stderr  # it got as far as opening the device
    modules: list[str] = data["modules"]
    return modules


def loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_classic_mode_binds_without_the_on_demand_stack_or_optional_extras(
    tmp_path: Path,
) -> None:
    modules = modules_at_bind(tmp_path, "brun 10%\nbcull 7%\nbstop 3%\n")
    assert "cachefilesd_py.daemon.keeper" in modules  # the probe saw the real bind
    assert "structlog" in modules
    assert [name for name in HEAVY if loaded(modules, name)] == []


def test_structlog_keeps_working_with_asyncio_imported_later() -> None:
    """The stand-in structlog kept for ``asyncio`` forwards to the real module."""
    code = (
        "import sys\n"
        "from cachefilesd_py.daemon.lean_imports import import_structlog\n"
        "s = import_structlog()\n"
        "assert 'asyncio' not in sys.modules and 'rich' not in sys.modules\n"
        "import structlog.stdlib, structlog.dev\n"
        "assert structlog.dev.rich is None\n"
        "import asyncio\n"
        "assert structlog.stdlib.asyncio.get_running_loop is asyncio.get_running_loop\n"
        "import importlib.util\n"  # later imports of what was marked absent work
        "if importlib.util.find_spec('rich'):\n"
        "    import rich.console\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
