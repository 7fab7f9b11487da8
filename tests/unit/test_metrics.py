"""The Prometheus collector over the daemon's own figures (``daemon/metrics.py``),
read back with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cachefilesd_py.daemon.metrics import Figures, Metrics
from cachefilesd_py.engine.latency import LatencyHistogram


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_counters_gauges_histograms_round_trip() -> None:
    hist = LatencyHistogram()
    for seconds in (0.0005, 0.0005, 0.003, 2.5, 5000.0):
        hist.record(seconds)
    figures = Figures(
        counters=lambda: {"reads": 7, "reads_failed": 1, "bytes_fetched": 1 << 40, "flag": True},
        histograms={"read_service": (hist, "READ service")},
        gauges=lambda: {"open_blobs": (3.0, "open")},
        labelled=lambda: {
            "control_requests_total": ("outcome", "by outcome", {"ok": 2, "busy": 1})
        },
    )
    got = samples(Metrics(figures).text())
    assert got[("cachefilesd_reads_total", ())] == 7
    assert got[("cachefilesd_reads_failed_total", ())] == 1
    assert got[("cachefilesd_fetched_bytes_total", ())] == 1 << 40
    assert got[("cachefilesd_open_blobs", ())] == 3
    assert got[("cachefilesd_control_requests_total", (("outcome", "busy"),))] == 1
    assert got[("cachefilesd_read_service_seconds_count", ())] == 5
    assert abs(got[("cachefilesd_read_service_seconds_sum", ())] - 5002.504) < 1e-9
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in got.items()
        if k[0] == "cachefilesd_read_service_seconds_bucket"
    )
    counts = [v for _le, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert buckets[-1] == (float("inf"), 5)

    def at(le: float) -> float:
        return max(v for b, v in buckets if b <= le)

    assert at(0.001) == 2 and at(0.01) == 3 and at(10) == 4  # 5000 s is past the last bound
    # no bool counter sneaks in
    assert not any(k[0].startswith("cachefilesd_flag") for k in got)


def test_empty_histogram() -> None:
    got = samples(
        Metrics(Figures(counters=dict, histograms={"x": (LatencyHistogram(), "x")})).text()
    )
    assert got[("cachefilesd_x_seconds_count", ())] == 0
