"""Parse ``cachefilesd.conf`` text into a :class:`Config` (pure: no I/O).

A drop-in for cachefilesd: a line that cachefilesd 0.10.10 and the kernel accept gives
the same settings here, and a line they refuse is refused here, with the rule spelled
out as ``file:line: rule`` before anything reaches the kernel (cachefilesd only relays
the kernel's bare ``EINVAL``). ``docs/config-compat.md`` explains how the two read a
line, row by row against the table in ``tests/unit/c_config_table.py``; in short:

- a line is a *word* and a *value*: the word ends at the first blank (space, tab, CR,
  VT or FF: ``isspace()`` in the C locale) and the value is everything after the run
  of blanks that follows, **kept verbatim to the end of the line**, trailing blanks
  included (the kernel keeps them in ``dir``, ``tag`` and ``secctx``, and refuses a
  threshold or ``debug`` value followed by one);
- blank lines and lines whose first non-blank is ``#`` are skipped; there are no
  trailing comments (``brun 10% # x`` is refused, ``tag a # b`` names the tag
  ``a # b``, as with cachefilesd);
- the directives the kernel reads (``dir tag secctx debug brun bcull bstop frun fcull
  fstop``) must start in column 1: cachefilesd sends the line as it stands and the
  kernel refuses a command that starts with a blank. The directives the daemon reads
  itself may be indented;
- numbers are ASCII digits only, read the way their reader reads them: the kernel's
  ``simple_strtoul`` for percentages (base 10) and ``debug`` (base 0: ``0x1f``,
  ``017``), C's ``strtoul`` for ``culltable`` (a sign is allowed);
- ``dir``, ``tag`` and ``secctx`` may be given once (the kernel refuses a second one);
  ``debug``, the thresholds and ``culltable`` may be repeated, the last one wins;
  ``bind`` is refused (the daemon binds the cache itself);
- thresholds are checked as a whole once the file is read: ``0 <= stop < cull < run <
  100`` for blocks and for files, unset values being the kernel's defaults.

Where this parser knowingly differs from cachefilesd (each is tested and listed in
``cachefilesd-py.conf(5)``): ``nocull`` and ``resume_thresholds`` work (cachefilesd
0.10.10 hands ``nocull`` to the kernel, which refuses it, and never recognises
``resume_thresholds``: its ``memcmp`` compares 18 bytes of a 17-letter word); a file
whose last line has no newline is read (cachefilesd: "Unterminated line"); thresholds
may come in any order (the daemon sends them in an order the kernel's step-by-step
checks accept); ``dir`` must be an absolute path; a number too large for 64 bits is
refused (the kernel would silently wrap it).

This project's own directives (``ondemand``, ``source`` and the rest) are words and
values too, their arguments separated by runs of blanks; trailing blanks are ignored.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from cachefilesd_py.config.model import (
    KERNEL_DEFAULT_PERCENT,
    THRESHOLDS,
    Config,
    FanotifyImage,
    HeaderRule,
    OfflineRule,
    SizeRule,
    SourceRule,
)
from cachefilesd_py.errors import ConfigError

#: cachefilesd reads lines with ``getline`` and refuses one of a page or more,
#: counting its newline: a line holds at most 4094 bytes
PAGE = 4096
#: ``isspace()`` in the C locale; the kernel's ``isspace`` agrees on ASCII
BLANKS = " \t\n\v\f\r"
_BLANK_RUN = re.compile(f"[{re.escape(BLANKS)}]+")
#: cachefilesd: ``strlen(path) > PATH_MAX - 10`` → "Cache pathname is too long"
MAX_DIR_BYTES = 4096 - 10
U64 = 1 << 64
SIZE = re.compile(r"([0-9]+)([KMGT]?)(i?B)?", re.IGNORECASE | re.ASCII)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DECIMAL = re.compile(r"[0-9]+")
SECONDS = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
POLICIES = ("s3fifo", "lru", "fifo")
SCHEMES = ("http", "https", "file")


def kernel_defaults_text() -> str:
    """The kernel's default thresholds, as ``run/cull/stop``: the one spelling of them."""
    d = KERNEL_DEFAULT_PERCENT
    return f"{d['run']}/{d['cull']}/{d['stop']}% (run/cull/stop)"


def parse_size(text: str) -> int:
    m = SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (digits with an optional K, M, G or T)")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


def _count(text: str, what: str, lo: int, hi: int) -> int:
    if not DECIMAL.fullmatch(text):
        raise ValueError(f"{what} must be a whole number (ASCII digits), not {text!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{what} must lie in {lo}..{hi}, not {value}")
    return value


def split_line(body: str) -> tuple[str, str]:
    """``word`` up to the first blank, and the value after the blanks that follow it,
    verbatim (the kernel's ``cachefiles_daemon_write`` split)."""
    m = _BLANK_RUN.search(body)
    if m is None:
        return body, ""
    return body[: m.start()], body[m.end() :]


def tokens(value: str) -> list[str]:
    """The arguments of one of this project's directives: split on runs of blanks."""
    return [t for t in _BLANK_RUN.split(value) if t]


def kernel_strtoul(text: str, base: int) -> tuple[int, str]:
    """The kernel's ``simple_strtoul``: the value of the leading digits and what
    follows them. Base 0 reads ``0x``/``0X`` + a hex digit as hexadecimal, another
    leading ``0`` as octal, else decimal; no sign, no blanks. A value that does not
    fit 64 bits raises ValueError (the kernel would wrap it)."""
    if base == 0:
        if text[:1] != "0":
            base = 10
        elif text[1:2] in ("x", "X") and text[2:3] and text[2:3] in string.hexdigits:
            base = 16
        else:
            base = 8
    if base == 16 and text[:1] == "0" and text[1:2] in ("x", "X"):
        text = text[2:]
    digits = "0123456789abcdef"[:base]
    end = 0
    while end < len(text) and text[end].lower() in digits and text[end].isascii():
        end += 1
    value = int(text[:end], base) if end else 0
    if value >= U64:
        raise ValueError(f"{text[:end]!r} does not fit in 64 bits")
    return value, text[end:]


def _cr_hint(rest: str) -> str:
    return " (a CR: CRLF line endings?)" if "\r" in rest else ""


@dataclass(frozen=True)
class Directive:
    """How one directive word is read."""

    handler: Handler
    #: read by the kernel (cachefilesd relays the line): column 1, value verbatim
    kernel: bool = False
    #: may appear once
    once: bool = False


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
        if len(raw.encode()) + 1 >= PAGE:
            raise fail(f"line too long (at most {PAGE - 2} bytes, as cachefilesd reads them)")
        body = raw.lstrip(BLANKS)
        if not body or body.startswith("#"):
            continue
        word, value = split_line(body)
        if word == "bind":
            raise fail("'bind' command not permitted (the daemon binds the cache itself)")
        directive = DIRECTIVES.get(word)
        if directive is None:
            raise fail(f"unknown directive '{word}'")
        if directive.kernel and body != raw:
            raise fail(
                f"leading whitespace before '{word}': cachefilesd passes the line as it "
                "stands and the kernel refuses a command that starts with a blank"
            )
        if directive.once and word in seen:
            raise fail(f"'{word}' given twice (first on line {seen[word]})")
        seen[word] = number
        try:
            cfg = directive.handler(cfg, value, filename, number)
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
                f"not hold (unset values are the kernel's {kernel_defaults_text()})",
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


Handler = Callable[[Config, str, str, int], Config]


# -- cachefilesd's directives ------------------------------------------------------------


def _nonempty(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"empty {what} (the kernel refuses it)")
    return value


def _dir(cfg: Config, value: str, _f: str, n: int) -> Config:
    path = _nonempty(value, "cache directory")
    if not path.startswith("/"):
        raise ValueError(f"must be an absolute path, not {path!r}")
    if len(path.encode()) > MAX_DIR_BYTES:
        raise ValueError(f"cache pathname is too long (at most {MAX_DIR_BYTES} bytes)")
    return replace(cfg, dir=path, dir_line=n)


def _threshold(name: str) -> Handler:
    def handle(cfg: Config, value: str, _f: str, _n: int) -> Config:
        number, rest = kernel_strtoul(_nonempty(value, "percentage"), 10)
        if rest != "%":
            raise ValueError(
                f"must be a whole percentage like 10%, with nothing after the %, not "
                f"{value!r}{_cr_hint(rest)}"
            )
        if number >= 100:
            raise ValueError(f"{number}% is not below 100%")
        return replace(cfg, thresholds={**cfg.thresholds, name: number})

    return handle


def _debug(cfg: Config, value: str, _f: str, _n: int) -> Config:
    mask, rest = kernel_strtoul(value, 0)
    if rest:
        raise ValueError(
            f"debug command requires a mask (a number such as 0, 7 or 0x7), not "
            f"{value!r}{_cr_hint(rest)}"
        )
    # the kernel keeps the mask in an unsigned int
    return replace(cfg, debug=mask & 0xFFFFFFFF)


def _culltable(cfg: Config, value: str, _f: str, _n: int) -> Config:
    m = re.fullmatch(r"([+-]?)([0-9]*)", value)
    if m is None or (m.group(1) and not m.group(2)):
        raise ValueError(f"invalid cull table size number {value!r}{_cr_hint(value)}")
    log2 = int(m.group(2) or "0")
    if m.group(1) == "-" and log2:
        log2 = U64 - log2  # strtoul negates: far out of range
    if not 12 <= log2 <= 20:
        raise ValueError(f"log2 of cull table size must be 12 <= N <= 20, not {value!r}")
    return replace(cfg, culltable=log2)


def _nocull(cfg: Config, value: str, _f: str, _n: int) -> Config:
    if tokens(value):
        raise ValueError("takes no argument")
    return replace(cfg, nocull=True)


def _resume(cfg: Config, value: str, _f: str, _n: int) -> Config:
    args = tokens(value)
    if len(args) != 2:
        raise ValueError("takes two arguments: <blocks> <files> (either may be '-')")
    values: list[int | None] = []
    for what, text in zip(("blocks", "files"), args, strict=True):
        if text == "-":
            values.append(None)
            continue
        if not DECIMAL.fullmatch(text) or int(text) == 0 or int(text) >= U64:
            raise ValueError(f"invalid resume threshold ({what}): {text!r}")
        values.append(int(text))
    return replace(cfg, resume_blocks=values[0], resume_files=values[1])


def _verbatim(field_name: str, what: str) -> Handler:
    def handle(cfg: Config, value: str, _f: str, _n: int) -> Config:
        changes: dict[str, Any] = {field_name: _nonempty(value, what)}
        return replace(cfg, **changes)

    return handle


# -- this project's directives ------------------------------------------------------------


def _one(value: str, what: str) -> str:
    args = tokens(value)
    if len(args) != 1:
        raise ValueError(f"takes exactly one argument ({what})")
    return args[0]


def check_url_template(template: str) -> None:
    """A ``source`` URL template must name one resource whatever the keys are: a known
    scheme, a host for http(s), an absolute path for file, and ``{volume}``/``{cookie}``
    only in the path. ValueError says what is wrong."""
    leftover = re.sub(r"\{(volume|cookie)\}", "", template)
    if "{" in leftover or "}" in leftover:
        raise ValueError("unknown placeholder: only {volume} and {cookie} exist")
    sample = template.replace("{volume}", "v").replace("{cookie}", "c")
    try:
        url = urlsplit(sample)
        port = url.port
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a URL: {exc}") from None
    if url.scheme not in SCHEMES:
        raise ValueError(f"URL scheme must be http, https or file, not {url.scheme!r}")
    fixed = urlsplit(template.split("{", 1)[0])
    if "{" in template and (fixed.path == "" or fixed.scheme != url.scheme):
        raise ValueError("{volume} and {cookie} may appear only in the URL's path")
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise ValueError(f"a file URL names no host, not {url.netloc!r}")
        if not url.path.startswith("/"):
            raise ValueError("a file URL needs an absolute path")
    elif not url.hostname:
        raise ValueError(f"{template!r} names no host")
    elif port == 0:
        raise ValueError("port 0 is not a port")


def _source(cfg: Config, value: str, f: str, n: int) -> Config:
    args = tokens(value)
    if len(args) != 2:
        raise ValueError("takes two arguments: <pattern> <url-template>")
    pattern, template = args
    check_url_template(template)
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
    def handle(cfg: Config, value: str, f: str, n: int) -> Config:
        args = tokens(value)
        if len(args) != 2:
            raise ValueError("takes two arguments: <pattern> <size>")
        size = _chunk(args[1]) if chunk else parse_size(args[1])
        rule = SizeRule(args[0], size, f, n)
        changes: dict[str, Any] = {field_name: (*getattr(cfg, field_name), rule)}
        return replace(cfg, **changes)

    return handle


def _headers(cfg: Config, value: str, f: str, n: int) -> Config:
    args = tokens(value)
    if len(args) != 2 or not args[1].startswith("/"):
        raise ValueError("takes two arguments: <pattern> </absolute/path/of/headers-file>")
    return replace(cfg, source_headers=(*cfg.source_headers, HeaderRule(args[0], args[1], f, n)))


def _set(field_name: str, convert: Callable[[str], object]) -> Handler:
    def handle(cfg: Config, value: str, _f: str, _n: int) -> Config:
        changes: dict[str, Any] = {field_name: convert(_one(value, field_name))}
        return replace(cfg, **changes)

    return handle


def _flag(field_name: str) -> Handler:
    def handle(cfg: Config, value: str, _f: str, _n: int) -> Config:
        if tokens(value):
            raise ValueError("takes no argument")
        changes: dict[str, Any] = {field_name: True}
        return replace(cfg, **changes)

    return handle


def _timeout(text: str) -> float:
    if not SECONDS.fullmatch(text):
        raise ValueError(f"must be a number of seconds (ASCII digits), not {text!r}")
    value = float(text)
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


def _pin(cfg: Config, value: str, _f: str, _n: int) -> Config:
    return replace(cfg, pins=(*cfg.pins, _one(value, "a blob pattern")))


def _offline_policy(cfg: Config, value: str, f: str, n: int) -> Config:
    """``offline_policy [<pattern>] error`` or ``... wait <duration>``."""
    from cachefilesd_py.engine.offline_policy import OfflinePolicy

    args = tokens(value)
    pattern = None
    if args and args[0] not in ("error", "wait"):
        pattern = args.pop(0)
    if not args:
        raise ValueError(
            "takes [<pattern>] error, or [<pattern>] wait <duration> (90, 90s, 5m, 1h)"
        )
    policy = OfflinePolicy.parse(" ".join(args))
    rule = OfflineRule(pattern, str(policy), f, n)
    return replace(cfg, offline_policies=(*cfg.offline_policies, rule))


def _share(text: str) -> int:
    """``50%`` (or ``50``): a whole percentage, 0..100."""
    digits = text.removesuffix("%")
    if not (digits.isascii() and digits.isdigit()) or not 0 <= int(digits) <= 100:
        raise ValueError(f"must be a percentage 0%..100%, not {text!r}")
    return int(digits)


def _own(handler: Handler) -> Directive:
    return Directive(handler, once=False)


def _own_once(handler: Handler) -> Directive:
    return Directive(handler, once=True)


DIRECTIVES: dict[str, Directive] = {
    # read by the kernel
    "dir": Directive(_dir, kernel=True, once=True),
    "tag": Directive(_verbatim("tag", "tag"), kernel=True, once=True),
    "secctx": Directive(_verbatim("secctx", "security context"), kernel=True, once=True),
    "debug": Directive(_debug, kernel=True),
    **{name: Directive(_threshold(name), kernel=True) for name in THRESHOLDS},
    # read by cachefilesd itself
    "culltable": Directive(_culltable),
    "nocull": Directive(_nocull),
    "resume_thresholds": Directive(_resume),
    # this project's
    "ondemand": _own_once(_flag("ondemand")),
    "source": _own(_source),
    "chunk_size": _own_once(_set("chunk_size", _chunk)),
    "source_chunk_size": _own(_pattern_size("source_chunk_sizes", chunk=True)),
    "readahead": _own_once(_set("readahead", parse_size)),
    "fetch_timeout": _own_once(_set("fetch_timeout", _timeout)),
    "fetch_retries": _own_once(_set("fetch_retries", lambda t: _count(t, "fetch_retries", 0, 20))),
    "fetch_concurrency": _own_once(
        _set("fetch_concurrency", lambda t: _count(t, "fetch_concurrency", 1, 256))
    ),
    "ca_file": _own_once(_set("ca_file", str)),
    "source_headers": _own(_headers),
    "cache_max_bytes": _own_once(_set("cache_max_bytes", parse_size)),
    "cache_max_objects": _own_once(
        _set("cache_max_objects", lambda t: _count(t, "cache_max_objects", 1, 2**63))
    ),
    "volume_max_bytes": _own(_pattern_size("volume_max_bytes", chunk=False)),
    "cull_policy": _own_once(_set("cull_policy", _policy)),
    "pin": _own(_pin),
    "pin_max_share": _own_once(_set("pin_max_share", _share)),
    "offline_policy": _own(_offline_policy),
    "fanotify": _own_once(_flag("fanotify")),
    "fanotify_image": _own(lambda cfg, value, f, n: _fanotify_image(cfg, tokens(value), f, n)),
    "control_socket": _own_once(_set("control_socket", _control_socket)),
    "control_group": _own_once(_set("control_group", _group)),
    "metrics_listen": _own_once(_set("metrics_listen", _listen)),
}
