"""Prometheus metrics: every metric the resolver exports is declared here (STYLE.md 12).

Nothing on the serving path touches prometheus_client. The engine, cache, pool and listeners
count in plain integers; `Collector.collect` reads them when Prometheus scrapes, in the HTTP
server's thread (reading an int or copying a dict is atomic under the GIL; the few dicts that
the trio thread may grow are copied before they are iterated).

What is counted where:
  - UDP cache hits (the hit path) add nothing per packet. The listener already counts packets
    between scheduler checkpoints; at each checkpoint and each time the socket runs dry it adds
    that count to `received`, and attributes the hits of the batch (received, less the
    misses and refusals it handed on) to the query type and rcode of the last reply it sent.
    So the type and rcode of UDP cache hits are exact at low load (a batch of one) and a
    sample-weighted estimate under load (one sample per batch of at most 64); totals are exact.
  - Everything else (misses, slow-path hits, errors, refusals, TCP) is counted exactly, per
    query, at a cost that is small next to what those queries already cost.
  - Client latency is timed from the slow path's entry to the reply leaving the engine, so
    cache hits from the hit path are counted (resolver_responses_total) but not timed.
  - Upstream RTTs and pool events come from two small hooks installed by `instrument`: a
    wrapper around the pool's `report` and one around the fetcher's `log_events`.
"""

from __future__ import annotations

import bisect
import errno
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import CollectorRegistry

from resolver.core import ena as ena_counters
from resolver.core.health import State
from resolver.core.model import Endpoint, Outcome, Reply
from resolver.core.pool import Mode, Override
from resolver.errors import ConfigError

if TYPE_CHECKING:
    from resolver.daemon.service import Service

log = logging.getLogger("resolver.metrics")

NAMESPACE = "resolver"
DEFAULT_PORT = 9153
# Client-facing latency of slow-path answers: a miss to a nearby resolver takes ~1 ms, one to
# a throttled resolver seconds; the buckets cover both ends.
LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                           1.0, 2.5, 5.0)
# Upstream RTT: the VPC resolver answers in well under a millisecond, a distant one in tens.
RTT_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# How long shutdown waits for the HTTP server's thread.
STOP_TIMEOUT_SECONDS = 2.0

SOURCES = ("cache", "upstream", "coalesced", "stale", "synthesized")
TRANSPORTS = ("udp", "tcp")
# Query types get their own label value when a mail host plausibly asks them; the rest are
# "other", which bounds the label's cardinality whatever clients send.
QUERY_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
               28: "AAAA", 33: "SRV", 35: "NAPTR", 43: "DS", 48: "DNSKEY", 52: "TLSA",
               64: "SVCB", 65: "HTTPS", 99: "SPF", 255: "ANY", 257: "CAA"}
INVALID_TYPE = -1  # a runt or a question that does not parse
OTHER_TYPE = -2  # any type not in QUERY_TYPES
RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN",
          "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE", "DSOTYPENI", "RCODE12", "RCODE13",
          "RCODE14", "RCODE15")
_RCODE_SERVFAIL = 2

# name (without namespace) -> (type, help, labels). Counters are named without `_total`
# here, as prometheus_client wants them; the exposition adds it.
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
_UPSTREAM = ("upstream", "role")
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "queries": (COUNTER, "Queries received, by transport and query type.",
                ("transport", "type")),
    "responses": (COUNTER, "Responses sent to clients, by where the answer came from and "
                  "rcode.", ("source", "rcode")),
    "response_duration_seconds": (HISTOGRAM, "Time from a query entering the slow path to "
                                  "its reply (hit-path cache hits are not timed).",
                                  ("source",)),
    "cache_entries": (GAUGE, "Answers held in the cache.", ()),
    "cache_bytes": (GAUGE, "Bytes the cache accounts for (wire bytes plus per-entry "
                    "overhead).", ()),
    "cache_hits": (COUNTER, "Queries answered from fresh cache entries.", ()),
    "cache_misses": (COUNTER, "Queries that found no fresh cache entry.", ()),
    "cache_evictions": (COUNTER, "Entries evicted to stay within the cache's limits.", ()),
    "cache_prefetches": (COUNTER, "Background refreshes of popular entries near expiry.", ()),
    "resolution_failures": (COUNTER, "Fetches that ended with no upstream answer (clients "
                            "got stale data or SERVFAIL).", ()),
    "inflight_queries": (GAUGE, "Distinct questions being resolved upstream now.", ()),
    "coalesced_queries": (COUNTER, "Misses that joined a fetch already in flight instead of "
                          "sending their own.", ()),
    "udp_send_errors": (COUNTER, "Replies the UDP socket refused to send.", ()),
    "tcp_connections": (GAUGE, "Open client TCP connections.", ()),
    "tcp_connections_evicted": (COUNTER, "Idle TCP connections closed to make room under the "
                                "connection cap.", ()),
    "upstream_packets_sent": (COUNTER, "Packets sent to the upstream (a TCP exchange counts "
                              "its segments).", _UPSTREAM),
    "upstream_tries": (COUNTER, "Tries sent to the upstream, by how each ended.",
                       (*_UPSTREAM, "outcome")),
    "upstream_rtt_seconds": (HISTOGRAM, "Round-trip time of upstream replies (timeouts "
                             "excluded).", _UPSTREAM),
    "upstream_budget_configured_packets_per_second": (GAUGE, "Configured packet budget "
                                                      "(+Inf: unlimited).", _UPSTREAM),
    "upstream_budget_rate_packets_per_second": (GAUGE, "Packet rate in force: the configured "
                                                "budget, or the rate learned while throttled "
                                                "(+Inf: unlimited).", _UPSTREAM),
    "upstream_tokens_granted": (COUNTER, "Budget tokens granted (one per packet).", _UPSTREAM),
    "upstream_tokens_denied": (COUNTER, "Budget requests refused for want of tokens.",
                               _UPSTREAM),
    "upstream_state": (GAUGE, "1 for the upstream's current health state, 0 for the others.",
                       (*_UPSTREAM, "state")),
    "upstream_transitions": (COUNTER, "Health state changes, by the state entered.",
                             (*_UPSTREAM, "state")),
    "pool_mode": (GAUGE, "1 for the pool's current mode, 0 for the other.", ("mode",)),
    "pool_override": (GAUGE, "1 for the operator override in force, 0 for the others.",
                      ("override",)),
    "pool_repoints": (COUNTER, "Pool mode changes, by the mode entered.", ("mode",)),
    "pool_waiting_for_tokens": (GAUGE, "Client misses queued for an upstream token now.", ()),
    "ena_allowance_exceeded": (COUNTER, "ENA driver counters (ethtool -S) as last read: "
                               "packets dropped or shaped for exceeding an allowance.",
                               ("counter",)),
    "ena_read_errors": (COUNTER, "Failed reads of the ENA counters.", ()),
}


def full_name(name: str) -> str:
    """The name Prometheus sees (counters get `_total` in the exposition)."""
    return f"{NAMESPACE}_{name}" + ("_total" if METRICS[name][0] == COUNTER else "")


# -- plain counters ---------------------------------------------------------------------------
class Histogram:
    """Fixed buckets in a list of ints: observe() is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        counts = list(self.counts)
        cumulative = 0
        out = []
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), counts, strict=True):
            cumulative += count
            out.append((bound, cumulative))
        return out


class Counts:
    """The slow path's counters, kept by the service (the listeners keep the hit path's)."""

    def __init__(self) -> None:
        self.queries: dict[tuple[str, int], int] = {}  # (transport, qtype)
        self.responses: dict[tuple[str, int], int] = {}  # (source, rcode)
        self.latency = {source: Histogram(LATENCY_BUCKETS_SECONDS) for source in SOURCES}
        self.rtt: dict[Endpoint, Histogram] = {}
        self.repoints: dict[str, int] = {}
        self.transitions: dict[tuple[str, str], int] = {}  # (upstream, state)

    def query(self, transport: str, data: bytes) -> None:
        key = (transport, question_type(data))
        self.queries[key] = self.queries.get(key, 0) + 1

    def response(self, source: str, data: bytes, started: float | None) -> None:
        rcode = data[3] & 0x0F if len(data) > 3 else _RCODE_SERVFAIL
        key = (source, rcode)
        self.responses[key] = self.responses.get(key, 0) + 1
        if started is not None:
            self.latency[source].observe(time.perf_counter() - started)


def question_type(data: bytes, offset: int = 12) -> int:
    """QTYPE of the (uncompressed) question at offset if in QUERY_TYPES, else OTHER_TYPE or
    INVALID_TYPE: counters keyed by it stay small whatever clients send."""
    try:
        i = offset
        n = data[i]
        while n:
            if n > 63:
                return INVALID_TYPE
            i += n + 1
            n = data[i]
        if i + 3 > len(data):
            return INVALID_TYPE
        qtype = data[i + 1] << 8 | data[i + 2]
        return qtype if qtype in QUERY_TYPES else OTHER_TYPE
    except IndexError:
        return INVALID_TYPE


def add_hits(hits: dict[tuple[int, int], int], reply: bytes, count: int) -> None:
    """Attribute `count` cache hits to the query type and rcode of `reply`, one of our own
    replies. A sample, so the name's end is found with one C-level search for its root label
    (a label holding a zero byte would misread the type; no client of a mail host sends one)."""
    end = reply.find(0, 12)
    if 12 <= end <= len(reply) - 3:
        qtype = reply[end + 1] << 8 | reply[end + 2]
        key = (qtype if qtype in QUERY_TYPES else OTHER_TYPE, reply[3] & 0x0F)
        hits[key] = hits.get(key, 0) + count


# -- hooks on the slow path -------------------------------------------------------------------
def instrument(service: Service) -> None:
    """Count what the engine hands the fetcher back, upstream RTTs and pool events.

    The fetcher calls these through the engine and pool instances, so wrapping the instances'
    methods here keeps resolver/core and the fetcher free of metrics code.
    """
    engine, pool, fetcher, counts = service.engine, service.engine.pool, service.fetcher, \
        service.counts
    on_answer, on_failure = engine.on_answer, engine.on_failure
    on_stale_timeout, report, log_events = engine.on_stale_timeout, pool.report, \
        fetcher.log_events
    for upstream in pool.upstreams:
        counts.rtt[upstream.endpoint] = Histogram(RTT_BUCKETS_SECONDS)

    def record(replies: list[Reply], first: str, rest: str) -> list[Reply]:
        for i, reply in enumerate(replies):
            started = reply.client[2] if len(reply.client) > 2 else None
            counts.response(first if i == 0 else rest, reply.data, started)
        return replies

    def answered(*args: Any, **kwargs: Any) -> list[Reply]:
        # The first waiter asked upstream; the others joined its fetch.
        return record(on_answer(*args, **kwargs), "upstream", "coalesced")

    def failed(*args: Any, **kwargs: Any) -> list[Reply]:
        # Stale data when the cache had it; otherwise a SERVFAIL we made up.
        replies = on_failure(*args, **kwargs)
        for reply in replies:
            started = reply.client[2] if len(reply.client) > 2 else None
            source = "synthesized" if reply.data[3] & 0x0F == _RCODE_SERVFAIL else "stale"
            counts.response(source, reply.data, started)
        return replies

    def stale(*args: Any, **kwargs: Any) -> list[Reply]:
        return record(on_stale_timeout(*args, **kwargs), "stale", "stale")

    def reported(upstream: Any, outcome: Outcome, rtt: float, *args: Any, **kwargs: Any) -> None:
        if outcome is not Outcome.TIMEOUT:
            histogram = counts.rtt.get(upstream.endpoint)
            if histogram is not None:
                histogram.observe(rtt)
        report(upstream, outcome, rtt, *args, **kwargs)

    def logged() -> None:
        for event in pool.pending_events:
            if event.subject == "pool":
                counts.repoints[event.new] = counts.repoints.get(event.new, 0) + 1
            elif event.new in _STATE_NAMES:
                key = (event.subject, event.new)
                counts.transitions[key] = counts.transitions.get(key, 0) + 1
        log_events()

    engine.on_answer = answered  # type: ignore[method-assign]
    engine.on_failure = failed  # type: ignore[method-assign]
    engine.on_stale_timeout = stale  # type: ignore[method-assign]
    pool.report = reported  # type: ignore[method-assign]
    fetcher.log_events = logged  # type: ignore[method-assign]


_STATE_NAMES = frozenset(state.value for state in State)


# -- export -----------------------------------------------------------------------------------
class Collector:
    """Reads the plain counters on scrape and builds the metric families."""

    def __init__(self) -> None:
        self.service: Service | None = None

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families are built on each scrape

    def collect(self) -> Iterator[Metric]:
        service = self.service
        if service is None:
            return
        families = {name: _family(name) for name in METRICS}
        _collect_traffic(service, families)
        _collect_cache(service, families)
        _collect_upstreams(service, families)
        # A family with no samples (no ENA reader configured) is left out, help and all.
        yield from (family for family in families.values() if family.samples)


def _family(name: str) -> Metric:
    kind, text, labels = METRICS[name]
    cls = {COUNTER: CounterMetricFamily, GAUGE: GaugeMetricFamily,
           HISTOGRAM: HistogramMetricFamily}[kind]
    return cls(f"{NAMESPACE}_{name}", text, labels=list(labels))


def _type_label(qtype: int) -> str:
    return "invalid" if qtype == INVALID_TYPE else QUERY_TYPES.get(qtype, "other")


def _collect_traffic(service: Service, f: dict[str, Any]) -> None:
    counts = service.counts
    queries: dict[tuple[str, str], int] = {}
    responses: dict[tuple[str, str], int] = {}

    def add(table: dict[tuple[str, str], int], key: tuple[str, str], value: int) -> None:
        table[key] = table.get(key, 0) + value

    for (transport, qtype), n in dict(counts.queries).items():
        add(queries, (transport, _type_label(qtype)), n)
    for (source, rcode), n in dict(counts.responses).items():
        # A synthesized reply with header rcode 0 is BADVERS (extended rcode 16 in its OPT).
        label = "BADVERS" if source == "synthesized" and rcode == 0 else RCODES[rcode]
        add(responses, (source, label), n)
    listeners = [("udp", u) for u in service.udp] + [("tcp", t) for t in service.tcp]
    send_errors = 0
    for transport, listener in listeners:
        for (qtype, rcode), n in dict(listener.hits).items():
            add(queries, (transport, _type_label(qtype)), n)
            add(responses, ("cache", RCODES[rcode]), n)
        for qtype, n in dict(listener.refused).items():
            add(queries, (transport, _type_label(qtype)), n)
            add(responses, ("synthesized", "REFUSED"), n)
        send_errors += getattr(listener, "send_errors", 0)
    for (transport, type_label), n in sorted(queries.items()):
        f["queries"].add_metric([transport, type_label], n)
    for (source, rcode_label), n in sorted(responses.items()):
        f["responses"].add_metric([source, rcode_label], n)
    for source, histogram in counts.latency.items():
        f["response_duration_seconds"].add_metric([source], histogram.buckets(), histogram.sum)
    f["udp_send_errors"].add_metric([], send_errors)
    f["tcp_connections"].add_metric([], sum(len(t.connections) for t in service.tcp))
    f["tcp_connections_evicted"].add_metric([], sum(t.closed_for_cap for t in service.tcp))


def _collect_cache(service: Service, f: dict[str, Any]) -> None:
    engine = service.engine
    cache = engine.cache
    f["cache_entries"].add_metric([], len(cache.entries))
    f["cache_bytes"].add_metric([], cache.bytes)
    f["cache_hits"].add_metric([], engine.hits)
    f["cache_misses"].add_metric([], engine.misses)
    f["cache_evictions"].add_metric([], cache.evictions)
    f["cache_prefetches"].add_metric([], engine.prefetches)
    f["resolution_failures"].add_metric([], engine.failures)
    f["inflight_queries"].add_metric([], len(engine.inflight))
    f["coalesced_queries"].add_metric([], engine.inflight.coalesced)


def _collect_upstreams(service: Service, f: dict[str, Any]) -> None:
    pool = service.engine.pool
    counts = service.counts
    # Upstreams of forwarded zones carry role "zone:NAME": the same address may serve both.
    every = [(u, f"zone:{p.zone}" if p.zone else u.role.value)
             for p in service.engine.pools for u in p.upstreams]
    for upstream, role in every:
        labels = [str(upstream.endpoint), role]
        stats, bucket = upstream.stats, upstream.bucket
        f["upstream_packets_sent"].add_metric(labels, stats.sent)
        for outcome, n in sorted(dict(stats.outcomes).items(), key=lambda kv: kv[0].value):
            f["upstream_tries"].add_metric([*labels, outcome.value], n)
        histogram = counts.rtt.get(upstream.endpoint)
        if histogram is not None:
            f["upstream_rtt_seconds"].add_metric(labels, histogram.buckets(), histogram.sum)
        configured = bucket.configured_rate
        rate = bucket.rate
        f["upstream_budget_configured_packets_per_second"].add_metric(
            labels, math.inf if configured is None else configured)
        f["upstream_budget_rate_packets_per_second"].add_metric(
            labels, math.inf if rate is None else rate)
        f["upstream_tokens_granted"].add_metric(labels, bucket.granted)
        f["upstream_tokens_denied"].add_metric(labels, bucket.denied)
        state = upstream.state
        for candidate in State:
            f["upstream_state"].add_metric([*labels, candidate.value],
                                           1 if candidate is state else 0)
        for candidate in State:
            n = counts.transitions.get((str(upstream.endpoint), candidate.value), 0)
            f["upstream_transitions"].add_metric([*labels, candidate.value], n)
    for mode in Mode:
        f["pool_mode"].add_metric([mode.value], 1 if pool.mode is mode else 0)
        f["pool_repoints"].add_metric([mode.value], counts.repoints.get(mode.value, 0))
    for override in Override:
        f["pool_override"].add_metric([override.value], 1 if pool.override is override else 0)
    f["pool_waiting_for_tokens"].add_metric([], pool.waiting_for_tokens)
    ena = service.ena
    if ena is not None:
        for name, value in sorted(dict(ena.last).items()):
            if name in ena_counters.COUNTERS:
                f["ena_allowance_exceeded"].add_metric([name], value)
        f["ena_read_errors"].add_metric([], ena.errors)


# -- the HTTP endpoint ------------------------------------------------------------------------
class Exporter:
    """prometheus_client's HTTP server in its own thread, on a registry of our own."""

    def __init__(self, endpoint: Endpoint,
                 start: Callable[..., tuple[Any, threading.Thread]] = start_http_server) -> None:
        self.collector = Collector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        try:
            self.server, self.thread = start(endpoint.port, addr=endpoint.host,
                                             registry=self.registry)
        except OSError as e:
            hint = (f" (`ss -ltnp 'sport = :{endpoint.port}'` shows who has it); pick another "
                    "--metrics" if e.errno == errno.EADDRINUSE else "")
            raise ConfigError(f"cannot serve metrics on {endpoint}: "
                              f"{e.strerror or e}{hint}") from None
        self.endpoint = Endpoint(endpoint.host, self.server.server_address[1])

    def attach(self, service: Service) -> None:
        self.collector.service = service

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(STOP_TIMEOUT_SECONDS)
