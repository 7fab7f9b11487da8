"""cachefilesd.conf text → ``Config`` or ``ConfigError``, nothing else.

The bytes are decoded as ``config/load.py`` decodes a file (UTF-8, or a ``ConfigError``
naming the line). An accepted configuration must also yield the kernel commands and the
``--check-config`` report without error, each command a single line the kernel
takes whole (no newline or NUL, at most 4095 bytes).
"""

from __future__ import annotations

from cachefilesd_py.config.check import report
from cachefilesd_py.config.model import Config
from cachefilesd_py.config.parse import DIRECTIVES, parse_config
from cachefilesd_py.errors import ConfigError
from cachefilesd_py.frontends.bind import kernel_commands

MAX_LEN = 8192
#: a libFuzzer dictionary: the directives and their argument forms, and characters
#: where Unicode-aware text handling differs from ASCII (case folds such as KELVIN
#: SIGN and LONG S, non-ASCII digits, other line breaks and whitespace)
TOKENS = (
    *(name.encode() + b" " for name in DIRECTIVES),
    b"bind",
    b"%",
    b"K",
    b"M",
    b"G",
    b"T",
    b"iB",
    b"0x",
    b"-",
    b"{volume}",
    b"{cookie}",
    b"http://",
    b"https://",
    b"file:///",
    b"#",
    b"\r\n",
    b"\t",
    b"\x0b",
    *(ch.encode() for ch in "\u212a\u017f\u0130\u0131\u0661\u00b2\uff11\u2028\x85\u00a0"),
)


def TestOneInput(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_config reports "not valid UTF-8" with its line
    try:
        cfg = parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.conf"), str(exc)
        return
    assert isinstance(cfg, Config)
    for cmd in kernel_commands(cfg):
        assert b"\n" not in cmd and b"\0" not in cmd and len(cmd) <= 4095, cmd
    report(cfg, "fuzz.conf", [])  # the --check-config text, without the host probes
