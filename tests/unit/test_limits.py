"""The open-file limit check (daemon/limits.py)."""

from __future__ import annotations

import pytest

from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.daemon.limits import MIN_BLOBS, NofileTooLow, budget, check


def conf(text: str):  # type: ignore[no-untyped-def]
    return parse_config("dir /var/cache/fscache\n" + text)


def test_http_blobs_cost_one_fd_file_blobs_two() -> None:
    http = conf("ondemand\nsource * http://a/{cookie}\nsource b/* http://b:8080/{cookie}\n")
    b = budget(http, 10_000)
    assert b.per_blob == 1 and b.fixed == 64 + 8 * 2
    files = conf("ondemand\nsource * file:///srv/{cookie}\n")
    assert budget(files, 10_000).per_blob == 2


def test_a_limit_too_low_for_on_demand_is_refused_with_the_numbers() -> None:
    cfg = conf("ondemand\nsource * http://a/{cookie}\n")
    low = budget(cfg, 0).fixed + MIN_BLOBS - 1
    with pytest.raises(NofileTooLow, match=f"limit is {low}.*room for {MIN_BLOBS - 1} blobs"):
        check(cfg, low)
    assert check(cfg, low + 1).blobs == MIN_BLOBS


def test_classic_mode_needs_only_the_fixed_part() -> None:
    assert check(conf(""), 100).blobs >= 0
    with pytest.raises(NofileTooLow):
        check(conf(""), 32)
