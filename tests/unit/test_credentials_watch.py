"""The credentials watch (``engine/credentials.py``) and the swappable headers holder
(``config/load.py`` Credentials): one report per transition, only 401/403 count, a
reload that fails changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachefilesd_py.config.load import Credentials
from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.engine.credentials import CredentialsWatch, rejected_status
from cachefilesd_py.engine.offline import OfflineGate
from cachefilesd_py.errors import ConfigError, SourceError, SourceNotFound


def http(status: int) -> SourceError:
    return SourceError(f"HTTP {status}", transient=False, reason=f"http-{status}")


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (http(401), 401),
        (http(403), 403),
        (http(400), None),
        (SourceError("HTTP 503", transient=True, reason="http-503"), None),
        (SourceNotFound("HTTP 404"), None),
        (OSError("reset"), None),
    ],
)
def test_only_401_and_403_mean_rejected(exc: BaseException, want: int | None) -> None:
    assert rejected_status(exc) == want


def test_one_report_per_transition() -> None:
    seen: list[tuple[str, int | None]] = []
    watch = CredentialsWatch(lambda o, s: seen.append((o, s)))
    a, b = "http://a:80", "http://b:80"
    watch.outcome(a, None)  # ok while ok: nothing to say
    for _ in range(5):
        watch.outcome(a, http(401))
    watch.outcome(a, http(403))  # still rejected: no new transition
    watch.outcome(a, http(503))  # says nothing about credentials
    assert seen == [(a, 401)] and watch.describe(a) == "rejected (HTTP 401)"
    watch.outcome(b, http(403))
    watch.outcome(a, None)
    watch.outcome(a, None)
    assert seen == [(a, 401), (b, 403), (a, None)]
    assert watch.describe(a) == "ok" and watch.origins() == [a, b]
    assert watch.clear() == [b] and watch.describe(b) == "ok"
    assert seen[-1] == (a, None)  # clearing reports nothing: the next fetch decides
    watch.outcome(b, http(403))
    assert seen[-1] == (b, 403)


def test_the_gate_reports_every_fetch_outcome() -> None:
    gate = OfflineGate()
    with pytest.raises(SourceError):
        gate.fetch("http://a:80", lambda: (_ for _ in ()).throw(http(401)))
    assert gate.credentials.status("http://a:80") == 401
    gate.fetch("http://a:80", lambda: None)
    assert gate.credentials.status("http://a:80") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="source_headers files are root's")
def test_a_reload_swaps_whole_or_not_at_all(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for f, text in ((one, "Authorization: Bearer a\n"), (two, "X-Key: k\n")):
        f.write_text(text)
        f.chmod(0o600)
    cfg = parse_config(
        f"dir {tmp_path}\nondemand\nsource reg/* http://r/{{cookie}}\n"
        f"source_headers reg/* {one}\nsource_headers http://other/* {two}\n",
        "c.conf",
    )
    creds = Credentials(cfg)
    assert creds("http://r/x") == {"Authorization": "Bearer a"}
    assert creds("http://other/y") == {"X-Key": "k"} and creds("http://else/z") == {}
    one.write_text("Authorization: Bearer b\n")
    two.write_text("X-Key k\n")  # not a header line
    with pytest.raises(ConfigError, match=rf"{two}:1"):
        creds.reload(cfg)
    assert creds("http://r/x") == {"Authorization": "Bearer a"}  # nothing changed
    two.write_text("X-Key: k2\n")
    reloaded = creds.reload(cfg)
    assert [r["pattern"] for r in reloaded] == ["reg/*", "http://other/*"]
    assert creds("http://r/x") == {"Authorization": "Bearer b"}
    assert creds("http://other/y") == {"X-Key": "k2"}
