r"""Which URL serves a blob: the ``source <pattern> <url-template>`` rules.

The kernel names a blob by its volume key (``erofs,<fsid or domain_id>``) and its cookie
key (the blob's name). A rule's pattern is an fnmatch glob over ``<volume>/<cookie>``,
the volume without its ``erofs,`` prefix; the first matching rule wins. Its template's
``{volume}`` and ``{cookie}`` placeholders are replaced by the keys.

Keys are untrusted input: any process that may mount EROFS picks them. **A key must
never change which resource the template names**, and percent-escaping is not enough
for that: a cookie ``../private/secret.img`` sent as ``..%2Fprivate%2Fsecret.img`` is
decoded and normalised by nginx, which then served the private file, with whatever
credentials the rule attaches. Servers decode ``%2F``, treat ``\`` as ``/`` (IIS),
strip ``;params`` before resolving ``..;`` (Tomcat), map ``~user`` to home directories
(Apache), serve dot-files. So the rule is an allow-list, the same for both schemes:

**a key is one path segment of 1 to 255 bytes: an ASCII letter or digit, then letters,
digits and ``. _ - : +``.** That covers real names (``img.erofs``, 64-hex-digit nydus
blob ids, ``sha256:<hex>``, versioned names like ``base-1.2+x86``) and leaves nothing a
server could decode, normalise or climb with: no ``/``, ``%``, ``\``, ``;``, ``~``, no
leading ``.`` (so no ``.``/``..`` and no dot-files), no spaces or control bytes.
``/`` in a key therefore means nothing: it is refused; a layout with directories is
the template's business (``file:///srv/{volume}/{cookie}``). Refused keys are logged
(hex, with the reason) and the OPEN fails with ENOENT.

The substituted key is percent-escaped all the same (``:`` and ``+`` become ``%3A``,
``%2B``), and the result is checked once more: same scheme and authority as the
template, and for ``file://``, a path strictly below the template's fixed directory,
which the :class:`ResolvedUrl` carries (``beneath``) so that ``FileSource`` opens the
file with the kernel's own beneath-resolution instead of trusting the string.
"""

from __future__ import annotations

import fnmatch
import os.path
import re
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


_KEY = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:+-]*")


class ResolvedUrl(str):
    """A resolved URL that remembers, for ``file://``, the directory the path must be
    resolved beneath (None for other schemes), and the label of the rule that made it
    (:func:`rule_label`, for metrics). It is a ``str`` for everything else."""

    beneath: str | None
    label: str | None

    def __new__(
        cls, url: str, beneath: str | None = None, label: str | None = None
    ) -> ResolvedUrl:
        obj = super().__new__(cls, url)
        obj.beneath = beneath
        obj.label = label
        return obj


def rule_label(template: str) -> str:
    """How metrics name the ``source`` rule of ``template``: the template itself
    (``https://cdn.example:443/{cookie}``), less any user:password and query, which
    may hold secrets. Fixed by the configuration, never by a key: bounded."""
    parts = urlsplit(template)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}"


def key_problem(key: bytes) -> str | None:
    """Why ``key`` cannot name a blob in a URL, or None if it can."""
    if not key:
        return "empty"
    if len(key) > 255:
        return "longer than 255 bytes"
    if _KEY.fullmatch(key):
        return None
    if key[:1] == b".":
        return "starts with a dot"
    if b"/" in key:
        return "holds '/' (a key is one path segment)"
    if any(b < 0x21 or b > 0x7E for b in key):
        return "holds bytes other than printable ASCII"
    return "holds a character other than letters, digits and . _ - : +"


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
                problem = _shape_problem(rule.url_template, url)
                if problem is not None:
                    log.warning("resolve.refused_url", url=url, reason=problem)
                    return None
                label = rule_label(rule.url_template)
                if url.startswith("file:"):
                    return ResolvedUrl(url, file_base(rule.url_template), label)
                return ResolvedUrl(url, label=label)
        return None


def file_base(template: str) -> str:
    """The fixed directory of a ``file://`` template: its path up to the last ``/``
    before the first placeholder."""
    fixed = template.split("{", 1)[0]
    return os.path.dirname(unquote(urlsplit(fixed).path)) or "/"


def _shape_problem(template: str, url: str) -> str | None:
    """Why ``url`` does not have the shape ``template`` gives it, or None."""
    t, u = urlsplit(template.split("{", 1)[0]), urlsplit(url)
    if u.scheme != t.scheme:
        return "scheme changed"
    if "{" not in template.split("://", 1)[-1].split("/", 1)[0] and u.netloc != t.netloc:
        return "authority changed"
    if u.scheme == "file":
        base = file_base(template)
        path = os.path.normpath(unquote(u.path))
        # strictly below the base, never the base itself
        if path == base or not path.startswith(base.rstrip("/") + "/"):
            return f"path not below {base}"
    return None
