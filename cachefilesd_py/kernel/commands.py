"""The text commands of ``/dev/cachefiles``, both modes: pure encoders.

Every command the daemon writes to the device is built here, and only here
(``docs/protocol-ondemand.md`` §1 and ``docs/protocol-classic.md`` §1 say what each
does). The kernel's parser sets the rules:

- one command per ``write()``: the kernel cuts the buffer at the first newline, so a
  second command after a newline is silently dropped while the write still
  "succeeds". No encoder ever produces a newline or a NUL;
- the command word ends at the first whitespace and the kernel keeps trailing spaces
  in the arguments (``dir /x `` names another directory): arguments may not be empty
  or padded;
- numbers are parsed with base auto-detection, so a leading ``0`` would mean octal:
  numbers are decimal and never zero-padded;
- a write longer than PAGE_SIZE - 1 is refused (EOPNOTSUPP);
- ``cull``/``inuse`` look the name up in the writer's working directory: one path
  component, no ``/``.

Every argument is checked here (ValueError) before it can reach the kernel.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Final

#: the kernel refuses writes longer than PAGE_SIZE - 1 (EOPNOTSUPP); 4095 is the
#: smallest such limit on any architecture
MAX_COMMAND_LENGTH: Final = 4095
#: ``NAME_MAX``: the longest name ``cull``/``inuse`` can look up
NAME_MAX: Final = 255
U32_LIMIT: Final = 2**32
#: copen's size is parsed with ``kstrtol``: a signed 64-bit ``long``
LONG_MAX: Final = 2**63 - 1
#: ``IS_ERR_VALUE``: -4095..-1 are errnos; anything lower makes copen fail with EINVAL
MAX_ERRNO: Final = 4095

THRESHOLDS: Final = frozenset({"brun", "bcull", "bstop", "frun", "fcull", "fstop"})
#: the kernel's values at every fresh open of the device (run/cull/stop, percent)
KERNEL_DEFAULTS: Final = {"run": 7, "cull": 5, "stop": 1}


def _command(word: bytes, arg: bytes | None = None) -> bytes:
    cmd = word if arg is None else word + b" " + arg
    if len(cmd) > MAX_COMMAND_LENGTH:
        raise ValueError(f"command of {len(cmd)} bytes exceeds {MAX_COMMAND_LENGTH}")
    return cmd


def _text_arg(value: str | bytes, what: str) -> bytes:
    raw = os.fsencode(value)
    if not raw or raw != raw.strip() or b"\n" in raw or b"\0" in raw:
        raise ValueError(f"{what} {value!r}: empty, padded with whitespace, or holds NUL/newline")
    return raw


#: a byte no ``cull``/``inuse`` name may hold: NUL ends it, newline ends the command,
#: ``/`` would walk out of the working directory
_NOT_IN_A_NAME = re.compile(rb"[\0\n/]")
_ASCII_SPACE = frozenset(b" \t\n\r\x0b\x0c")


def _object_name(name: str | bytes) -> bytes:
    """``name`` as the kernel will look it up, or ValueError. One regex search and a few
    compares on the way out (a classic pass encodes one per cull); the slow checks run
    only to say what is wrong."""
    raw = os.fsencode(name)
    if (
        raw
        and len(raw) <= NAME_MAX
        and raw[0] not in _ASCII_SPACE
        and raw[-1] not in _ASCII_SPACE
        and _NOT_IN_A_NAME.search(raw) is None
        and raw != b"."
        and raw != b".."
    ):
        return raw
    raw = _text_arg(name, "object name")
    if b"/" in raw:
        raise ValueError(f"object name {name!r} holds a '/' (names are relative to the cwd)")
    raise ValueError(f"object name {name!r} cannot be looked up")


def _check_msg_id(msg_id: int) -> None:
    if not 0 <= msg_id < U32_LIMIT:
        raise ValueError(f"msg_id out of range: {msg_id}")


def encode_copen(msg_id: int, size_or_negative_errno: int) -> bytes:
    """``copen <id>,<size>``: accept an OPEN with the blob's size in bytes (0..2**63-1),
    or refuse it with a negative errno (-4095..-1). Decimal, never zero-padded."""
    _check_msg_id(msg_id)
    value = size_or_negative_errno
    if not -MAX_ERRNO <= value <= LONG_MAX:
        raise ValueError(f"copen value out of range: {value}")
    return _command(b"copen", b"%d,%d" % (msg_id, value))


def encode_dir(path: str | bytes) -> bytes:
    """``dir <path>``: the cache root (absolute; resolved when ``bind`` runs)."""
    return _command(b"dir", _text_arg(path, "dir"))


def _verbatim_arg(value: str | bytes, what: str) -> bytes:
    """A name the kernel takes to the end of the line: trailing blanks are part of it
    (cachefilesd writes a configuration line as it is, so ``tag name `` names a cache
    ending in a space, and a drop-in must send the same); leading blanks cannot be sent
    (the kernel skips them after the command word)."""
    raw = os.fsencode(value)
    if not raw or raw != raw.lstrip() or b"\n" in raw or b"\0" in raw:
        raise ValueError(f"{what} {value!r}: empty, starts with whitespace, or holds NUL/newline")
    return raw


def encode_tag(tag: str | bytes) -> bytes:
    """``tag <name>``: the FS-Cache cache name (default ``CacheFiles``)."""
    return _command(b"tag", _verbatim_arg(tag, "tag"))


def encode_secctx(context: str | bytes) -> bytes:
    """``secctx <label>``: the LSM context the module acts as."""
    return _command(b"secctx", _verbatim_arg(context, "secctx"))


def encode_threshold(name: str, percent: int) -> bytes:
    """``brun|bcull|bstop|frun|fcull|fstop <N>%``. The kernel checks each value against
    the current others (stop < cull < run < 100), so the caller orders them."""
    if name not in THRESHOLDS:
        raise ValueError(f"not a threshold: {name!r}")
    if not 0 <= percent < 100:
        raise ValueError(f"{name} {percent}% out of range 0..99")
    return _command(name.encode(), b"%d%%" % percent)


def encode_bind(*, ondemand: bool) -> bytes:
    """``bind`` (classic) or ``bind ondemand``."""
    return _command(b"bind", b"ondemand" if ondemand else None)


def encode_restore() -> bytes:
    """``restore`` (6.8+): mark every outstanding request new again."""
    return _command(b"restore")


def encode_cull(name: str | bytes) -> bytes:
    """``cull <name>``: the name is looked up in the writer's current directory."""
    return _command(b"cull", _object_name(name))


def encode_inuse(name: str | bytes) -> bytes:
    """``inuse <name>``: 0 = not in use, EBUSY = in use, ENOENT/ESTALE = absent."""
    return _command(b"inuse", _object_name(name))


def encode_debug(mask: int) -> bytes:
    """``debug <mask>``: the module's debug mask (useful with CACHEFILES_DEBUG only)."""
    if not 0 <= mask < U32_LIMIT:
        raise ValueError(f"debug mask {mask} out of range 0..2**32-1")
    return _command(b"debug", b"%d" % mask)


def threshold_commands(thresholds: Mapping[str, int]) -> list[bytes]:
    """The threshold commands that take the kernel from its defaults (7/5/1 %) to
    ``thresholds`` (names as in :data:`THRESHOLDS`; missing ones keep the default).

    The kernel checks each value against the ones it holds at that moment
    (``stop < cull < run < 100``), so the order matters: step by step, this picks a
    threshold whose new value keeps the rule true against the current ones. For a
    valid target such a step always exists (lower ``stop`` first when going down,
    raise ``run`` first when going up); an invalid target raises ValueError."""
    cmds = []
    for kind in ("b", "f"):
        current = dict(KERNEL_DEFAULTS)
        pending = [n for n in ("run", "cull", "stop") if kind + n in thresholds]
        while pending:
            for n in pending:
                trial = {**current, n: thresholds[kind + n]}
                if 0 <= trial["stop"] < trial["cull"] < trial["run"] < 100:
                    cmds.append(encode_threshold(kind + n, trial[n]))
                    current = trial
                    pending.remove(n)
                    break
            else:
                raise ValueError(f"no valid order for the {kind}run/{kind}cull/{kind}stop values")
    return cmds


def setup_commands(
    cache_dir: str | bytes,
    *,
    tag: str | bytes | None = None,
    secctx: str | bytes | None = None,
    thresholds: Mapping[str, int] | None = None,
    debug: int | None = None,
) -> list[bytes]:
    """What a daemon sends before ``bind``, in order: ``dir``, ``tag``, ``secctx``,
    the thresholds, ``debug``."""
    cmds = [encode_dir(cache_dir)]
    if tag:
        cmds.append(encode_tag(tag))
    if secctx:
        cmds.append(encode_secctx(secctx))
    cmds += threshold_commands(thresholds or {})
    if debug is not None:
        cmds.append(encode_debug(debug))
    return cmds
