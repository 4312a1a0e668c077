"""The Prometheus endpoint: scraped over HTTP from a daemon running in-process, parsed with
prometheus-client's own parser, and checked against what the test sent and the fakes saw."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import dns.rcode
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from resolver.config import Config
from resolver.core.model import Endpoint
from resolver.daemon import metrics
from resolver.daemon import service as service_mod
from resolver.daemon.server import (
    HIT_SAMPLE_SECONDS,
    HITS_PER_SAMPLE,
    Acl,
    UdpListener,
    bind_udp,
)
from resolver.daemon.service import Service
from resolver.errors import ConfigError

from dnsmsg import parse, query, response
from fakeupstream import FakeUpstream, Request, Response
from loopback import addr_of, ask_udp, read_tcp_message, running

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
SCRAPE_TIMEOUT_SECONDS = 5.0


class BrokenNameUpstream(FakeUpstream):
    """Answers normally, except SERVFAIL for broken.test."""

    def handle(self, request: Request) -> Response:
        if request.message.question[0].name.to_text().lower() == "broken.test.":
            return self.make_reply(request.message, dns.rcode.SERVFAIL)
        return self.answer(request)


def metrics_url(svc: Service) -> str:
    assert svc.exporter is not None
    return f"http://{svc.exporter.endpoint}/metrics"


async def scrape_text(svc: Service) -> str:
    url = metrics_url(svc)

    def get() -> str:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
            return response.read().decode()

    return await trio.to_thread.run_sync(get)


async def scrape(svc: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} for every sample."""
    samples = {}
    for family in text_string_to_metric_families(await scrape_text(svc)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum over the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


async def ask_tcp(server: tuple[str, int], data: bytes) -> bytes:
    stream = await trio.open_tcp_stream(*server)
    async with stream:
        await stream.send_all(len(data).to_bytes(2, "big") + data)
        with trio.fail_after(5):
            return await read_tcp_message(stream)


async def test_scrape_counts_queries_responses_and_upstream_packets() -> None:
    with BrokenNameUpstream() as upstream:
        async with running([upstream], metrics=Endpoint("127.0.0.1", 0)) as svc:
            svc.udp[0].sample_interval = 0.0  # every hit sampled: exact types and rcodes
            server = addr_of(svc)

            async def ask(name: str, rdtype: str, qid: int) -> int:
                return parse(await ask_udp(server, query(name, rdtype, qid=qid))).rcode()

            for i in range(3):  # one miss, two hits
                assert await ask("example.test.", "A", i) == dns.rcode.NOERROR
            assert await ask("example.test.", "MX", 3) == dns.rcode.NOERROR
            for i in range(2):  # a miss, then a cached NXDOMAIN
                assert await ask("nx.test.", "A", 4 + i) == dns.rcode.NXDOMAIN
            for i in range(2):  # upstream SERVFAIL, then the remembered failure
                assert await ask("broken.test.", "TXT", 6 + i) == dns.rcode.SERVFAIL
            tcp_reply = parse(await ask_tcp(server, query("example.test.", "A", qid=8)))
            assert tcp_reply.rcode() == dns.rcode.NOERROR
            samples = await scrape(svc)

    assert value(samples, "resolver_queries_total", transport="udp", type="A") == 5
    assert value(samples, "resolver_queries_total", transport="udp", type="MX") == 1
    assert value(samples, "resolver_queries_total", transport="udp", type="TXT") == 2
    assert value(samples, "resolver_queries_total", transport="tcp", type="A") == 1
    assert value(samples, "resolver_cache_hits_total") == 4  # 2 A, 1 NXDOMAIN, 1 over TCP
    assert value(samples, "resolver_cache_misses_total") == 5
    responses = {(dict(ls)["source"], dict(ls)["rcode"]): v
                 for (n, ls), v in samples.items() if n == "resolver_responses_total"}
    assert responses == {
        ("cache", "NOERROR"): 3, ("cache", "NXDOMAIN"): 1,
        ("upstream", "NOERROR"): 2, ("upstream", "NXDOMAIN"): 1,
        ("synthesized", "SERVFAIL"): 2,
    }
    up = {"upstream": f"127.0.0.1:{upstream.port}", "role": "primary"}
    assert value(samples, "resolver_upstream_packets_sent_total", **up) == upstream.udp_count
    assert value(samples, "resolver_upstream_tries_total", outcome="servfail", **up) >= 1
    assert value(samples, "resolver_upstream_tries_total", outcome="ok", **up) == 2
    assert value(samples, "resolver_upstream_rtt_seconds_count", **up) == upstream.udp_count
    assert value(samples, "resolver_upstream_state", state="healthy", **up) == 1
    assert value(samples, "resolver_upstream_budget_configured_packets_per_second", **up) > 0
    assert value(samples, "resolver_pool_mode", mode="primary") == 1
    assert value(samples, "resolver_pool_mode", mode="repointed") == 0
    assert value(samples, "resolver_cache_entries") == 3
    assert value(samples, "resolver_response_duration_seconds_count", source="upstream") == 3
    assert value(samples, "resolver_response_duration_seconds_count",
                 source="synthesized") == 2
    assert total(samples, "resolver_response_duration_seconds_count") == 5  # not the 4 hits


async def test_every_metric_has_help_and_counters_end_in_total() -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], metrics=Endpoint("127.0.0.1", 0)) as svc:
            await ask_udp(addr_of(svc), query("example.test.", "A"))
            text = await scrape_text(svc)
    families = list(text_string_to_metric_families(text))
    ours = {f.name for f in families if f.name.startswith("resolver_")}
    assert ours == {f"resolver_{name}" for name in metrics.METRICS} - {
        "resolver_ena_allowance_exceeded", "resolver_ena_read_errors"}  # no ENA reader here
    for family in families:
        assert family.documentation, family.name
    declared_types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    for name, kind in declared_types.items():
        if name.startswith("resolver_"):
            assert (kind == "counter") == name.endswith("_total"), name


async def test_ena_counters_are_exported_once_read(tmp_path: Path) -> None:
    counters = tmp_path / "ethtool.txt"
    counters.write_text("NIC statistics:\n     linklocal_allowance_exceeded: 7\n"
                        "     pps_allowance_exceeded: 2\n     rx_packets: 99\n")
    with FakeUpstream() as upstream:
        async with running([upstream], metrics=Endpoint("127.0.0.1", 0),
                           ena_counters_file=str(counters)) as svc:
            for _ in range(100):  # bounded: the reader's first read is at start
                if svc.ena is not None and svc.ena.last:
                    break
                await trio.sleep(0.02)
            samples = await scrape(svc)
    name = "resolver_ena_allowance_exceeded_total"
    assert value(samples, name, counter="linklocal_allowance_exceeded") == 7
    assert value(samples, name, counter="pps_allowance_exceeded") == 2
    assert total(samples, name) == 9  # rx_packets is not an allowance counter


async def test_the_endpoint_stops_with_the_daemon() -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], metrics=Endpoint("127.0.0.1", 0)) as svc:
            url = metrics_url(svc)
            assert "resolver_pool_mode" in await scrape_text(svc)

    def get() -> None:
        urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_SECONDS)

    with pytest.raises(urllib.error.URLError):
        await trio.to_thread.run_sync(get)


async def test_a_busy_metrics_port_is_one_config_error() -> None:
    with socket.socket() as taken, FakeUpstream() as upstream:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = Config(listen=(Endpoint("127.0.0.1", 0),),
                        upstream=(Endpoint(*upstream.addr),),
                        metrics=Endpoint("127.0.0.1", port))
        with pytest.raises(ConfigError, match=r"cannot serve metrics on 127\.0\.0\.1:.*in use"):
            await service_mod.run(config, handle_signals=False)


def test_hit_types_are_sampled_per_64_hits_or_per_interval() -> None:
    sock = bind_udp("127.0.0.1", 0, 1 << 16)
    try:
        listener = UdpListener(sock, engine=None, dispatcher=None, acl=Acl(("127.0.0.0/8",)))
        a_reply = response(query("a.test.", "A"))
        mx_reply = response(query("a.test.", "MX"), rcode=dns.rcode.NXDOMAIN)
        listener.tally(1, a_reply, now=1.0)
        assert listener.hits == {(1, 0): 1}
        listener.tally(1, mx_reply, now=1.001)  # within the interval: waits for a sample
        assert listener.hits == {(1, 0): 1}
        listener.tally(2, mx_reply, now=1.0 + HIT_SAMPLE_SECONDS)
        assert listener.hits == {(1, 0): 1, (15, 3): 3}
        listener.slow += 1  # a miss handed on: not a hit
        listener.tally(1, a_reply, now=2.0)
        assert listener.hits == {(1, 0): 1, (15, 3): 3}
        listener.tally(HITS_PER_SAMPLE, a_reply, now=2.0)  # enough hits: sampled at once
        assert listener.hits == {(1, 0): 1 + HITS_PER_SAMPLE, (15, 3): 3}
        assert listener.received == 5 + HITS_PER_SAMPLE
    finally:
        sock.close()


def test_docs_list_every_metric() -> None:
    text = DOCS.read_text()
    missing = [metrics.full_name(name) for name in metrics.METRICS
               if f"`{metrics.full_name(name)}`" not in text]
    assert missing == []


def test_question_type_bounds_its_values() -> None:
    assert metrics.question_type(query("a.test.", "MX")) == 15
    assert metrics.question_type(query("a.test.", "HINFO")) == metrics.OTHER_TYPE
    assert metrics.question_type(b"\x00\x01") == metrics.INVALID_TYPE
    assert metrics.question_type(b"\x00" * 12 + b"\x05ab") == metrics.INVALID_TYPE
