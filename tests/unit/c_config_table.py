"""Config lines as cachefilesd 0.10.10 and the kernel read them, and as this daemon does.

One table, two users: ``tests/unit/test_config_compat.py`` checks this daemon's
outcome for every row on the host, and ``tests/vm/test_config_compat_guest.py`` runs
Debian's ``cachefilesd`` binary on each row in the test guest (real kernel, a tmpfs
cache directory so that ``bind`` fails after the configuration is accepted) and checks
the ``c`` column. How the expectations were derived (cachefilesd.c's config loop, the
kernel's ``cachefiles_daemon_write`` and its handlers) is in ``docs/config-compat.md``.

Each row is put in a file after ``dir {DIR}`` (unless ``base`` is False), ``{DIR}``
standing for an existing cache directory.

- ``c``: ``"accept"`` or ``"reject"``, what cachefilesd does with the file;
  ``"lsm"``: accepted only where an LSM with security contexts is active (SELinux,
  Smack, AppArmor), refused elsewhere (the test guest has none);
- ``ours``: the settings this daemon ends up with (a dict of the keys of
  :data:`DEFAULTS` that differ), or a fragment of the rule it refuses the file with;
- ``why``: set exactly when the two outcomes differ: the documented reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: the settings cachefilesd and the kernel have (the C-visible part of a Config), when
#: the file says nothing but ``dir``; tag/secctx/debug None: the kernel's own default
DEFAULTS: dict[str, Any] = {
    "dir": "{DIR}",
    "tag": None,
    "secctx": None,
    "debug": None,
    "brun": 7,
    "bcull": 5,
    "bstop": 1,
    "frun": 7,
    "fcull": 5,
    "fstop": 1,
    "culltable": 12,
    "nocull": False,
    "resume_blocks": None,
    "resume_files": 5,
}

SECCTX = "system_u:system_r:cachefiles_kernel_t:s0"


@dataclass(frozen=True)
class Row:
    line: str
    c: str
    ours: dict[str, Any] | str = field(default_factory=dict)
    why: str = ""
    base: bool = True
    final_newline: bool = True

    def text(self, cache_dir: str) -> str:
        body = ("dir {DIR}\n" if self.base else "") + self.line
        if self.final_newline:
            body += "\n"
        return body.replace("{DIR}", cache_dir)

    def expected(self, cache_dir: str) -> dict[str, Any] | str:
        if isinstance(self.ours, str):
            return self.ours
        out = {**DEFAULTS, **self.ours}
        return {
            k: v.replace("{DIR}", cache_dir) if isinstance(v, str) else v for k, v in out.items()
        }


ORDER = "thresholds may come in any order: the daemon sends them in an order the kernel accepts"
NOCULL = (
    "cachefilesd 0.10.10 notes nocull, then hands the line to the kernel, which has no "
    "such command (EOPNOTSUPP): nocull never worked in the file; it works here, as -N"
)
RESUME = (
    "cachefilesd 0.10.10 compares 18 bytes of the 17-letter word (memcmp), never "
    "recognises the directive and hands it to the kernel (EOPNOTSUPP); it works here"
)
WRAP = "the kernel wraps a number beyond 64 bits (this one to 10); it is refused here"
UNTERMINATED = "cachefilesd refuses a last line without a newline ('Unterminated line')"
RELATIVE = (
    "a relative dir names a directory relative to wherever the daemon was started "
    "(cachefilesd stats it there, the kernel resolves it at bind); refused here"
)

ROWS: tuple[Row, ...] = (
    # -- blank lines and comments
    Row("", "accept"),
    Row("\t  ", "accept"),
    Row("# a comment", "accept"),
    Row("   # an indented comment", "accept"),
    Row("#dir /elsewhere", "accept"),
    # -- dir: any blanks after the word, the value verbatim to the end of the line
    Row("dir {DIR}", "accept", base=False),
    Row("dir\t{DIR}", "accept", base=False),
    Row("dir   {DIR}", "accept", base=False),
    Row("dir \t {DIR}", "accept", base=False),
    Row("dir\v{DIR}", "accept", base=False),
    Row("dir {DIR} ", "reject", "Can't confirm cache location", base=False),
    Row("dir {DIR}\r", "reject", "Can't confirm cache location", base=False),
    Row(" dir {DIR}", "reject", "leading whitespace", base=False),
    Row("\tdir {DIR}", "reject", "leading whitespace", base=False),
    Row("dir", "reject", "empty cache directory", base=False),
    Row("dir ", "reject", "empty cache directory", base=False),
    Row("dir {DIR}", "reject", "'dir' given twice"),
    Row("dir {DIR}/absent", "reject", "Can't confirm cache location", base=False),
    Row(".", "reject", "unknown directive"),
    Row("dir .", "accept", "absolute path", why=RELATIVE, base=False),
    Row("DIR {DIR}", "reject", "unknown directive 'DIR'", base=False),
    Row("dir{DIR}", "reject", "unknown directive", base=False),
    Row("tag x", "reject", "no 'dir' directive", base=False),
    # -- tag: verbatim, once, never empty
    Row("tag mycache", "accept", {"tag": "mycache"}),
    Row("tag\tmycache", "accept", {"tag": "mycache"}),
    Row("tag  \t mycache", "accept", {"tag": "mycache"}),
    Row("tag mycache ", "accept", {"tag": "mycache "}),
    Row("tag mycache\r", "accept", {"tag": "mycache\r"}),
    Row("tag my cache", "accept", {"tag": "my cache"}),
    Row("tag mycache # not a comment", "accept", {"tag": "mycache # not a comment"}),
    Row("tag\fmycache", "accept", {"tag": "mycache"}),
    Row("tag caf\u00e9\u00a0", "accept", {"tag": "caf\u00e9\u00a0"}),
    Row("tag\u00a0mycache", "reject", "unknown directive"),
    Row("tag", "reject", "empty tag"),
    Row("tag ", "reject", "empty tag"),
    Row("tag a\ntag b", "reject", "'tag' given twice"),
    Row("  tag mycache", "reject", "leading whitespace"),
    Row("tag a\0b", "reject", "NUL"),
    Row("tag " + "x" * 4090, "accept", {"tag": "x" * 4090}),
    Row("tag " + "x" * 4091, "reject", "line too long"),
    # -- block and file thresholds: N% exactly, as the kernel's simple_strtoul reads N
    Row("brun 10%", "accept", {"brun": 10}),
    Row("brun  10%", "accept", {"brun": 10}),
    Row("brun\t10%", "accept", {"brun": 10}),
    Row("brun 010%", "accept", {"brun": 10}),
    Row("brun 99%", "accept", {"brun": 99}),
    Row("bcull 6%", "accept", {"bcull": 6}),
    Row("bstop 0%", "accept", {"bstop": 0}),
    Row("bstop %", "accept", {"bstop": 0}),
    Row("fstop %", "accept", {"fstop": 0}),
    Row("brun 10%\nbcull 7%\nbstop 3%", "accept", {"brun": 10, "bcull": 7, "bstop": 3}),
    Row("frun 10%\nfcull 7%\nfstop 3%", "accept", {"frun": 10, "fcull": 7, "fstop": 3}),
    Row("brun 20%\nbrun 12%", "accept", {"brun": 12}),
    Row("fstop 2%\nfstop 3%", "accept", {"fstop": 3}),
    Row("bstop 0%\nbcull 1%\nbrun 2%", "accept", {"brun": 2, "bcull": 1, "bstop": 0}),
    Row("bcull 8%\nbrun 10%", "reject", {"brun": 10, "bcull": 8}, why=ORDER),
    Row("fcull 9%\nfrun 30%\nfstop 8%", "reject", {"frun": 30, "fcull": 9, "fstop": 8}, why=ORDER),
    Row("brun 10% ", "reject", "nothing after the %"),
    Row("brun 10%\r", "reject", "CRLF"),
    Row("brun 10% # run", "reject", "nothing after the %"),
    Row("brun 10 %", "reject", "whole percentage"),
    Row("brun 10", "reject", "whole percentage"),
    Row("brun +10%", "reject", "whole percentage"),
    Row("brun 0x10%", "reject", "whole percentage"),
    Row("brun 10.5%", "reject", "whole percentage"),
    Row("brun \u0661\u0660%", "reject", "whole percentage"),
    Row("brun", "reject", "empty percentage"),
    Row("brun 100%", "reject", "not below 100%"),
    Row("brun %", "reject", "bstop 1% < bcull 5% < brun 0%"),
    Row("bcull 8%", "reject", "bstop 1% < bcull 8% < brun 7%"),
    Row("bstop 5%", "reject", "bstop 5% < bcull 5%"),
    Row("fcull 1%", "reject", "fstop 1% < fcull 1%"),
    Row("brun 99999999999999999999%", "reject", "64 bits"),
    Row("brun 18446744073709551626%", "accept", "64 bits", why=WRAP),
    Row("BRUN 10%", "reject", "unknown directive 'BRUN'"),
    Row("brun10%", "reject", "unknown directive 'brun10%'"),
    Row(" brun 10%", "reject", "leading whitespace"),
    # -- debug: the kernel's simple_strtoul in base 0, nothing after it
    Row("debug 0", "accept", {"debug": 0}),
    Row("debug 7", "accept", {"debug": 7}),
    Row("debug 0x7", "accept", {"debug": 7}),
    Row("debug 0X1f", "accept", {"debug": 31}),
    Row("debug 010", "accept", {"debug": 8}),
    Row("debug", "accept", {"debug": 0}),
    Row("debug ", "accept", {"debug": 0}),
    Row("debug\t4", "accept", {"debug": 4}),
    Row("debug 1\ndebug 4", "accept", {"debug": 4}),
    Row("debug 0x100000001", "accept", {"debug": 1}),
    Row("debug 08", "reject", "requires a mask"),
    Row("debug 0x", "reject", "requires a mask"),
    Row("debug -1", "reject", "requires a mask"),
    Row("debug +1", "reject", "requires a mask"),
    Row("debug 1 ", "reject", "requires a mask"),
    Row("debug 1\r", "reject", "CRLF"),
    Row("debug one", "reject", "requires a mask"),
    Row("debug \u0661\u0662", "reject", "requires a mask"),
    # -- secctx: verbatim, once; the kernel resolves it at once (an LSM must be active)
    Row("secctx " + SECCTX, "lsm", {"secctx": SECCTX}),
    Row("secctx\t" + SECCTX, "lsm", {"secctx": SECCTX}),
    Row("secctx cachefiles_kernel_t\nsecctx " + SECCTX, "reject", "'secctx' given twice"),
    Row("secctx", "reject", "empty security context"),
    # -- culltable: read by cachefilesd itself with strtoul, 12..20, nothing after
    Row("culltable 14", "accept", {"culltable": 14}),
    Row("culltable\t14", "accept", {"culltable": 14}),
    Row("culltable   14", "accept", {"culltable": 14}),
    Row("  culltable 14", "accept", {"culltable": 14}),
    Row("culltable +14", "accept", {"culltable": 14}),
    Row("culltable 014", "accept", {"culltable": 14}),
    Row("culltable 12", "accept", {"culltable": 12}),
    Row("culltable 20", "accept", {"culltable": 20}),
    Row("culltable 13\nculltable 20", "accept", {"culltable": 20}),
    Row("culltable 14 ", "reject", "invalid cull table size number"),
    Row("culltable 0x0e", "reject", "invalid cull table size number"),
    Row("culltable \u0661\u0664", "reject", "invalid cull table size number"),
    Row("culltable +", "reject", "invalid cull table size number"),
    Row("culltable 11", "reject", "12 <= N <= 20"),
    Row("culltable 21", "reject", "12 <= N <= 20"),
    Row("culltable -14", "reject", "12 <= N <= 20"),
    Row("culltable", "reject", "12 <= N <= 20"),
    Row("culltable ", "reject", "12 <= N <= 20"),
    # -- nocull and resume_thresholds: documented in cachefilesd.conf(5), broken in 0.10.10
    Row("nocull", "reject", {"nocull": True}, why=NOCULL),
    Row("nocull yes", "reject", "takes no argument"),
    Row("resume_thresholds 1000 5", "reject", {"resume_blocks": 1000}, why=RESUME),
    Row("resume_thresholds - -", "reject", {"resume_files": None}, why=RESUME),
    Row("resume_thresholds 0 5", "reject", "invalid resume threshold (blocks)"),
    Row("resume_thresholds 5", "reject", "two arguments"),
    # -- commands that are not configuration
    Row("bind", "reject", "'bind' command not permitted"),
    Row("bind ondemand", "reject", "'bind' command not permitted"),
    Row("  bind", "reject", "'bind' command not permitted"),
    Row("cull x", "reject", "unknown directive 'cull'"),
    Row("inuse x", "reject", "unknown directive 'inuse'"),
    Row("restore", "reject", "unknown directive 'restore'"),
    Row("frobnicate 1", "reject", "unknown directive 'frobnicate'"),
    # -- the file as a whole
    Row("tag last", "reject", {"tag": "last"}, why=UNTERMINATED, final_newline=False),
)
