"""Counters the core keeps where events happen (``counters.py``), the fixed set of
error kinds (``errors.py``) and how metrics name a source rule (``sources/resolve.py``)."""

from __future__ import annotations

import errno
import threading

import pytest

from cachefilesd_py.counters import OVERFLOW, LabelledCounts
from cachefilesd_py.errors import (
    ERROR_KINDS,
    IdentityChanged,
    SourceError,
    SourceNotFound,
    error_kind,
)
from cachefilesd_py.sources.resolve import SourceResolver, rule_label


class Rule:
    def __init__(self, pattern: str, url_template: str) -> None:
        self.pattern = pattern
        self.url_template = url_template


def test_labelled_counts_add_up_across_threads() -> None:
    counts = LabelledCounts()

    def work() -> None:
        for _ in range(10_000):
            counts.add("a")
            counts.add("b", 3)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts.snapshot() == {"a": 40_000, "b": 120_000}
    assert counts.total() == 160_000 and counts["a"] == 40_000 and counts["zzz"] == 0


def test_labels_past_the_bound_go_to_other() -> None:
    counts = LabelledCounts(max_labels=3)
    for i in range(10):
        counts.add(f"l{i}", i)
    snap = counts.snapshot()
    assert snap == {"l0": 0, "l1": 1, "l2": 2, OVERFLOW: sum(range(3, 10))}


def err(reason: str, transient: bool = True) -> SourceError:
    return SourceError("x", transient=transient, reason=reason)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (err("deadline"), "timeout"),
        (err("pool-wait"), "timeout"),
        (err("busy"), "timeout"),
        (err("connect"), "connection"),
        (err("body"), "connection"),
        (err("http-503"), "http_5xx"),
        (err("http-500"), "http_5xx"),
        (err("http-429"), "http_4xx"),
        (err("http-403", False), "http_4xx"),
        (err("redirect", False), "http_3xx"),
        (SourceNotFound("gone"), "not_found"),
        (IdentityChanged("changed"), "validator_mismatch"),
        (err("short-body"), "short_body"),
        (err("short-read"), "short_body"),
        (err("long-body"), "protocol"),
        (err("bad-content-range"), "protocol"),
        (err("not-partial", False), "protocol"),
        (err("read"), "source_io"),
        (err("open"), "source_io"),
        (err("outside-source", False), "refused"),
        (err("too-large", False), "refused"),
        (err("unexpected", False), "other"),
        (err("never-heard-of", False), "other"),
        (err("http-9xx", False), "other"),
        (OSError(errno.ENOSPC, "full"), "cache_io"),
        (ValueError("x"), "other"),
    ],
)
def test_error_kinds(exc: BaseException, kind: str) -> None:
    assert error_kind(exc) == kind
    assert kind in ERROR_KINDS


def test_rule_label_names_the_rule_never_the_key_nor_a_secret() -> None:
    assert rule_label("https://u:secret@cdn.example:8443/b/{cookie}?token=t") == (
        "https://cdn.example:8443/b/{cookie}"
    )
    resolver = SourceResolver(
        [Rule("a/*", "file:///srv/a/{cookie}"), Rule("*", "http://h:80/{volume}/{cookie}")]
    )
    one = resolver.resolve(b"erofs,a", b"img1")
    two = resolver.resolve(b"erofs,a", b"img2")
    other = resolver.resolve(b"erofs,b", b"img3")
    assert getattr(one, "label", None) == getattr(two, "label", None) == "file:///srv/a/{cookie}"
    assert getattr(other, "label", None) == "http://h:80/{volume}/{cookie}"
