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
from collections.abc import Callable
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


def headers_for(cfg: Config) -> Callable[[str], dict[str, str]]:
    """Headers for a URL: the first ``source_headers`` rule whose pattern matches the
    URL's source rule pattern or the URL itself."""
    loaded = [(rule.pattern, load_headers(rule.path)) for rule in cfg.source_headers]

    def lookup(url: str) -> dict[str, str]:
        for pattern, headers in loaded:
            if fnmatch.fnmatchcase(url, pattern) or any(
                r.pattern == pattern and url.startswith(r.url_template.split("{", 1)[0])
                for r in cfg.sources
            ):
                return dict(headers)
        return {}

    return lookup
