#!/usr/bin/env python3
"""Core benchmark: the resolver against unbound, side by side, in one run.

    sudo python3 bench/core_bench.py [--duration S] [--names N] [--out DIR]

Both servers are one-core forwarding caches in front of the same knotd, which serves a
generated mail-shaped zone (resolver.bench.authority). dnsperf runs on core 0, the server
under test on core 1, knotd on core 0 too (it only works during misses, while dnsperf is
mostly idle waiting). Measured, per server:

- cache-hit QPS (a warmed set of names, asked over and over),
- miss QPS (fresh nonexistent names: every query is one NXDOMAIN round trip to knotd),
- server CPU time per query (utime + stime from /proc/PID/stat around each dnsperf run),
- RSS growth per cached entry (VmRSS before and after filling the cache with 100k keys).

As root everything runs inside a private network namespace (the script re-executes itself
under `ip netns exec`, so every child is inside too) and an nftables counter there counts the
packets sent to knotd: zero during hit runs proves they were hits, one per query during miss
runs proves they were misses. Not root: the host's loopback, with a warning, and no counter.

Figures go to stdout and DIR/core_bench.json; bench/RESULTS.md is written by hand from them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # resolver.bench.harness is standard library only: any Python
from resolver.bench import harness  # noqa: E402
from resolver.bench.harness import Process, free_port  # noqa: E402

VENV_PYTHON = REPO / ".venv" / "bin" / "python"
# Set in the re-executed child: the namespace it runs in (the parent owns and deletes it).
NETNS_ENV = "RESOLVER_BENCH_NETNS"
LOOPBACK = "127.0.0.1"
ORIGIN = "test."
REVERSE_ORIGIN = "2.0.192.in-addr.arpa."  # authority.REVERSE_ORIGIN
# Field note: dnsperf itself tops out near 100k qps on one core; more outstanding queries
# only add queueing in the server's socket buffer.
OUTSTANDING_QUERIES = 100
CLIENT_CORE = "0"
SERVER_CORE = "1"
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_SECONDS = 30.0
NFT_TABLE = "resolver_bench"
UPSTREAM_PPS_UNBINDING = 1_000_000  # packets/s: ~50x the miss rate either server reaches here
MAIL_SEED = 1  # --mix mail: the seed of resolver.bench.workload's stream (same run, same file)

log = harness.make_log("core-bench")


# --- the server's CPU time and memory, from /proc -------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of the whole process (all threads), from /proc/PID/stat.

    Kept apart because on loopback the kernel's work for a send (including delivery into the
    receiver's socket) is charged to the sender as stime: the servers' system time is mostly
    the same syscalls, and the user time is where their code differs.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after its ")" are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return utime / CLOCK_TICKS_PER_SECOND, stime / CLOCK_TICKS_PER_SECOND


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (`resolver serve --workers N`: the supervisor and its workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        i += 1
    return pids


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """cpu_seconds summed over pid and its descendants."""
    times = [cpu_seconds(p) for p in process_tree(pid)]
    return sum(u for u, _ in times), sum(s for _, s in times)


def tree_rss_bytes(pid: int) -> int:
    return sum(rss_bytes(p) for p in process_tree(pid))


# --- packets to knotd, counted inside our namespace -----------------------------------------


class AuthorityCounter:
    """nftables counter of packets sent to knotd, inside our own namespace only."""

    def __init__(self, port: int) -> None:
        ruleset = f"""
table inet {NFT_TABLE} {{
    counter to_authority {{ }}
    chain output {{
        type filter hook output priority 0; policy accept;
        ip daddr {LOOPBACK} udp dport {port} counter name "to_authority"
        ip daddr {LOOPBACK} tcp dport {port} tcp flags syn counter name "to_authority"
    }}
}}
"""
        harness.nft_load(ruleset)

    def packets(self) -> int:
        out = subprocess.run(
            ["nft", "-j", "list", "counter", "inet", NFT_TABLE, "to_authority"],
            check=True, capture_output=True,
        ).stdout
        counters = harness.parse_nft_counters(out)
        if "to_authority" not in counters:
            raise RuntimeError("nft counter not found")
        return counters["to_authority"]

    def close(self) -> None:
        harness.nft_delete_table(NFT_TABLE)


# --- dnsperf ----------------------------------------------------------------------------


@dataclass
class Dnsperf:
    sent: int
    completed: int
    lost: int
    qps: float
    run_seconds: float
    rcodes: dict[str, int]
    latency_avg_ms: float
    response_bytes_avg: int
    # dnsperf's own CPU seconds per wall second: near 1.0, the client was the bottleneck.
    client_cpu_share: float = 0.0


def parse_dnsperf(output: str) -> Dnsperf:
    def number(label: str) -> str:
        match = re.search(rf"{label}:\s+([0-9.]+)", output)
        if match is None:
            raise RuntimeError(f"dnsperf output lacks {label!r}:\n{output}")
        return match.group(1)

    sizes = re.search(r"Average packet size:\s+request \d+, response (\d+)", output)
    rcodes_line = re.search(r"Response codes:\s+(.*)", output)
    rcodes = {}
    if rcodes_line:
        for code, count in re.findall(r"([A-Z]+) (\d+)", rcodes_line.group(1)):
            rcodes[code] = int(count)
    return Dnsperf(
        sent=int(number("Queries sent")),
        completed=int(number("Queries completed")),
        lost=int(number("Queries lost")),
        qps=float(number("Queries per second")),
        run_seconds=float(number(r"Run time \(s\)")),
        rcodes=rcodes,
        latency_avg_ms=float(number(r"Average Latency \(s\)")) * 1000,
        response_bytes_avg=int(sizes.group(1)) if sizes else 0,
    )


def dnsperf(port: int, query_file: Path, seconds: float, once: bool) -> Dnsperf:
    argv = [
        "taskset", "-c", CLIENT_CORE, "dnsperf", "-s", LOOPBACK, "-p", str(port),
        "-d", str(query_file), "-l", f"{seconds:g}", "-q", str(OUTSTANDING_QUERIES), "-c", "1",
    ]
    if once:
        argv += ["-n", "1"]  # each line once: fresh names must never repeat
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"dnsperf failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    result = parse_dnsperf(done.stdout)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result.client_cpu_share = client_cpu / result.run_seconds if result.run_seconds else 0.0
    return result


# --- the two servers ----------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: Process
    port: int


def start_unbound(tmp: Path, authority_port: int) -> Server:
    port = free_port()
    process = harness.start_unbound(
        tmp, LOOPBACK, port, [f"{LOOPBACK}@{authority_port}"], SERVER_CORE, log,
        local_zones=[ORIGIN, REVERSE_ORIGIN],
        options=["qname-minimisation: no", "aggressive-nsec: no", "prefetch: no",
                 "msg-cache-size: 512m", "rrset-cache-size: 1024m", "key-cache-size: 4m",
                 "neg-cache-size: 64m"])
    return Server("unbound", process, port)


def start_resolver(tmp: Path, authority_port: int, python: str, cache_entries: int,
                   workers: int = 1) -> Server:
    port = free_port()
    conf = tmp / "resolver.toml"
    # Room for every key the run creates (hit set, 100k fill, misses), so no eviction skews
    # the RSS figure; bytes are capped far above what that needs. A packet budget far above
    # any miss rate here: its bookkeeping runs, as in production, but it never throttles.
    conf.write_text(
        f"cache_max_entries = {cache_entries}\n"
        f"cache_max_bytes = {8 * 2**30}\n"
        f"upstream_pps = {UPSTREAM_PPS_UNBINDING}\n"
    )
    process = Process(
        "resolver",
        [
            # Several workers need several cores: not pinned then (dnsperf shares them).
            *(["taskset", "-c", SERVER_CORE] if workers == 1 else []),
            python, "-m", "resolver", "serve",
            "--config", str(conf),
            "--listen", f"{LOOPBACK}:{port}",
            "--upstream", f"{LOOPBACK}:{authority_port}",
            *(["--workers", str(workers)] if workers > 1 else []),
        ],
        tmp / "resolver.log", log=log,
    )
    return Server("resolver", process, port)


# --- measurements -------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    kind: str  # "warm", "fill", "hit", "miss"
    round: int
    dnsperf: Dnsperf
    cpu_seconds: float
    cpu_us_per_query: float
    user_us_per_query: float
    system_us_per_query: float
    # CPU seconds per wall second of the run: near 1.0 means the server was the bottleneck;
    # well below it, the client or a noisy neighbour was (the QPS then understates the server).
    server_cpu_share: float
    authority_packets: int | None
    rss_before: int
    rss_after: int


@dataclass
class Results:
    meta: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def measure(
    server: Server, kind: str, round_: int, query_file: Path, seconds: float, once: bool,
    counter: AuthorityCounter | None,
) -> Run:
    if not server.process.alive():
        raise RuntimeError(f"{server.name} died:\n{server.process.log_tail()}")
    packets_before = counter.packets() if counter else None
    rss_before = tree_rss_bytes(server.process.pid)
    user_before, system_before = tree_cpu_seconds(server.process.pid)
    result = dnsperf(server.port, query_file, seconds, once)
    user_after, system_after = tree_cpu_seconds(server.process.pid)
    user, system = user_after - user_before, system_after - system_before
    cpu = user + system
    per_query = 1e6 / result.completed if result.completed else float("nan")
    rss_after = tree_rss_bytes(server.process.pid)
    packets = counter.packets() - packets_before if counter and packets_before is not None else None
    run = Run(
        server=server.name, kind=kind, round=round_, dnsperf=result, cpu_seconds=cpu,
        cpu_us_per_query=cpu * per_query, user_us_per_query=user * per_query,
        system_us_per_query=system * per_query,
        server_cpu_share=cpu / result.run_seconds if result.run_seconds else float("nan"),
        authority_packets=packets, rss_before=rss_before, rss_after=rss_after,
    )
    codes = " ".join(f"{code}={count}" for code, count in result.rcodes.items())
    log(
        f"{server.name:8} {kind:4} r{round_}: {result.qps:9.0f} qps, "
        f"{run.cpu_us_per_query:6.1f} CPU us/q, busy {run.server_cpu_share:4.2f} "
        f"(dnsperf {result.client_cpu_share:4.2f}), "
        f"completed {result.completed}, "
        f"lost {result.lost}, to knotd {packets}, {codes}"
    )
    return run


def write_queries(path: Path, queries: Sequence[tuple[str, str]]) -> Path:
    with path.open("w") as out:
        for name, qtype in queries:
            out.write(f"{name} {qtype}\n")
    return path


def fresh_names(tag: str, count: int) -> list[tuple[str, str]]:
    # Direct children of the apex that do not exist: NXDOMAIN with the SOA, never asked
    # before (the random tag), and no NXDOMAIN ancestor a resolver could cut at (RFC 8020).
    salt = f"{random.getrandbits(32):08x}"
    return [(f"m{salt}{tag}-{i}.{ORIGIN}", "A") for i in range(count)]


def dns_key(name: str, qtype: str) -> tuple[str, str]:
    """A (name, type) pair compared as the cache does: case-insensitive, trailing dot optional."""
    return name.rstrip(".").lower(), qtype.upper()


def mail_hit_queries(
    n_domains: int, count: int,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """--mix mail: (stream, distinct). stream is the first ``count`` lookups of the seeded mail
    workload over a zone of ``n_domains`` domains, repeats and Zipf skew kept, for the timed hit
    runs; distinct is its (name, type) set in first-seen order, for the warm-up, so that every
    question of the stream is a hit afterwards (the NXDOMAIN PTRs of unknown senders too)."""
    from resolver.bench.workload import MailMix, queries

    stream = queries(MailMix(n_domains=n_domains, origin=ORIGIN), MAIL_SEED, count)
    seen: set[tuple[str, str]] = set()
    distinct = []
    for name, qtype in stream:
        if dns_key(name, qtype) not in seen:
            seen.add(dns_key(name, qtype))
            distinct.append((name, qtype))
    return stream, distinct


def machine() -> dict[str, Any]:
    version = harness.tool_version
    return {
        "nproc": os.cpu_count(),
        "cpu_model": harness.cpu_model(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "unbound": version(["unbound", "-V"]),
        "knotd": version(["knotd", "--version"]),
        "dnsperf": version(["dnsperf", "-h"]),
    }


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarize(results: Results, servers: list[str], fill_entries: dict[str, int]) -> None:
    summary: dict[str, Any] = {}
    for kind in ("hit", "miss"):
        for name in servers:
            runs = [r for r in results.runs if r.server == name and r.kind == kind]
            summary[f"{kind}_qps_{name}"] = mean([r.dnsperf.qps for r in runs])
            summary[f"{kind}_qps_{name}_rounds"] = [round(r.dnsperf.qps) for r in runs]
            summary[f"{kind}_cpu_us_per_query_{name}"] = mean([r.cpu_us_per_query for r in runs])
            summary[f"{kind}_user_us_per_query_{name}"] = mean([r.user_us_per_query for r in runs])
            summary[f"{kind}_system_us_per_query_{name}"] = mean(
                [r.system_us_per_query for r in runs])
            summary[f"{kind}_server_cpu_share_{name}"] = mean([r.server_cpu_share for r in runs])
            # What one whole core would serve at this cost: robust to a busy client core.
            summary[f"{kind}_qps_per_core_{name}"] = (
                1e6 / summary[f"{kind}_cpu_us_per_query_{name}"])
            summary[f"{kind}_client_cpu_share_{name}"] = mean(
                [r.dnsperf.client_cpu_share for r in runs])
            summary[f"{kind}_authority_packets_per_query_{name}"] = mean(
                [r.authority_packets / r.dnsperf.completed for r in runs
                 if r.authority_packets is not None and r.dnsperf.completed]
            )
        if {"resolver", "unbound"} <= set(servers):
            for figure in ("qps", "qps_per_core"):
                summary[f"{kind}_{figure}_ratio_resolver_to_unbound"] = (
                    summary[f"{kind}_{figure}_resolver"] / summary[f"{kind}_{figure}_unbound"]
                )
    for name in servers:
        fills = [r for r in results.runs if r.server == name and r.kind == "fill"]
        if fills:
            fill = fills[0]
            entries = fill_entries[name]
            summary[f"rss_before_fill_{name}"] = fill.rss_before
            summary[f"rss_after_fill_{name}"] = fill.rss_after
            summary[f"fill_entries_{name}"] = entries
            # Context for the per-entry figure: the wire size of the replies being cached.
            summary[f"fill_response_bytes_avg_{name}"] = fill.dnsperf.response_bytes_avg
            summary[f"rss_bytes_per_entry_{name}"] = (
                (fill.rss_after - fill.rss_before) / entries if entries else float("nan")
            )
    results.summary = summary


def print_table(results: Results, servers: list[str]) -> None:
    s = results.summary
    rows: list[tuple[str, ...]] = [("", *servers, "ratio" if len(servers) == 2 else "")]

    def ratio(key: str) -> str:
        value = s.get(f"{key}_ratio_resolver_to_unbound")
        return f"{value:.2f}" if value is not None else ""

    rows.append(("cache-hit QPS", *(f"{s[f'hit_qps_{n}']:.0f}" for n in servers), ratio("hit_qps")))
    rows.append(("  rounds", *(str(s[f"hit_qps_{n}_rounds"]) for n in servers), ""))
    rows.append(("miss QPS", *(f"{s[f'miss_qps_{n}']:.0f}" for n in servers), ratio("miss_qps")))
    rows.append(("  rounds", *(str(s[f"miss_qps_{n}_rounds"]) for n in servers), ""))
    for kind in ("hit", "miss"):
        rows.append((f"CPU us/query, {kind}",
                     *(f"{s[f'{kind}_cpu_us_per_query_{n}']:.1f}" for n in servers), ""))
        rows.append((f"  user / system us, {kind}",
                     *(f"{s[f'{kind}_user_us_per_query_{n}']:.1f} / "
                       f"{s[f'{kind}_system_us_per_query_{n}']:.1f}" for n in servers), ""))
        rows.append((f"QPS per core (1/CPU), {kind}",
                     *(f"{s[f'{kind}_qps_per_core_{n}']:.0f}" for n in servers),
                     ratio(f"{kind}_qps_per_core")))
        rows.append((f"server busy, {kind}",
                     *(f"{s[f'{kind}_server_cpu_share_{n}']:.2f}" for n in servers), ""))
        rows.append((f"dnsperf busy, {kind}",
                     *(f"{s[f'{kind}_client_cpu_share_{n}']:.2f}" for n in servers), ""))
        rows.append((f"knotd pkts/query, {kind}",
                     *(f"{s[f'{kind}_authority_packets_per_query_{n}']:.3f}" for n in servers),
                     ""))
    rows.append(("RSS bytes/entry (fill)",
                 *(f"{s.get(f'rss_bytes_per_entry_{n}', float('nan')):.0f}" for n in servers), ""))
    rows.append(("  entries filled", *(str(s.get(f"fill_entries_{n}", "")) for n in servers), ""))
    rows.append(("  avg reply bytes (fill)",
                 *(str(s.get(f"fill_response_bytes_avg_{n}", "")) for n in servers), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    print(f"load average at start {' '.join(results.meta['loadavg_start'])}, "
          f"at end {' '.join(results.meta['loadavg_end'])} (2 cores: above ~2.5, others ran)")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print()


# --- py-spy (optional) ----------------------------------------------------------------------


def profile(server: Server, query_file: Path, seconds: float, out: Path, once: bool) -> None:
    """Sample the resolver with py-spy during one extra, unmeasured dnsperf run."""
    py_spy = shutil.which("py-spy") or str(VENV_PYTHON.parent / "py-spy")
    if not Path(py_spy).exists():
        log("py-spy not found: no profile")
        return
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(server.process.pid), "--format", "raw",
         "--duration", f"{int(seconds)}", "--rate", "200", "--nonblocking", "--nolineno",
         "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        dnsperf(server.port, query_file, seconds, once)
    finally:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.terminate()
            spy.wait()
    log(f"py-spy collapsed stacks: {out}")
    for line in summarize_profile(out):
        print(line)


def summarize_profile(path: Path, top: int = 15) -> list[str]:
    """Self and inclusive sample shares per function, from py-spy's collapsed stacks."""
    self_samples: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            frames = stack.split(";")
            self_samples[frames[-1]] = self_samples.get(frames[-1], 0) + count
            for frame in set(frames):  # recursion counts once per sample
                inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return [f"{path.name}: no samples"]
    lines = [f"{path.name}: {total} samples; top self time:"]
    for frame, count in sorted(self_samples.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    lines.append("  top inclusive time, project code below the entry point:")
    ours = {frame: count for frame, count in inclusive.items()
            if "(resolver/" in frame and "cli.py" not in frame and "__main__" not in frame}
    for frame, count in sorted(ours.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return lines


# --- the run ------------------------------------------------------------------------------


def bench(args: argparse.Namespace, python: str) -> int:
    # Imported here, not at the top: it needs dnspython, i.e. the venv main() re-executed into.
    from resolver.bench.authority import Knot, query_names

    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    namespace = os.environ.get(NETNS_ENV)
    pin = (os.cpu_count() or 1) >= 2

    if not pin:
        log("WARNING: fewer than 2 CPUs: dnsperf and the server will share one")
    results = Results(meta={
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python3", "bench/core_bench.py", *sys.argv[1:]]),
        "network_namespace": namespace,
        "duration_seconds": args.duration,
        "rounds": args.rounds,
        "outstanding_queries": OUTSTANDING_QUERIES,
        "machine": machine(),
        "git": harness.git_state(REPO),
        # Other work on the machine shows here; the recorded figures need a quiet one.
        "loadavg_start": harness.loadavg(),
        "resolver_workers": args.workers,
    })
    if args.mix is not None:
        results.meta["mix"] = args.mix

    harness.sigterm_as_interrupt()  # run the finally blocks below: stop children, drop tmp
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="core-bench-")))

        # One zone for everything: the hit set is its first names, the fill set the rest.
        # query_names gives at least 10 names per domain (more for the first 254, with PTRs).
        n_domains = (args.names + args.fill_entries) // 10 + 1
        all_queries = query_names(ORIGIN, n_domains)
        if args.mix == "mail":
            # The hit runs replay --names lookups of the mail workload over the same n_domains
            # the zone has (every question is data or a deliberate NXDOMAIN there); the warm-up
            # asks its distinct keys once; the fill set is the zone's other keys.
            hit_stream, hit_queries = mail_hit_queries(n_domains, args.names)
            warmed = {dns_key(name, qtype) for name, qtype in hit_queries}
            fill_queries = [q for q in all_queries if dns_key(*q) not in warmed]
            fill_queries = fill_queries[: args.fill_entries]
        else:
            hit_stream = hit_queries = all_queries[: args.names]
            fill_queries = all_queries[args.names : args.names + args.fill_entries]
        if len(fill_queries) < args.fill_entries:
            raise RuntimeError(f"zone yields {len(all_queries)} names, need more")
        warm_file = hit_file = write_queries(tmp / "hits.txt", hit_queries)
        if args.mix == "mail":
            hit_file = write_queries(tmp / "mail-stream.txt", hit_stream)
        fill_file = write_queries(tmp / "fill.txt", fill_queries)
        log(f"zone: {n_domains} domains, {len(all_queries)} query names; "
            f"hit set {len(hit_queries)}, fill set {len(fill_queries)}")
        if args.mix == "mail":
            types = sorted({qtype for _, qtype in hit_stream})
            log(f"mix mail: hit runs replay {len(hit_stream)} lookups (seed {MAIL_SEED}, "
                f"types {','.join(types)}) over {len(hit_queries)} distinct keys, "
                f"all warmed first")

        knot = stack.enter_context(Knot(LOOPBACK, origin=ORIGIN, n_domains=n_domains, workers=1))
        authority_port = knot.port
        knot_pid = knot.pid
        if pin and knot_pid:
            # Keep knotd (all its threads) off the server's core.
            subprocess.run(["taskset", "-a", "-p", "-c", CLIENT_CORE, str(knot_pid)],
                           check=True, capture_output=True)
        log(f"knotd on {knot.address}:{authority_port} (pid {knot_pid})")

        counter: AuthorityCounter | None = None
        if namespace:
            counter = AuthorityCounter(authority_port)
            stack.callback(counter.close)
        else:
            log("WARNING: not in a private namespace: no count of packets to knotd")

        started: dict[str, Server] = {}
        for name in servers:
            if name == "unbound":
                server = start_unbound(tmp, authority_port)
            elif name == "resolver":
                cache_entries = 4 * (args.names + args.fill_entries) + 2_000_000
                server = start_resolver(tmp, authority_port, python, cache_entries,
                                        args.workers)
            else:
                raise SystemExit(f"unknown server {name!r}")
            stack.callback(server.process.stop)
            started[name] = server
        for server in started.values():
            harness.wait_answering(server.process, LOOPBACK, server.port, hit_queries[0][0],
                                   timeout_seconds=READY_TIMEOUT_SECONDS, retry_seconds=0.1)
            log(f"{server.name} answering on port {server.port} (pid {server.process.pid})")

        # Warm both with the hit set (each line once), then fill with 100k distinct keys for
        # the RSS figure, before the timed rounds so every round sees the same cache.
        fill_entries: dict[str, int] = {}
        for server in started.values():
            results.runs.append(measure(server, "warm", 0, warm_file, 120, True, counter))
        for server in started.values():
            fill = measure(server, "fill", 0, fill_file, 300, True, counter)
            results.runs.append(fill)
            cacheable = fill.dnsperf.rcodes.get("NOERROR", 0) + fill.dnsperf.rcodes.get(
                "NXDOMAIN", 0)
            fill_entries[server.name] = cacheable

        # Alternate the servers (A B A B): round-to-round spread shows the noise.
        for round_ in range(1, args.rounds + 1):
            for server in started.values():
                # Address records live 300 s (TTL_ADDRESS): top the hit set up before each
                # round so a long --duration still measures hits (the knotd count shows it).
                results.runs.append(
                    measure(server, "warm", round_, warm_file, 120, True, counter))
                results.runs.append(
                    measure(server, "hit", round_, hit_file, args.duration, False, counter))
        miss_lines = int(args.miss_qps_cap * args.duration)
        for round_ in range(1, args.rounds + 1):
            for server in started.values():
                miss_file = write_queries(
                    tmp / f"miss-{server.name}-{round_}.txt",
                    fresh_names(f"{server.name[0]}{round_}", miss_lines))
                run = measure(server, "miss", round_, miss_file, args.duration, True, counter)
                if run.dnsperf.sent >= miss_lines:
                    log(f"WARNING: {server.name} used up all {miss_lines} fresh names before "
                        f"the time limit; raise --miss-qps-cap")
                results.runs.append(run)
                miss_file.unlink()

        if args.py_spy and "resolver" in started:
            resolver = started["resolver"]
            profile(resolver, hit_file, args.duration, args.out / "py-spy-hits.txt", False)
            miss_file = write_queries(tmp / "miss-profile.txt",
                                      fresh_names("p", miss_lines))
            profile(resolver, miss_file, args.duration, args.out / "py-spy-misses.txt", True)

        for server in started.values():
            if not server.process.alive():
                raise RuntimeError(f"{server.name} died:\n{server.process.log_tail()}")
            shutil.copy(server.process.log_path, args.out / server.process.log_path.name)

    results.meta["loadavg_end"] = harness.loadavg()
    summarize(results, servers, fill_entries)
    print_table(results, servers)
    out_file = args.out / "core_bench.json"
    out_file.write_text(json.dumps(asdict(results), indent=2) + "\n")
    log(f"wrote {out_file}")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per timed dnsperf run (default 10)")
    parser.add_argument("--names", type=int, default=2000,
                        help="size of the warmed hit set (default 2000)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out",
                        help="directory for core_bench.json and server logs")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed rounds per server and kind, alternating servers")
    parser.add_argument("--fill-entries", type=int, default=100_000,
                        help="distinct cacheable keys sent for the RSS-per-entry figure")
    parser.add_argument("--miss-qps-cap", type=float, default=40_000,
                        help="fresh names per second of --duration written per miss run")
    parser.add_argument("--servers", default="resolver,unbound",
                        help="comma-separated subset of resolver,unbound")
    parser.add_argument("--host-loopback", action="store_true",
                        help="no network namespace even as root (where netns is unavailable)")
    parser.add_argument("--workers", type=int, default=1,
                        help="resolver serve --workers N (N > 1: the resolver is not pinned to "
                             "a core, so dnsperf and knotd share the cores with it)")
    parser.add_argument("--mix", choices=["mail"], default=None,
                        help="mail: the hit runs replay --names lookups of the Zipf-skewed mail "
                             "workload (resolver.bench.workload) over the zone's domains, after "
                             "a warm-up with its distinct keys (default: query_names)")
    parser.add_argument("--py-spy", action="store_true",
                        help="after the timed runs, sample the resolver with py-spy")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # The resolver and resolver.bench need the project's venv; prefer it for everything.
    python = harness.venv_python(VENV_PYTHON)
    if os.geteuid() == 0 and NETNS_ENV not in os.environ and not args.host_loopback:
        # Ctrl-C reaches the child through the terminal's process group already; SIGTERM
        # sent to us alone is passed on, so the child cleans up and we then delete the netns.
        return harness.run_in_namespace(
            Path(__file__), argv, python, namespace=f"resolver-bench-{os.getpid()}",
            env_var=NETNS_ENV, log=log, forward_signals=(signal.SIGTERM,))
    harness.reexec_in_venv(Path(__file__), argv, VENV_PYTHON)
    if NETNS_ENV not in os.environ:
        reason = "--host-loopback" if os.geteuid() == 0 else "not root"
        log(f"WARNING: {reason}: no private network namespace; running on the host's "
            "loopback, where other traffic adds noise")
    try:
        return bench(args, python)
    except KeyboardInterrupt:
        log("interrupted: children stopped, temp dir removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
