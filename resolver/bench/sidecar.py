"""`resolver bench sidecar`: the resolver's own throughput and latency, on hits, misses or mail.

Two engines:

- **dnsperf** (when installed and no ``--rate`` is given): closed loop, 100 queries
  outstanding, so its QPS is the most the resolver answers; its latency is the latency of a
  saturated server, not of one under a given load. dnsperf reports only the mean latency.
- **loadgen** (the built-in trio generator, ``loadgen.run_load``): open loop at ``--rate``
  queries/s, so p50/p99 are the latency a client sees at that offered load. Used when
  ``--rate`` is given or dnsperf is absent (then at ``DEFAULT_RATE_QPS``).

Mixes:

- ``hits``: ``HIT_SET_SIZE`` names of ``authority.query_names`` asked once untimed (warm-up),
  then replayed: every timed query is a cache hit while the TTLs (300 s and more) last.
- ``misses``: fresh names ``m<tag>-<i>.<origin> A`` (NXDOMAIN from the zone), each asked
  once: every query is a miss, one upstream round trip.
- ``mail``: the mail workload (``workload.queries``) at ``--domains`` domains.

Hit ratio and upstream packets: the client cannot see them. With ``--metrics-url`` the
resolver's Prometheus endpoint is read before and after the timed run and the deltas of
``resolver_cache_hits_total``, ``resolver_cache_misses_total``,
``resolver_upstream_packets_sent_total`` give the measured hit ratio and upstream packets per
1000 queries the client sent (``resolver_queries_total`` is recorded too, for information: it
can lag by the last batch of earlier traffic). With ``--upstream-counter-command`` a
command that prints a packet count (an nftables counter, say) is read the same way. Without
either, only client-side figures are reported, plus for the mail mix the *trace* hit ratio: the
share of timed queries whose ``(name, type)`` occurred earlier in the trace, which is what an
ideal cache would hit while no TTL expires (runs shorter than the shortest TTL, 300 s).

Loopback targets only, unless the caller says it owns the target.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from resolver.bench import authority, loadgen, workload

MIXES = ("mail", "hits", "misses")
DEFAULT_RATE_QPS = 1000.0  # the loadgen rate when dnsperf is absent and no --rate is given
HIT_SET_SIZE = 2000  # distinct names of the hit mix: all fit any sane cache
WARMUP_RATE_QPS = 2000.0  # the hit set's untimed warm-up rate
WARMUP_PADDING_S = 0.5  # warm-up sending time past the last name of the set
# The resolver adds its UDP hit counts per batch of datagrams (docs/metrics.md): wait this long
# after earlier traffic before reading its counters, so they hold all of it.
SETTLE_S = 0.5
QUERY_TIMEOUT_S = 2.0
DNSPERF_OUTSTANDING = 100
DNSPERF_MISS_NAMES = 300_000  # fresh names written for a dnsperf miss run (each sent once)
DNSPERF_GRACE_S = 30.0  # dnsperf's own timeout on top of the run time
METRICS_TIMEOUT_S = 5.0
COUNTER_COMMAND_TIMEOUT_S = 10.0
# The counters read from the resolver's endpoint (docs/metrics.md); samples of one name are
# summed over their labels.
METRIC_HITS = "resolver_cache_hits_total"
METRIC_MISSES = "resolver_cache_misses_total"
METRIC_UPSTREAM_PACKETS = "resolver_upstream_packets_sent_total"
METRIC_QUERIES = "resolver_queries_total"
METRICS_READ = (METRIC_HITS, METRIC_MISSES, METRIC_UPSTREAM_PACKETS, METRIC_QUERIES)


@dataclass(frozen=True)
class SidecarConfig:
    mix: str = "mail"
    rate_qps: float | None = None
    """Open-loop rate; None: dnsperf at full speed when installed, else ``DEFAULT_RATE_QPS``."""
    duration_s: float = 10.0
    n_domains: int = workload.MailMix.n_domains
    """Domains of the mail mix; match the zone behind the resolver."""
    seed: int = 1

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ValueError(f"--mix must be one of {', '.join(MIXES)}, not {self.mix!r}")
        if self.rate_qps is not None and self.rate_qps <= 0:
            raise ValueError("--rate must be positive")
        if self.duration_s <= 0:
            raise ValueError("--duration must be positive")

    def engine(self, dnsperf_path: str | None) -> str:
        return "dnsperf" if self.rate_qps is None and dnsperf_path else "loadgen"


# --- the queries --------------------------------------------------------------------------


def hit_set(n_domains: int) -> list[tuple[str, str]]:
    names = authority.query_names(n_domains=n_domains)
    return [pair for pair in names if not pair[0].startswith(("big.", "nx1."))][:HIT_SET_SIZE]


def miss_names(count: int, tag: str | None = None) -> list[tuple[str, str]]:
    """``count`` names no one asked before (a random tag per run), NXDOMAIN in the zone."""
    tag = tag or secrets.token_hex(4)
    return [(f"m{tag}-{i}.{authority.DEFAULT_ORIGIN}", "A") for i in range(count)]


def trace_hit_ratio(queries: Sequence[tuple[str, str]]) -> float | None:
    """Share of queries whose key occurred before in the trace: an ideal cache's hit ratio
    while no TTL expires."""
    if not queries:
        return None
    return 1.0 - len(set(queries)) / len(queries)


# --- the resolver's counters ------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str, names: Sequence[str] = METRICS_READ) -> dict[str, float]:
    """Prometheus text format: each wanted name's samples summed over their labels."""
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in totals:
            totals[match.group(1)] += float(match.group(3))
    return totals


def scrape_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
        return parse_metrics(response.read().decode("utf-8", "replace"))


def read_counter_command(command: str) -> int:
    """The last integer the command prints: a packet count."""
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, check=True,
                          timeout=COUNTER_COMMAND_TIMEOUT_S)
    numbers = re.findall(r"\d+", done.stdout)
    if not numbers:
        raise ValueError(f"--upstream-counter-command printed no number: {done.stdout!r}")
    return int(numbers[-1])


def server_side(before: dict[str, float] | None, after: dict[str, float] | None,
                packets_before: int | None, packets_after: int | None,
                client_queries: int) -> dict[str, Any]:
    """Hit ratio and upstream packets per 1000 client queries, from whatever source we have."""
    figures: dict[str, Any] = {"hit_ratio": None, "upstream_packets": None,
                               "upstream_packets_per_1000_queries": None, "source": None}
    # Per 1000 queries the client sent: the resolver's resolver_queries_total can lag by the
    # last batch of earlier traffic (recorded as resolver_queries, for information).
    queries = client_queries
    if before is not None and after is not None:
        delta = {name: after[name] - before[name] for name in METRICS_READ}
        looked_up = delta[METRIC_HITS] + delta[METRIC_MISSES]
        figures.update(source="metrics", resolver_queries=int(delta[METRIC_QUERIES]),
                       cache_hits=int(delta[METRIC_HITS]), cache_misses=int(delta[METRIC_MISSES]),
                       upstream_packets=int(delta[METRIC_UPSTREAM_PACKETS]))
        figures["hit_ratio"] = delta[METRIC_HITS] / looked_up if looked_up else None
    if packets_before is not None and packets_after is not None:
        figures.update(source="counter command", upstream_packets=packets_after - packets_before)
    if figures["upstream_packets"] is not None and queries:
        per_1000 = 1000.0 * figures["upstream_packets"] / queries
        figures["upstream_packets_per_1000_queries"] = per_1000
    return figures


# --- the engines --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientFigures:
    engine: str
    sent: int
    answered: int
    lost: int
    qps: float  # answered per second of the run
    latency_avg_ms: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    rcodes: dict[str, int]
    target_rate_qps: float | None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def client_from_loadgen(result: loadgen.LoadResult) -> ClientFigures:
    return ClientFigures(
        engine="loadgen", sent=result.sent, answered=result.answered, lost=result.timeouts,
        qps=result.answered / max(result.duration_s, 1e-9), latency_avg_ms=None,
        latency_p50_ms=_ms(result.latency_p50_s), latency_p99_ms=_ms(result.latency_p99_s),
        rcodes=result.rcodes, target_rate_qps=result.target_rate_qps)


def parse_dnsperf(output: str) -> ClientFigures:
    def number(label: str) -> str:
        match = re.search(rf"{label}:\s+([0-9.]+)", output)
        if match is None:
            raise RuntimeError(f"dnsperf output lacks {label!r}:\n{output}")
        return match.group(1)

    rcodes: dict[str, int] = {}
    line = re.search(r"Response codes:\s+(.*)", output)
    if line:
        rcodes = {code: int(count) for code, count in re.findall(r"([A-Z]+) (\d+)", line.group(1))}
    return ClientFigures(
        engine="dnsperf", sent=int(number("Queries sent")),
        answered=int(number("Queries completed")), lost=int(number("Queries lost")),
        qps=float(number("Queries per second")),
        latency_avg_ms=float(number(r"Average Latency \(s\)")) * 1000.0,
        latency_p50_ms=None, latency_p99_ms=None, rcodes=rcodes, target_rate_qps=None)


def run_dnsperf(dnsperf_path: str, target: tuple[str, int], queries: Sequence[tuple[str, str]],
                duration_s: float, once: bool) -> ClientFigures:
    with tempfile.TemporaryDirectory(prefix="sidecar-") as directory:
        query_file = Path(directory) / "queries.txt"
        workload.write_dnsperf_file(query_file, queries)
        argv = [dnsperf_path, "-s", target[0], "-p", str(target[1]), "-d", str(query_file),
                "-l", f"{duration_s:g}", "-q", str(DNSPERF_OUTSTANDING), "-c", "1",
                "-t", f"{QUERY_TIMEOUT_S:g}"]
        if once:
            argv += ["-n", "1"]  # fresh names must never repeat
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=duration_s + DNSPERF_GRACE_S)
    if done.returncode != 0:
        raise RuntimeError(f"dnsperf failed ({done.returncode}): {done.stdout}{done.stderr}")
    return parse_dnsperf(done.stdout)


def build_queries(config: SidecarConfig, engine: str) -> list[tuple[str, str]]:
    """The timed queries (cycled by loadgen, looped by dnsperf except for misses)."""
    rate = config.rate_qps or DEFAULT_RATE_QPS
    count = max(1, min(loadgen.scheduled_count(rate, config.duration_s), loadgen.CLI_MAX_QUERIES))
    if config.mix == "hits":
        return hit_set(config.n_domains)
    if config.mix == "misses":
        return miss_names(DNSPERF_MISS_NAMES if engine == "dnsperf" else count)
    mix = workload.MailMix(n_domains=config.n_domains)
    return workload.queries(mix, config.seed, loadgen.CLI_MAX_QUERIES if engine == "dnsperf"
                            else count)


async def _warm_up(target: tuple[str, int], queries: Sequence[tuple[str, str]],
                   allow_non_loopback: bool) -> None:
    # The generator stops sending at its deadline even when it fell behind; the padding
    # (spent repeating the first names) keeps a stalled sender from skipping any name.
    duration_s = len(queries) / WARMUP_RATE_QPS + WARMUP_PADDING_S
    await loadgen.run_load(target, queries, WARMUP_RATE_QPS, duration_s,
                           timeout_s=QUERY_TIMEOUT_S, allow_non_loopback=allow_non_loopback)


def run(config: SidecarConfig, target: tuple[str, int], *, allow_non_loopback: bool = False,
        metrics_url: str | None = None, counter_command: str | None = None,
        dnsperf_path: str | None = None) -> dict[str, Any]:
    """One sidecar run: warm-up (hits only), counters before, the timed run, counters after."""
    engine = config.engine(dnsperf_path)
    queries = build_queries(config, engine)
    if config.mix == "hits":
        trio.run(_warm_up, target, queries, allow_non_loopback)
    if metrics_url:
        time.sleep(SETTLE_S)
    before = scrape_metrics(metrics_url) if metrics_url else None
    packets_before = read_counter_command(counter_command) if counter_command else None
    if engine == "dnsperf":
        assert dnsperf_path is not None
        client = run_dnsperf(dnsperf_path, target, queries, config.duration_s,
                             once=config.mix == "misses")
    else:
        result = trio.run(functools.partial(
            loadgen.run_load, target, queries, config.rate_qps or DEFAULT_RATE_QPS,
            config.duration_s, timeout_s=QUERY_TIMEOUT_S, allow_non_loopback=allow_non_loopback,
            seed=config.seed))
        client = client_from_loadgen(result)
    if metrics_url:
        time.sleep(SETTLE_S)
    after = scrape_metrics(metrics_url) if metrics_url else None
    packets_after = read_counter_command(counter_command) if counter_command else None
    report: dict[str, Any] = {
        "mix": config.mix, "duration_s": config.duration_s, "n_domains": config.n_domains,
        "client": dataclasses.asdict(client),
        "server": server_side(before, after, packets_before, packets_after, client.sent),
    }
    if config.mix == "mail" and engine == "loadgen":
        report["trace_hit_ratio"] = trace_hit_ratio(queries[:client.sent])
    return report


def format_report(report: dict[str, Any]) -> list[str]:
    client, server = report["client"], report["server"]

    def cell(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    rate = client["target_rate_qps"]
    lines = [
        f"engine {client['engine']}"
        + (f" (open loop at {rate:g} q/s)" if rate else " (closed loop, max throughput)")
        + f", mix {report['mix']}, {report['duration_s']:g} s",
        f"sent {client['sent']}, answered {client['answered']}, lost {client['lost']}, "
        f"{client['qps']:.0f} answered/s",
        f"latency ms: avg {cell(client['latency_avg_ms'], '.3f')}, "
        f"p50 {cell(client['latency_p50_ms'], '.3f')}, p99 {cell(client['latency_p99_ms'], '.3f')}",
        "rcodes: " + ", ".join(f"{k} {v}" for k, v in client["rcodes"].items()),
    ]
    if server["source"] is None:
        lines.append("hit ratio, upstream packets: not measured (give --metrics-url or "
                     "--upstream-counter-command)")
    else:
        lines.append(f"hit ratio {cell(server['hit_ratio'], '.4f')}, upstream packets "
                     f"{server['upstream_packets']} = "
                     f"{cell(server['upstream_packets_per_1000_queries'], '.1f')} per 1000 "
                     f"queries (from {server['source']})")
    if report.get("trace_hit_ratio") is not None:
        lines.append(f"trace hit ratio (ideal cache, no expiry): {report['trace_hit_ratio']:.4f}")
    return lines


def write_json(out_dir: Path, report: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sidecar.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def find_dnsperf() -> str | None:
    return shutil.which("dnsperf")
