"""Parse ``cachefilesd.conf`` text into a :class:`Config` (pure: no I/O).

cachefilesd C hands most lines to the kernel as they stand and lets it decide, which
means an error shows up as a bare ``EINVAL`` with the details in dmesg. Here every rule
is checked *before* anything reaches the kernel, and every error reads
``file:line: rule``:

- one directive per line, starting in column 1; ``#`` comments and blank lines are
  ignored; a missing final newline is accepted (cachefilesd refuses it);
- CRLF line endings, trailing whitespace, NUL bytes and lines of 4095+ bytes are
  refused with a rule naming the problem (the kernel would keep a ``\\r`` or a trailing
  space in the value);
- thresholds are ``N%`` exactly, and ``0 <= stop < cull < run < 100`` must hold for the
  blocks and the files triple after the whole file is read;
- a directive the kernel accepts once (``dir``, ``tag``, ``secctx``, thresholds...) may
  appear once; ``bind`` is refused (the daemon binds itself);
- sizes take binary suffixes ``K M G T``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from cachefilesd_py.config.model import (
    THRESHOLDS,
    Config,
    FanotifyImage,
    HeaderRule,
    SizeRule,
    SourceRule,
)
from cachefilesd_py.errors import ConfigError

MAX_LINE = 4095
#: ASCII digits only: str.isdigit() and \d also take other scripts' digits (١٠)
PERCENT = re.compile(r"^([0-9]{1,3})%$", re.ASCII)
SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE | re.ASCII)
#: a debug mask as the kernel takes it: decimal or 0x hex, ASCII, no sign
DEBUG_MASK = re.compile(r"^(?:0[xX][0-9a-fA-F]+|[0-9]+)$", re.ASCII)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
POLICIES = ("s3fifo", "lru", "fifo")
ONCE = {
    "dir",
    "tag",
    "secctx",
    "debug",
    "culltable",
    "resume_thresholds",
    "nocull",
    "ondemand",
    "fanotify",
    "chunk_size",
    "readahead",
    "fetch_timeout",
    "fetch_retries",
    "fetch_concurrency",
    "ca_file",
    "cache_max_bytes",
    "cache_max_objects",
    "cull_policy",
    "control_socket",
    "control_group",
    "metrics_listen",
    *THRESHOLDS,
}


def parse_size(text: str) -> int:
    m = SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (digits with an optional K, M, G or T)")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


def _count(text: str, what: str, lo: int, hi: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{what} must be a whole number in ASCII digits, not {text!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{what} must lie in {lo}..{hi}, not {value}")
    return value


def parse_config(text: str, filename: str = "<config>") -> Config:
    cfg = Config()
    seen: dict[str, int] = {}
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, raw in enumerate(lines, start=1):

        def fail(rule: str, number: int = number) -> ConfigError:
            return ConfigError(rule, filename, number)

        if "\0" in raw:
            raise fail("line contains a NUL character")
        if len(raw.encode()) >= MAX_LINE:
            raise fail(f"line too long (the kernel takes at most {MAX_LINE - 1} bytes)")
        if raw.endswith("\r"):
            raise fail("CRLF line ending: save the file with Unix (LF) line endings")
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw != raw.rstrip():
            raise fail("trailing whitespace (the kernel would keep it in the value)")
        if raw != raw.lstrip():
            raise fail("leading whitespace: directives start in column 1")
        word, _, rest = raw.partition(" ")
        args = rest.split()
        if rest != " ".join(args):
            raise fail("arguments separated by more than one space or by tabs")
        if word in ONCE:
            if word in seen:
                raise fail(f"'{word}' given twice (first on line {seen[word]})")
            seen[word] = number
        handler = HANDLERS.get(word)
        if handler is None:
            if word == "bind":
                raise fail("'bind' command not permitted (the daemon binds the cache itself)")
            raise fail(f"unknown directive '{word}'")
        try:
            cfg = handler(cfg, args, filename, number)
        except ValueError as exc:
            raise fail(f"{word}: {exc}") from exc
    return _check_whole(cfg, filename, seen)


def _check_whole(cfg: Config, filename: str, seen: dict[str, int]) -> Config:
    if cfg.dir is None:
        raise ConfigError("no 'dir' directive: the cache directory is mandatory", filename)
    for kind in ("b", "f"):
        run, cull, stop = (cfg.threshold(kind + n) for n in ("run", "cull", "stop"))
        if not 0 <= stop < cull < run < 100:
            where = max((seen.get(kind + n, 0) for n in ("run", "cull", "stop")), default=0)
            raise ConfigError(
                f"{kind}stop {stop}% < {kind}cull {cull}% < {kind}run {run}% < 100% does "
                "not hold (unset values are the kernel's 1/5/7)",
                filename,
                where or None,
            )
    if cfg.ondemand and not cfg.sources:
        raise ConfigError(
            "'ondemand' needs at least one 'source' rule", filename, seen.get("ondemand")
        )
    if cfg.fanotify:
        if cfg.ondemand:
            raise ConfigError(
                "'fanotify' and 'ondemand' exclude each other (one frontend per daemon)",
                filename,
                seen.get("fanotify"),
            )
        if not cfg.sources:
            raise ConfigError(
                "'fanotify' needs at least one 'source' rule", filename, seen.get("fanotify")
            )
        if not cfg.fanotify_images:
            raise ConfigError(
                "'fanotify' needs at least one 'fanotify_image' line", filename, seen["fanotify"]
            )
    elif cfg.fanotify_images:
        first = cfg.fanotify_images[0]
        raise ConfigError("'fanotify_image' needs the 'fanotify' directive", filename, first.line)
    return cfg


Handler = Callable[[Config, list[str], str, int], Config]


def _one(args: list[str], what: str) -> str:
    if len(args) != 1:
        raise ValueError(f"takes exactly one argument ({what})")
    return args[0]


def _none(args: list[str]) -> None:
    if args:
        raise ValueError("takes no argument")


def _threshold(name: str) -> Handler:
    def handle(cfg: Config, args: list[str], _f: str, _n: int) -> Config:
        m = PERCENT.match(_one(args, "N%"))
        if not m:
            raise ValueError(f"must be a whole percentage like 10%, not {args[0]!r}")
        value = int(m.group(1))
        if value >= 100:
            raise ValueError(f"{value}% is not below 100%")
        return replace(cfg, thresholds={**cfg.thresholds, name: value})

    return handle


def _dir(cfg: Config, args: list[str], _f: str, _n: int) -> Config:
    path = _one(args, "the cache directory")
    if not path.startswith("/"):
        raise ValueError(f"must be an absolute path, not {path!r}")
    if len(path) > 4096 - 10:
        raise ValueError("cache pathname is too long")
    return replace(cfg, dir=path)


def _resume(cfg: Config, args: list[str], _f: str, _n: int) -> Config:
    if len(args) != 2:
        raise ValueError("takes two arguments: <blocks> <files> (either may be '-')")
    values: list[int | None] = []
    for what, text in zip(("blocks", "files"), args, strict=True):
        if text == "-":
            values.append(None)
            continue
        if not (text.isascii() and text.isdigit()) or int(text) == 0:
            raise ValueError(f"invalid resume threshold ({what}): {text!r}")
        values.append(int(text))
    return replace(cfg, resume_blocks=values[0], resume_files=values[1])


def _source(cfg: Config, args: list[str], f: str, n: int) -> Config:
    if len(args) != 2:
        raise ValueError("takes two arguments: <pattern> <url-template>")
    pattern, template = args
    scheme = urlsplit(template).scheme
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"URL scheme must be http, https or file, not {scheme!r}")
    leftover = re.sub(r"\{(volume|cookie)\}", "", template)
    if "{" in leftover or "}" in leftover:
        raise ValueError("unknown placeholder: only {volume} and {cookie} exist")
    return replace(cfg, sources=(*cfg.sources, SourceRule(pattern, template, f, n)))


#: volume and blob names of fanotify images: they name files in the cache directory
IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


def _image_name(text: str, what: str) -> str:
    if not IMAGE_NAME.match(text):
        raise ValueError(
            f"{what} {text!r} must be 1 to 255 of A-Z a-z 0-9 . _ + -, not starting with . _ + or -"
        )
    return text


def _fanotify_image(cfg: Config, args: list[str], f: str, n: int) -> Config:
    if len(args) < 2:
        raise ValueError(
            "takes <volume>/<name> <mountpoint> and optionally the image's extra blobs"
        )
    volume, slash, name = args[0].partition("/")
    if not slash:
        raise ValueError(f"the image is named <volume>/<name>, not {args[0]!r}")
    _image_name(volume, "volume")
    _image_name(name, "image name")
    mountpoint = args[1]
    if not mountpoint.startswith("/") or "," in mountpoint:
        raise ValueError(
            f"the mount point must be an absolute path without ',', not {mountpoint!r}"
        )
    blobs = tuple(_image_name(b, "blob name") for b in args[2:])
    names = [name, *blobs]
    if len(set(names)) != len(names):
        raise ValueError("an image names each of its blobs once")
    for other in cfg.fanotify_images:
        if other.mountpoint.rstrip("/") == mountpoint.rstrip("/"):
            raise ValueError(f"mount point {mountpoint} is already used on line {other.line}")
        taken = {other.name, *other.blobs} if other.volume == volume else set()
        if taken & set(names):
            raise ValueError(
                f"blob {volume}/{sorted(taken & set(names))[0]} is already served by line"
                f" {other.line}"
            )
    image = FanotifyImage(volume, name, mountpoint, blobs, f, n)
    return replace(cfg, fanotify_images=(*cfg.fanotify_images, image))


def _chunk(size_text: str) -> int:
    size = parse_size(size_text)
    if size < 4096 or size > 64 << 20 or size & (size - 1):
        raise ValueError(f"chunk size must be a power of two from 4K to 64M, not {size_text}")
    return size


def _pattern_size(field_name: str, chunk: bool) -> Handler:
    def handle(cfg: Config, args: list[str], f: str, n: int) -> Config:
        if len(args) != 2:
            raise ValueError("takes two arguments: <pattern> <size>")
        size = _chunk(args[1]) if chunk else parse_size(args[1])
        rule = SizeRule(args[0], size, f, n)
        changes: dict[str, Any] = {field_name: (*getattr(cfg, field_name), rule)}
        return replace(cfg, **changes)

    return handle


def _headers(cfg: Config, args: list[str], f: str, n: int) -> Config:
    if len(args) != 2 or not args[1].startswith("/"):
        raise ValueError("takes two arguments: <pattern> </absolute/path/of/headers-file>")
    return replace(cfg, source_headers=(*cfg.source_headers, HeaderRule(args[0], args[1], f, n)))


def _set(field_name: str, convert: Callable[[str], object]) -> Handler:
    def handle(cfg: Config, args: list[str], _f: str, _n: int) -> Config:
        changes: dict[str, Any] = {field_name: convert(_one(args, field_name))}
        return replace(cfg, **changes)

    return handle


def _flag(field_name: str) -> Handler:
    def handle(cfg: Config, args: list[str], _f: str, _n: int) -> Config:
        _none(args)
        changes: dict[str, Any] = {field_name: True}
        return replace(cfg, **changes)

    return handle


def _debug(text: str) -> int:
    if not DEBUG_MASK.match(text):
        raise ValueError(f"debug command requires a numeric mask, not {text!r}")
    try:
        mask = int(text, 0)
    except ValueError:
        raise ValueError(f"debug command requires a numeric mask, not {text!r}") from None
    if mask >= 1 << 32:
        raise ValueError(f"debug mask {text} is above the kernel's 32 bits")
    return mask


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number of seconds, not {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise ValueError("must lie between 0.1 and 3600 seconds")
    return value


def _policy(text: str) -> str:
    if text not in POLICIES:
        raise ValueError(f"must be one of {', '.join(POLICIES)}, not {text!r}")
    return text


def _control_socket(text: str) -> str:
    if text == "none":
        return ""
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path or 'none', not {text!r}")
    if len(text.encode()) > 107:
        raise ValueError("a Unix socket path has at most 107 bytes")
    return text


def _group(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?", text):
        raise ValueError(f"must be a group name or number, not {text!r}")
    return text


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:9101`` or ``[::1]:9101`` → (host, port); loopback addresses only
    (the metrics say what the cache holds and how it is used: not for the network)."""
    host, sep, port_text = text.rpartition(":")
    port_ok = port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536
    if not sep or not port_ok:
        raise ValueError(f"must be <loopback address>:<port>, not {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address (metrics stay on this host)")
    return host, int(port_text)


def _listen(text: str) -> str:
    parse_listen(text)
    return text


def _pin(cfg: Config, args: list[str], _f: str, _n: int) -> Config:
    return replace(cfg, pins=(*cfg.pins, _one(args, "a blob pattern")))


HANDLERS: dict[str, Handler] = {
    "dir": _dir,
    "tag": _set("tag", str),
    "secctx": _set("secctx", str),
    "debug": _set("debug", _debug),
    **{name: _threshold(name) for name in THRESHOLDS},
    "culltable": _set("culltable", lambda t: _count(t, "culltable", 12, 20)),
    "resume_thresholds": _resume,
    "nocull": _flag("nocull"),
    "ondemand": _flag("ondemand"),
    "fanotify": _flag("fanotify"),
    "fanotify_image": _fanotify_image,
    "source": _source,
    "chunk_size": _set("chunk_size", _chunk),
    "source_chunk_size": _pattern_size("source_chunk_sizes", chunk=True),
    "readahead": _set("readahead", parse_size),
    "fetch_timeout": _set("fetch_timeout", _timeout),
    "fetch_retries": _set("fetch_retries", lambda t: _count(t, "fetch_retries", 0, 20)),
    "fetch_concurrency": _set(
        "fetch_concurrency", lambda t: _count(t, "fetch_concurrency", 1, 256)
    ),
    "ca_file": _set("ca_file", str),
    "source_headers": _headers,
    "cache_max_bytes": _set("cache_max_bytes", parse_size),
    "cache_max_objects": _set(
        "cache_max_objects", lambda t: _count(t, "cache_max_objects", 1, 2**63)
    ),
    "volume_max_bytes": _pattern_size("volume_max_bytes", chunk=False),
    "cull_policy": _set("cull_policy", _policy),
    "pin": _pin,
    "control_socket": _set("control_socket", _control_socket),
    "control_group": _set("control_group", _group),
    "metrics_listen": _set("metrics_listen", _listen),
}
