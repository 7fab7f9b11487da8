"""The manual pages render without warnings and document what the code accepts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cachefilesd_py.config.parse import DIRECTIVES
from cachefilesd_py.control.cli import COMMANDS

MAN = Path(__file__).resolve().parents[2] / "packaging" / "man"
PAGES = ("cachefilesd-py.8", "cachefilesctl.8", "cachefilesd-py.conf.5")


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_with_man_without_warnings(page: str) -> None:
    res = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", str(MAN / page)],
        capture_output=True,
        text=True,
        env={"MANWIDTH": "80", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    name = page.rsplit(".", 1)[0]
    assert re.search(rf"^NAME\n\s+{re.escape(name)}\s+-\s", res.stdout, re.MULTILINE), res.stdout[
        :300
    ]
    assert "SEE ALSO" in res.stdout


def text(page: str) -> str:
    return (MAN / page).read_text()


def test_every_directive_is_documented() -> None:
    conf = text("cachefilesd-py.conf.5")
    for word in DIRECTIVES:
        assert re.search(rf"^\.(B|BI|TP\n\.BI?) {re.escape(word)}\b", conf, re.MULTILINE), word


def test_every_option_and_command_is_documented() -> None:
    daemon = text("cachefilesd-py.8").replace("\\-", "-")
    flags = ("-d", "-s", "-n", "-N", "-f", "-p", "-v", "--version", "--check-config")
    for flag in (*flags, "--log-format"):
        assert flag in daemon, flag
    ctl = text("cachefilesctl.8")
    from cachefilesd_py.control import install, live  # noqa: F401  (register)

    for name in COMMANDS:
        assert re.search(rf"^\.(B|BI|BR) (cachefilesctl )?{re.escape(name)}\b", ctl, re.M), name
