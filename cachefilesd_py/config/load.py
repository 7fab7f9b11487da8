"""Read a configuration file and run the checks that need the filesystem.

:func:`read_config` reads and parses the file and loads what it refers to (credentials
files, the CA file): everything ``--check-config`` reports on. :func:`load_config`
also confirms the cache directory, as cachefilesd does while it reads the file (it
``stat``\\ s the ``dir`` value and stops with "Can't confirm cache location", exit
status 1, if that fails).
"""

from __future__ import annotations

import fnmatch
import os
import stat
import string
from pathlib import Path

from cachefilesd_py.config.model import Config
from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.errors import ConfigError

#: an HTTP field name: RFC 9110 ``token`` characters
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters)


def os_config_error(rule: str, file: str, line: int | None = None) -> ConfigError:
    """A configuration problem that is an OS-level failure (exit status 1, as
    cachefilesd's ``oserror``): an unreadable file, a missing cache directory."""
    err = ConfigError(rule, file, line)
    err.exit_code = 1
    return err


def read_config(path: str) -> Config:
    """Read, decode and parse ``path``; check the files it names (``source_headers``
    files: root's, mode 0600, every line a header; ``ca_file``: exists)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise os_config_error(f"cannot read the configuration: {exc.strerror}", path) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError("not valid UTF-8", path, line) from exc
    cfg = parse_config(text, path)
    for rule in cfg.source_headers:
        check_secret_file(rule.path, rule.file, rule.line)
        load_headers(rule.path)
    if cfg.ca_file is not None and not Path(cfg.ca_file).is_file():
        raise ConfigError(f"ca_file {cfg.ca_file}: no such file", path)
    return cfg


def load_config(path: str) -> Config:
    """:func:`read_config`, then confirm the cache directory as cachefilesd does."""
    cfg = read_config(path)
    confirm_cache_dir(cfg, path)
    return cfg


def confirm_cache_dir(cfg: Config, path: str) -> None:
    """The ``dir`` value must name a directory (ConfigError with exit status 1)."""
    assert cfg.dir is not None
    line = cfg.dir_line or None
    blank = (
        " (the value ends in a blank, kept as cachefilesd keeps it)"
        if (cfg.dir != cfg.dir.rstrip())
        else ""
    )
    try:
        st = os.stat(cfg.dir)
    except OSError as exc:
        raise os_config_error(
            f"dir {cfg.dir!r}: Can't confirm cache location: {exc.strerror}{blank}", path, line
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise os_config_error(f"dir {cfg.dir!r}: not a directory{blank}", path, line)


def check_secret_file(path: str, conf: str, line: int) -> None:
    """Credentials files must be root's and unreadable by group and others."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"source_headers {path}: {exc.strerror}", conf, line) from exc
    if st.st_uid != 0 or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"source_headers {path}: must be owned by root with mode 0600 or stricter", conf, line
        )


def load_headers(path: str) -> dict[str, str]:
    """``Name: value`` lines; blank lines and ``#`` comments ignored.

    Values go on the wire as ISO-8859-1 (what ``http.client`` encodes them with), so
    a value outside Latin-1, or with a control character, is refused here, with its
    line, instead of failing every request later."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("not valid UTF-8", path) from exc
    headers: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise ConfigError("not a 'Name: value' header line", path, number)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ConfigError(
                f"header {name}: the value holds characters outside ISO-8859-1 (Latin-1), "
                "which HTTP cannot carry; percent- or base64-encode it",
                path,
                number,
            ) from None
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise ConfigError(f"header {name}: the value holds a control character", path, number)
        headers[name] = value
    return headers


def load_header_rules(cfg: Config) -> list[tuple[str, dict[str, str]]]:
    """Every ``source_headers`` file of ``cfg``, checked as at start (root's, mode 0600,
    ``Name: value`` lines) and read; the first problem raises :class:`ConfigError`
    naming ``file:line``."""
    loaded = []
    for rule in cfg.source_headers:
        check_secret_file(rule.path, rule.file, rule.line)
        loaded.append((rule.pattern, load_headers(rule.path)))
    return loaded


class Credentials:
    """The request headers of ``source_headers``, looked up per request, swappable.

    HTTP sources ask :meth:`lookup` for their URL's headers at every request (through
    the callable ``SourceFactory`` hands them), not once when opened: so a
    :meth:`reload` — ``cachefilesctl credentials reload``, SIGHUP — reaches the sources
    of blobs already open, and an image whose token was rejected resumes fetching
    without a remount. The rules and their headers are one immutable tuple, replaced
    whole: a lookup sees the set before or after a reload, never a mix."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._loaded: tuple[tuple[str, dict[str, str]], ...] = tuple(
            (r.pattern, load_headers(r.path)) for r in cfg.source_headers
        )

    def reload(self, cfg: Config) -> list[dict[str, str]]:
        """Read ``cfg``'s ``source_headers`` files again and swap them in; raises
        :class:`ConfigError` (and changes nothing) when one is refused. Returns the
        rules reloaded (pattern, file, header names: never the values)."""
        loaded = load_header_rules(cfg)
        self._cfg, self._loaded = cfg, tuple(loaded)
        return [
            {"pattern": rule.pattern, "file": rule.path, "headers": ", ".join(sorted(h))}
            for rule, (_p, h) in zip(cfg.source_headers, loaded, strict=True)
        ]

    def lookup(self, url: str) -> dict[str, str]:
        """Headers for a URL: the first ``source_headers`` rule whose pattern matches
        the URL's source rule pattern or the URL itself."""
        cfg, loaded = self._cfg, self._loaded
        for pattern, headers in loaded:
            if fnmatch.fnmatchcase(url, pattern) or any(
                r.pattern == pattern and url.startswith(r.url_template.split("{", 1)[0])
                for r in cfg.sources
            ):
                return dict(headers)
        return {}

    __call__ = lookup


def headers_for(cfg: Config) -> Credentials:
    """The :class:`Credentials` of ``cfg`` (a callable: URL → headers)."""
    return Credentials(cfg)
