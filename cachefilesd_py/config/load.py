"""Read a configuration file and run the checks that need the filesystem."""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Callable
from pathlib import Path

from cachefilesd_py.config.model import Config
from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.errors import ConfigError


def load_config(path: str) -> Config:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        err = ConfigError(f"cannot read the configuration: {exc.strerror}", path)
        err.exit_code = 1
        raise err from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError("not valid UTF-8", path, line) from exc
    cfg = parse_config(text, path)
    for rule in cfg.source_headers:
        check_secret_file(rule.path, rule.file, rule.line)
    if cfg.ca_file is not None and not Path(cfg.ca_file).is_file():
        raise ConfigError(f"ca_file {cfg.ca_file}: no such file", path)
    return cfg


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
    """``Name: value`` lines; blank lines and ``#`` comments ignored."""
    headers: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or any(c in name for c in " \t"):
            raise ConfigError("not a 'Name: value' header line", path, number)
        headers[name.strip()] = value.strip()
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
