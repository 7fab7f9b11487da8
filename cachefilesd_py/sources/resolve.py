"""Which URL serves a blob: the ``source <pattern> <url-template>`` rules.

The kernel names a blob by its volume key (``erofs,<fsid or domain_id>``) and its cookie
key (the blob's name). A rule's pattern is an fnmatch glob over ``<volume>/<cookie>``,
the volume without its ``erofs,`` prefix; the first matching rule wins. Its template's
``{volume}`` and ``{cookie}`` placeholders are replaced by the keys, percent-escaped with
nothing left unescaped (a ``/`` becomes ``%2F``), so a key can never change the path's
shape.

Keys are untrusted input (any process that can mount EROFS picks them). Refused, with
the reason logged: empty keys, ``.`` and ``..``, bytes that are not printable ASCII
(NUL, control characters, spaces, non-UTF-8), and keys longer than 255 bytes. For
``file://`` templates the resulting path must also stay inside the template's fixed
directory part, strictly below it.
"""

from __future__ import annotations

import fnmatch
import os.path
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

import structlog

log = structlog.get_logger("sources.resolve")

SCHEMES = ("http", "https", "file")


class RuleLike(Protocol):
    @property
    def pattern(self) -> str: ...

    @property
    def url_template(self) -> str: ...


def key_problem(key: bytes) -> str | None:
    """Why ``key`` cannot name a blob in a URL, or None if it can."""
    if not key:
        return "empty"
    if len(key) > 255:
        return "longer than 255 bytes"
    if key in (b".", b".."):
        return "a dot name"
    if any(b < 0x21 or b > 0x7E for b in key):
        return "holds bytes other than printable ASCII"
    return None


def strip_volume(volume_key: bytes) -> bytes:
    volume = volume_key.rstrip(b"\0")
    return volume[len(b"erofs,") :] if volume.startswith(b"erofs,") else volume


class SourceResolver:
    def __init__(self, rules: Iterable[RuleLike]) -> None:
        self.rules = tuple(rules)

    def resolve(self, volume_key: bytes, cookie_key: bytes) -> str | None:
        volume = strip_volume(volume_key)
        for what, key in (("volume", volume), ("cookie", cookie_key)):
            problem = key_problem(key)
            if problem is not None:
                log.warning("resolve.refused_key", which=what, key=key[:64].hex(), reason=problem)
                return None
        vol, cookie = volume.decode("ascii"), cookie_key.decode("ascii")
        for rule in self.rules:
            if fnmatch.fnmatchcase(f"{vol}/{cookie}", rule.pattern):
                url = rule.url_template.replace("{volume}", quote(vol, safe="")).replace(
                    "{cookie}", quote(cookie, safe="")
                )
                if url.startswith("file://") and not _file_url_contained(rule.url_template, url):
                    log.warning("resolve.refused_path", url=url)
                    return None
                return url
        return None


def _file_url_contained(template: str, url: str) -> bool:
    fixed = template.split("{", 1)[0]
    base = os.path.dirname(unquote(urlsplit(fixed).path)) or "/"
    path = os.path.normpath(unquote(urlsplit(url).path))
    # strictly below the base: a key of only slashes (``/`` → ``%2F``) would otherwise
    # name the base directory itself
    return path != base and path.startswith(base.rstrip("/") + "/")
