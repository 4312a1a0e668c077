"""`resolver bench sidecar`: against a fake upstream and the real resolver, at low rates.

No wall-clock performance assertions: only that the figures are there and consistent, that
hits are hits and misses are misses by the resolver's own counters, and the loopback guard.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from resolver.bench import authority, sidecar
from resolver.cli import main

from conftest import ResolverProcess
from fakeupstream import FakeUpstream

METRICS_TEXT = """\
# HELP resolver_cache_hits_total Queries answered from a fresh entry.
# TYPE resolver_cache_hits_total counter
resolver_cache_hits_total 90.0
resolver_cache_misses_total 10.0
resolver_upstream_packets_sent_total{role="primary",upstream="127.0.0.1:53"} 7.0
resolver_upstream_packets_sent_total{role="fallback",upstream="127.0.0.2:53"} 4.0
resolver_queries_total{transport="udp",type="A"} 60.0
resolver_queries_total{transport="udp",type="MX"} 40.0
resolver_queries_total_other 1e9
"""


def test_parse_metrics_sums_labels_and_ignores_others() -> None:
    assert sidecar.parse_metrics(METRICS_TEXT) == {
        sidecar.METRIC_HITS: 90.0, sidecar.METRIC_MISSES: 10.0,
        sidecar.METRIC_UPSTREAM_PACKETS: 11.0, sidecar.METRIC_QUERIES: 100.0}


def test_server_side_figures() -> None:
    zero = dict.fromkeys(sidecar.METRICS_READ, 0.0)
    after = sidecar.parse_metrics(METRICS_TEXT)
    figures = sidecar.server_side(zero, after, None, None, client_queries=100)
    assert figures["hit_ratio"] == pytest.approx(0.9)
    assert figures["upstream_packets_per_1000_queries"] == pytest.approx(110.0)
    assert figures["resolver_queries"] == 100
    assert sidecar.server_side(None, None, 5, 25, client_queries=40)[
        "upstream_packets_per_1000_queries"] == pytest.approx(500.0)
    assert sidecar.server_side(None, None, None, None, 40)["source"] is None


def test_trace_hit_ratio_and_miss_names() -> None:
    assert sidecar.trace_hit_ratio([("a.", "A"), ("a.", "A"), ("b.", "A"), ("a.", "MX")]) == 0.25
    names = sidecar.miss_names(100, tag="x")
    assert len(set(names)) == 100 and all(n.endswith("." + authority.DEFAULT_ORIGIN)
                                          for n, _ in names)
    assert sidecar.miss_names(3) != sidecar.miss_names(3)  # a fresh tag per run


@pytest.mark.parametrize("target", ["10.0.0.1:53", "[2001:db8::1]:53"])
def test_non_loopback_target_is_refused(target: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "sidecar", "--target", target, "--rate", "10",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "--i-own-this-target" in result.output
    assert not list(tmp_path.iterdir())


def test_open_loop_against_a_fake_upstream(fake_upstream: Callable[..., FakeUpstream],
                                           tmp_path: Path) -> None:
    upstream = fake_upstream()
    result = CliRunner().invoke(main, [
        "bench", "sidecar", "--target", f"127.0.0.1:{upstream.port}", "--rate", "100",
        "--duration", "1", "--mix", "mail", "--domains", "50", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "open loop at 100 q/s" in result.output
    assert "not measured" in result.output  # no metrics, no counter: client figures only
    data = json.loads((tmp_path / "sidecar.json").read_text())
    client = data["client"]
    assert client["engine"] == "loadgen" and client["sent"] == 100
    assert client["answered"] + client["lost"] == client["sent"]
    assert client["latency_p50_ms"] is not None and client["latency_p99_ms"] is not None
    assert 0 <= data["trace_hit_ratio"] < 1
    assert len(upstream.queries) == client["sent"]  # no cache here: one packet per query


def _metrics_resolver(resolver_process: Callable[..., ResolverProcess],
                      upstream: FakeUpstream) -> tuple[ResolverProcess, str]:
    port = authority.free_port()
    process = resolver_process(upstream, extra_args=["--metrics", f"127.0.0.1:{port}"])
    return process, f"http://127.0.0.1:{port}/metrics"


@pytest.mark.parametrize(("mix", "hit_ratio", "packets_per_1000"), [("hits", 1.0, 0.0),
                                                                     ("misses", 0.0, 1000.0)])
def test_hits_and_misses_through_the_resolver(
        fake_upstream: Callable[..., FakeUpstream],
        resolver_process: Callable[..., ResolverProcess], tmp_path: Path,
        mix: str, hit_ratio: float, packets_per_1000: float) -> None:
    process, metrics_url = _metrics_resolver(resolver_process, fake_upstream())
    result = CliRunner().invoke(main, [
        "bench", "sidecar", "--target", process.server, "--rate", "50", "--duration", "1",
        "--mix", mix, "--domains", "5", "--metrics-url", metrics_url, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    server = json.loads((tmp_path / "sidecar.json").read_text())["server"]
    assert server["source"] == "metrics"
    assert server["cache_hits"] + server["cache_misses"] == 50
    assert server["hit_ratio"] == pytest.approx(hit_ratio)
    assert server["upstream_packets_per_1000_queries"] == pytest.approx(packets_per_1000)


def test_dnsperf_engine_when_installed(
        fake_upstream: Callable[..., FakeUpstream],
        resolver_process: Callable[..., ResolverProcess], tmp_path: Path) -> None:
    if sidecar.find_dnsperf() is None:
        pytest.skip("dnsperf is not installed")
    process, metrics_url = _metrics_resolver(resolver_process, fake_upstream())
    result = CliRunner().invoke(main, [
        "bench", "sidecar", "--target", process.server, "--duration", "1", "--mix", "hits",
        "--domains", "5", "--metrics-url", metrics_url, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "closed loop, max throughput" in result.output
    data = json.loads((tmp_path / "sidecar.json").read_text())
    assert data["client"]["engine"] == "dnsperf" and data["client"]["answered"] > 0
    assert data["server"]["hit_ratio"] == pytest.approx(1.0)
