#!/usr/bin/env python3
"""Incident replay: a primary upstream silently throttled under load, on one machine.

    sudo python3 bench/incident.py [--out DIR] [--quick] [--servers resolver,unbound,dnsmasq]

The AWS incident in miniature (DESIGN.md 1 and 4): the operator's recursive cluster (the
"primary") starts dropping, silently, everything above an undocumented packet rate while the
VPC resolver (the "fallback") still has room. Each server under test gets the same seeded mail
trace, open loop, one after another with a fresh cache, and we measure what its clients saw and
what each upstream received.

- As root it creates a network namespace `incident-<pid>`, brings `lo` up, re-executes itself
  inside with `ip netns exec` (every child is inside too) and deletes the namespace at the end,
  also on Ctrl-C, SIGTERM or an error. All traffic is on loopback addresses in there.
- One knotd (zones from resolver.bench.authority) listens on 127.0.0.2:53 (the primary) and
  127.0.0.3:53 (the fallback): 127.0.0.0/8 is local on Linux, no aliases needed (checked).
- The throttle is the kernel's, not Python's: an nftables `limit rate over N/second drop` rule
  on packets to 127.0.0.2 port 53 (UDP and TCP), added and flushed at the phase boundaries.
  Named counters in front of it count the packets offered to each upstream (what the budget
  governs), sampled every 0.25 s with `nft -j list counters`: the ground truth for packets per
  second at each upstream and for one-second windows over pps + burst.
- Phases: warm-up, baseline, throttled, recovered. The client rate of each is calibrated from
  the trace itself (ideal-cache misses = first occurrences of each question): about 3 B/s
  misses in warm-up, baseline and throttled (B = the primary's budget), about B/2 in recovered
  (the off-peak: what lets a pool return to the primary).
- Servers (pinned with taskset -c 1; load, knotd and nft on core 0): the resolver with
  `[[upstream]]` budgets, unbound (forward-zone to both, prefetch, one thread) and dnsmasq
  (both servers, cache-rr).

Output: a table on stdout, DIR/incident.json (everything), DIR/incident.md (a RESULTS.md
section), and the servers' logs in DIR.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import functools
import itertools
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # resolver.bench.harness is standard library only: any Python
from resolver.bench import harness  # noqa: E402
from resolver.bench.harness import Process  # noqa: E402

VENV_PYTHON = REPO / ".venv" / "bin" / "python"
NETNS_ENV = "RESOLVER_INCIDENT_NETNS"
LISTEN = "127.0.0.1"
PRIMARY = "127.0.0.2"
FALLBACK = "127.0.0.3"
ORIGIN = "test."
ZONE_SEED = 1
TRACE_SEED = 1
LOAD_CORE = 0
SERVER_CORE = "1"
NFT_TABLE = "incident_bench"
SAMPLE_SECONDS = 0.25  # counter samples: 4 per second give sliding one-second windows
CLIENT_TIMEOUT_SECONDS = 5.0  # glibc's resolver timeout: past it the MTA has given up
READY_TIMEOUT_SECONDS = 60.0
SOCKETS = 8
LIMIT_BURST_PACKETS = 5  # the kernel limit's burst: nft's minimum-ish default
TARGET_PHASES = ("baseline", "throttled", "recovered")
# A second in which the fallback received less than this share of its budget: it had room.
ROOM_SHARE = 0.95


log = harness.make_log("incident")


# --- readiness ------------------------------------------------------------------------------


def wait_answering(process: Process, address: str, port: int, name: str) -> None:
    """Until the server answers a UDP query with any rcode (listening is not enough)."""
    harness.wait_answering(process, address, port, name, timeout_seconds=READY_TIMEOUT_SECONDS,
                           retry_seconds=0.2, qid=os.getpid() & 0xFFFF)


# --- the namespace ----------------------------------------------------------------------


def check_addresses() -> None:
    """127.0.0.2 and 127.0.0.3 are local without aliases (127.0.0.0/8 routes to lo)."""
    for address in (PRIMARY, FALLBACK):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))


# --- nftables: the throttle and the counters ---------------------------------------------

COUNTERS = ("primary_udp", "primary_tcp", "fallback_udp", "fallback_tcp", "primary_passed")


class Nft:
    """Counters of packets offered to each upstream, and the kernel throttle on the primary."""

    def __init__(self, limit_pps: int) -> None:
        self.limit_pps = limit_pps
        declared = "\n".join(f"    counter {name} {{ }}" for name in COUNTERS)
        ruleset = f"""
table inet {NFT_TABLE} {{
{declared}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip daddr {PRIMARY} udp dport 53 counter name "primary_udp"
        ip daddr {PRIMARY} tcp dport 53 counter name "primary_tcp"
        ip daddr {FALLBACK} udp dport 53 counter name "fallback_udp"
        ip daddr {FALLBACK} tcp dport 53 counter name "fallback_tcp"
        jump throttle
        ip daddr {PRIMARY} meta l4proto {{ tcp, udp }} th dport 53 counter name "primary_passed"
    }}
    chain throttle {{
    }}
}}
"""
        harness.nft_load(ruleset)

    def throttle_rule(self) -> list[str]:
        return ["nft", "add", "rule", "inet", NFT_TABLE, "throttle", "ip", "daddr", PRIMARY,
                "meta", "l4proto", "{", "tcp,", "udp", "}", "th", "dport", "53",
                "limit", "rate", "over", f"{self.limit_pps}/second",
                "burst", f"{LIMIT_BURST_PACKETS}", "packets", "drop"]

    @staticmethod
    def unthrottle_rule() -> list[str]:
        return ["nft", "flush", "chain", "inet", NFT_TABLE, "throttle"]

    @staticmethod
    def list_command() -> list[str]:
        return ["nft", "-j", "list", "counters", "table", "inet", NFT_TABLE]

    @staticmethod
    def parse(out: bytes) -> dict[str, int]:
        return harness.parse_nft_counters(out)

    def read(self) -> dict[str, int]:
        out = subprocess.run(self.list_command(), check=True, capture_output=True).stdout
        return self.parse(out)

    def close(self) -> None:
        subprocess.run(self.unthrottle_rule(), check=False, capture_output=True)
        harness.nft_delete_table(NFT_TABLE)


# --- knotd on both addresses --------------------------------------------------------------


def start_knot(tmp: Path, n_domains: int) -> Process:
    """authority's knot.conf and zones, but listening on the primary and fallback addresses."""
    from resolver.bench import authority

    workdir = Path(tempfile.mkdtemp(prefix="knot-", dir=tmp))
    zones = {ORIGIN: workdir / "forward.zone",
             authority.REVERSE_ORIGIN: workdir / "reverse.zone"}
    zones[ORIGIN].write_text(authority.generate_zone(ORIGIN, n_domains, ZONE_SEED))
    zones[authority.REVERSE_ORIGIN].write_text(
        authority.generate_reverse_zone(ORIGIN, n_domains, ZONE_SEED))
    conf = authority._knot_conf(workdir, PRIMARY, 53, zones, 1)
    one = f"listen: {PRIMARY}@53"
    if one not in conf:
        raise RuntimeError("authority._knot_conf changed: cannot set two listen addresses")
    conf = conf.replace(one, f"listen: [ {PRIMARY}@53, {FALLBACK}@53 ]")
    (workdir / "knot.conf").write_text(conf)
    knotd = authority.find_knotd()
    if knotd is None:
        raise RuntimeError("knotd not found (Debian package: knot)")
    process = Process("knotd", [knotd, "-c", str(workdir / "knot.conf")], tmp / "knotd.log",
                      log=log)
    for address in (PRIMARY, FALLBACK):
        wait_answering(process, address, 53, ORIGIN)
    return process


# --- the servers under test -----------------------------------------------------------------


@dataclass
class Budgets:
    primary_pps: int
    primary_burst: int
    fallback_pps: int
    fallback_burst: int
    kernel_limit_pps: int
    hold_seconds: float


def start_resolver(tmp: Path, port: int, python: str, b: Budgets) -> Process:
    conf = tmp / "resolver.toml"
    conf.write_text(f"""\
repoint_hold_seconds = {b.hold_seconds}

[[upstream]]
address = "{PRIMARY}:53"
role = "primary"
pps = {b.primary_pps}
burst = {b.primary_burst}

[[upstream]]
address = "{FALLBACK}:53"
role = "fallback"
pps = {b.fallback_pps}
burst = {b.fallback_burst}
""")
    return Process("resolver", ["taskset", "-c", SERVER_CORE, python, "-m", "resolver", "serve",
                                "--config", str(conf), "--listen", f"{LISTEN}:{port}"],
                   tmp / "resolver.log", log=log)


def start_unbound(tmp: Path, port: int) -> Process:
    from resolver.bench.authority import REVERSE_ORIGIN

    return harness.start_unbound(
        tmp, LISTEN, port, [f"{PRIMARY}@53", f"{FALLBACK}@53"], SERVER_CORE, log,
        local_zones=[ORIGIN, REVERSE_ORIGIN], verbosity=1,
        options=["prefetch: yes", "msg-cache-size: 64m", "rrset-cache-size: 128m"])


def dnsmasq_has_cache_rr() -> bool:
    out = subprocess.run(["dnsmasq", "--help"], capture_output=True, text=True, check=False)
    return "--cache-rr" in out.stdout + out.stderr


def start_dnsmasq(tmp: Path, port: int) -> Process:
    conf = tmp / "dnsmasq.conf"
    lines = [
        f"port={port}", f"listen-address={LISTEN}", "bind-interfaces", "no-resolv", "no-hosts",
        f"server={PRIMARY}", f"server={FALLBACK}", "cache-size=10000",
        # 150 by default; the other two servers have no such cap on forwarded queries.
        "dns-forward-max=1000", "user=root", "pid-file=",
    ]
    if dnsmasq_has_cache_rr():
        lines.append("cache-rr=MX,TXT,PTR,TLSA,AAAA,A")
    conf.write_text("\n".join(lines) + "\n")
    return Process("dnsmasq", ["taskset", "-c", SERVER_CORE, "dnsmasq", "-k",
                               "--log-facility=-", f"--conf-file={conf}"], tmp / "dnsmasq.log",
                   log=log)


# --- the trace, its expected answers and the phase plan ------------------------------------


@dataclass
class Phase:
    name: str
    duration: float
    rate: float
    throttled: bool
    start: float = 0.0
    first_query: int = 0
    count: int = 0
    ideal_misses: int = 0


def expectation(name: str, rdtype: str, seed: int) -> tuple[int, bytes]:
    """(rcode, bytes that must appear in the reply) for a workload question."""
    from resolver.bench import authority as a

    reverse = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)\.(\d+)\.in-addr\.arpa\.", name)
    if reverse and rdtype == "PTR":
        host = int(reverse.group(1))
        i = host - 1
        label = f"d{i}".encode()
        return 0, b"\x03mx1" + bytes([len(label)]) + label
    if rdtype == "PTR":
        return 3, b""  # an unknown connecting address: NXDOMAIN, deliberately
    m = re.fullmatch(r"(?:(mx[12])\.|_dmarc\.|sel1\._domainkey\.|_25\._tcp\.mx1\.)?d(\d+)\.test\.",
                     name)
    if m is None:
        raise ValueError(f"unexpected workload question {name} {rdtype}")
    i = int(m.group(2))
    host = m.group(1)
    if rdtype == "MX":
        return 0, b"\x00\x0a\x03mx1"
    if rdtype == "A":
        return 0, socket.inet_aton(a.mx1_ipv4(i) if host == "mx1" else a.mx2_ipv4(i))
    if rdtype == "AAAA":
        return 0, socket.inet_pton(socket.AF_INET6,
                                   a.mx1_ipv6(i) if host == "mx1" else a.mx2_ipv6(i))
    if rdtype == "TLSA":
        return 0, bytes.fromhex(a.tlsa_digest(i, seed))
    if rdtype == "TXT":
        if name.startswith("_dmarc."):
            return 0, a.dmarc_text(i).encode()
        if name.startswith("sel1."):
            return 0, a.dkim_text(i, seed)[:120].encode()
        return 0, a.spf_text(i)[:120].encode()
    raise ValueError(f"unexpected workload type {rdtype}")


def check_reply(wire: bytes, expected: tuple[int, bytes]) -> bool:
    rcode, needle = expected
    if wire[3] & 0x0F != rcode or wire[2] & 0x02:  # wrong rcode, or truncated
        return False
    if rcode == 0:
        return wire[6:8] != b"\0\0" and needle in wire
    return True


def plan(phases: list[Phase], budgets: Budgets, n_domains: int, miss_factor: float,
         ) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Pick each phase's client rate from the trace's ideal-cache misses; return the trace."""
    from resolver.bench import workload

    mix = workload.MailMix(n_domains=n_domains)
    longest = 1_200_000
    trace = workload.queries(mix, TRACE_SEED, longest)
    seen: set[tuple[str, str]] = set()
    cumulative = array("l", [0])
    for q in trace:
        cumulative.append(cumulative[-1] + (q not in seen))
        seen.add(q)

    def misses(first: int, count: int) -> int:
        return cumulative[min(first + count, longest)] - cumulative[first]

    def solve(first_of: Any, duration: float, count_of: Any, target: float) -> float:
        low, high = 10.0, 20_000.0
        for _ in range(40):
            rate = (low + high) / 2
            first = first_of(rate)
            if misses(first, count_of(rate)) / duration > target:
                high = rate
            else:
                low = rate
        return round(low)

    by_name = {p.name: p for p in phases}
    warm, base, thr, rec = (by_name[n] for n in ("warm-up", "baseline", "throttled", "recovered"))
    b = budgets.primary_pps
    warm.rate = solve(lambda r: 0, warm.duration, lambda r: round(r * warm.duration), 3 * b)
    warm_count = round(warm.rate * warm.duration)
    base.rate = solve(lambda r: warm_count, base.duration, lambda r: round(r * base.duration),
                      miss_factor * b)
    base_count = round(base.rate * base.duration)
    thr.rate = solve(lambda r: warm_count + base_count, thr.duration,
                     lambda r: round(r * thr.duration), miss_factor * b)
    before = warm_count + round(base.rate * base.duration) + round(thr.rate * thr.duration)
    rec.rate = solve(lambda r: before, rec.duration, lambda r: round(r * rec.duration), b / 2)
    start, first = 0.0, 0
    for p in phases:
        p.start, p.first_query, p.count = start, first, round(p.rate * p.duration)
        p.ideal_misses = misses(first, p.count)
        start += p.duration
        first += p.count
    if first > longest:
        raise RuntimeError("trace too short for the plan")
    calibration = {
        "method": "ideal cache: a question is a miss the first time it occurs in the trace "
                  "(TTLs, 300 s and more, outlast the run)",
        "distinct_questions_in_run": cumulative[first],
        "phases": {p.name: {"rate_qps": p.rate, "queries": p.count,
                            "ideal_misses_per_second": round(p.ideal_misses / p.duration, 1),
                            "ideal_miss_ratio": round(p.ideal_misses / max(1, p.count), 3)}
                   for p in phases},
    }
    return trace[:first], calibration


# --- the load: loadgen's open-loop sender, a piecewise rate and a content check -----------


def make_run_class() -> type:
    from resolver.bench import loadgen

    class IncidentRun(loadgen.LoadRun):
        """loadgen.LoadRun with one rate per phase, and each reply checked against the zone."""

        def __init__(self, prepared: Sequence[Any], expected: Sequence[tuple[int, bytes]],
                     phases: list[Phase], timeout_s: float, sockets: int) -> None:
            duration = sum(p.duration for p in phases)
            super().__init__(prepared, 1.0, duration, timeout_s, sockets, TRACE_SEED)
            self.phases = phases
            self.phase_starts = [p.start for p in phases]
            self.phase_firsts = [p.first_query for p in phases]
            self.scheduled = sum(p.count for p in phases)
            self.expected = expected
            self.correct = array("b")
            self.bad: list[tuple[int, bytes]] = []  # NOERROR replies that failed the check

        def due(self, now: float) -> int:
            if now < 0:
                return 0
            i = bisect.bisect_right(self.phase_starts, now) - 1
            p = self.phases[i]
            return min(p.first_query + min(math.floor(p.rate * (now - p.start)) + 1, p.count),
                       self.scheduled)

        def due_time(self, index: int) -> float:
            i = max(0, bisect.bisect_right(self.phase_firsts, index) - 1)
            p = self.phases[i]
            if index >= p.first_query + p.count:
                return self.duration_s
            return p.start + (index - p.first_query) / p.rate

        def take(self, now: float) -> tuple[int, bytes]:
            self.correct.append(0)
            return super().take(now)

        def on_reply(self, socket_index: int, wire: bytes, now: float) -> None:
            k = None
            if len(wire) >= loadgen.HEADER_BYTES:
                k = self.pending.get((socket_index, int.from_bytes(wire[:2], "big")))
            super().on_reply(socket_index, wire, now)
            if k is not None and not math.isnan(self.latencies[k]) and not self.correct[k]:
                self.correct[k] = 1 if check_reply(wire, self.expected[k]) else 2
                if self.correct[k] == 2 and wire[3] & 0x0F == 0 and len(self.bad) < 10:
                    self.bad.append((k, wire))

    return IncidentRun


@dataclass
class Sample:
    wall: float  # time.time() at the middle of the nft call
    counters: dict[str, int]


@dataclass
class Replay:
    wall_start: float
    samples: list[Sample] = field(default_factory=list)
    switches: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0


async def replay(port: int, run: Any, phases: list[Phase], nft: Nft) -> Replay:
    import trio

    from resolver.bench import loadgen

    async def sample(into: list[Sample]) -> None:
        before = time.time()
        out = (await trio.run_process(nft.list_command(), capture_stdout=True)).stdout
        into.append(Sample((before + time.time()) / 2, nft.parse(out)))

    socks = [loadgen._open_socket(LISTEN, port) for _ in range(SOCKETS)]
    result = Replay(wall_start=0.0)
    try:
        await sample(result.samples)
        start = trio.current_time()
        result.wall_start = time.time()

        async def sampler() -> None:
            tick = start
            while True:
                tick += SAMPLE_SECONDS
                await trio.sleep_until(tick)
                await sample(result.samples)

        async def switcher() -> None:
            for previous, phase in itertools.pairwise(phases):
                if phase.throttled == previous.throttled:
                    continue
                await trio.sleep_until(start + phase.start)
                argv = nft.throttle_rule() if phase.throttled else nft.unthrottle_rule()
                await trio.run_process(argv)
                result.switches["on" if phase.throttled else "off"] = time.time()
                log(f"throttle {'ON' if phase.throttled else 'OFF'} "
                    f"({phase.name} at +{time.time() - result.wall_start:.2f} s)")

        async with trio.open_nursery() as nursery:
            for index, sock in enumerate(socks):
                nursery.start_soon(loadgen._receiver, sock, index, run, start)
            nursery.start_soon(sampler)
            nursery.start_soon(switcher)
            await loadgen._sender(socks, run, start)
            drain_deadline = trio.current_time() + run.timeout_s
            while run.outstanding and trio.current_time() < drain_deadline:
                await trio.sleep(loadgen.DRAIN_POLL_S)
            nursery.cancel_scope.cancel()
        result.wall_time_s = trio.current_time() - start
        await trio.sleep(0.5)
        await sample(result.samples)
    finally:
        for sock in socks:
            sock.close()
        subprocess.run(nft.unthrottle_rule(), check=False)
    return result


# --- analysis ------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ resolver\.upstream: "
                      r"(?P<subject>\S+): (?P<old>\S+) -> (?P<new>\S+) \((?P<evidence>.*)\)$")


def resolver_events(log_path: Path, wall_start: float) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        events.append({"t": round(at - wall_start, 3), "subject": m.group("subject").rstrip(":"),
                       "old": m.group("old"), "new": m.group("new"),
                       "evidence": m.group("evidence")})
    return events


def percentile(values: list[float], percent: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[max(1, math.ceil(percent / 100 * len(values))) - 1]


def analyse(name: str, run: Any, rep: Replay, phases: list[Phase], budgets: Budgets,
            log_path: Path) -> dict[str, Any]:
    res = run.result(rep.wall_time_s)
    per_phase: dict[str, Any] = {}
    total = {"sent": 0, "correct": 0}
    for p in phases:
        ks = range(p.first_query, min(p.first_query + p.count, len(run.send_times)))
        sent = correct = wrong = timeouts = 0
        rcodes: dict[int, int] = {}
        latencies = []
        for k in ks:
            if math.isnan(run.send_times[k]):
                continue
            sent += 1
            lat = run.latencies[k]
            if math.isnan(lat) or lat > run.timeout_s:
                timeouts += 1
                latencies.append(math.inf)
                continue
            latencies.append(lat)
            rcodes[run.rcodes[k]] = rcodes.get(run.rcodes[k], 0) + 1
            if run.correct[k] == 1:
                correct += 1
            else:
                wrong += 1
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        per_phase[p.name] = {
            "rate_qps": p.rate, "scheduled": p.count, "sent": sent,
            "correct": correct, "correct_pct": round(100 * correct / max(1, sent), 3),
            "wrong_or_failed_answers": wrong, "timeouts": timeouts,
            "rcodes": {_rcode(r): n for r, n in sorted(rcodes.items())},
            "p50_ms": _ms(p50), "p99_ms": _ms(p99),
        }
        total["sent"] += sent
        total["correct"] += correct
    upstream = upstream_figures(rep, phases, budgets)
    timeline = per_second(run, rep, phases)
    room_limit = ROOM_SHARE * budgets.fallback_pps
    for p in phases:
        seconds = [t for t in timeline if t["phase"] == p.name]
        roomy = [t for t in seconds if t["fallback"] < room_limit]
        sent = sum(t["sent"] for t in roomy)
        per_phase[p.name]["seconds_fallback_without_room"] = len(seconds) - len(roomy)
        per_phase[p.name]["correct_pct_while_fallback_has_room"] = (
            round(100 * sum(t["correct"] for t in roomy) / sent, 3) if sent else None)
    figures: dict[str, Any] = {
        "server": name,
        "overall_correct_pct": round(100 * total["correct"] / max(1, total["sent"]), 3),
        "sent": total["sent"],
        "loadgen": {k: v for k, v in res.to_dict().items() if k != "seconds"},
        "phases": per_phase,
        "upstream": upstream,
        "timeline": timeline,
        "switches_relative_s": {k: round(v - rep.wall_start, 3) for k, v in rep.switches.items()},
    }
    figures["wrong_noerror_examples"] = [_describe(run.trace[k], wire) for k, wire in run.bad]
    total_packets = upstream["total_packets"]
    figures["upstream_packets_per_1000_queries"] = round(
        1000 * total_packets / max(1, total["sent"]), 1)
    if name == "resolver":
        figures["repointing"] = repointing(resolver_events(log_path, rep.wall_start), rep)
    return figures


def per_second(run: Any, rep: Replay, phases: list[Phase]) -> list[dict[str, Any]]:
    """Whole seconds of the run: client outcomes (by due second) and packets offered to each
    upstream (counters interpolated linearly between samples at the second's edges)."""
    rel = [x.wall - rep.wall_start for x in rep.samples]

    def at(name: str, t: float) -> float:
        values = [x.counters[name] for x in rep.samples]
        j = min(max(1, bisect.bisect_left(rel, t)), len(rel) - 1)
        t0, t1 = rel[j - 1], rel[j]
        share = 0.0 if t1 <= t0 else min(1.0, max(0.0, (t - t0) / (t1 - t0)))
        return values[j - 1] + share * (values[j] - values[j - 1])

    out = []
    duration = math.ceil(sum(p.duration for p in phases))
    rows = {s: {"t": s, "sent": 0, "correct": 0, "servfail": 0, "timeouts": 0}
            for s in range(duration)}
    for k, send_time in enumerate(run.send_times):
        if math.isnan(send_time):
            continue
        row = rows.get(math.floor(run.due_time(k)))
        if row is None:
            continue
        row["sent"] += 1
        lat = run.latencies[k]
        if math.isnan(lat) or lat > run.timeout_s:
            row["timeouts"] += 1
        elif run.correct[k] == 1:
            row["correct"] += 1
        elif run.rcodes[k] == 2:
            row["servfail"] += 1
    starts = [p.start for p in phases]
    for s, row in rows.items():
        row["phase"] = phases[bisect.bisect_right(starts, s) - 1].name
        for who, names in (("primary", ("primary_udp", "primary_tcp")),
                           ("primary_passed", ("primary_passed",)),
                           ("fallback", ("fallback_udp", "fallback_tcp"))):
            row[who] = round(sum(at(n, s + 1) - at(n, s) for n in names))
        out.append(row)
    return out


def _describe(question: tuple[str, str], wire: bytes) -> dict[str, Any]:
    import dns.message

    try:
        text = dns.message.from_wire(wire).to_text()
    except Exception as error:  # evidence, whatever it is
        text = f"unparsable ({error}): {wire.hex()}"
    return {"question": " ".join(question), "reply": text}


def _rcode(code: int) -> str:
    return {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}.get(code, str(code))


def _ms(seconds: float | None) -> float | str | None:
    if seconds is None:
        return None
    return "timeout" if math.isinf(seconds) else round(seconds * 1000, 2)


def upstream_figures(rep: Replay, phases: list[Phase], budgets: Budgets) -> dict[str, Any]:
    """Packets offered to each upstream: per phase, per one-second window, against budgets."""
    s = rep.samples
    series = {
        "primary": [x.counters["primary_udp"] + x.counters["primary_tcp"] for x in s],
        "fallback": [x.counters["fallback_udp"] + x.counters["fallback_tcp"] for x in s],
        "primary_passed": [x.counters["primary_passed"] for x in s],
    }
    limits = {"primary": budgets.primary_pps + budgets.primary_burst,
              "fallback": budgets.fallback_pps + budgets.fallback_burst}
    rel = [x.wall - rep.wall_start for x in s]
    out: dict[str, Any] = {
        "total_packets": series["primary"][-1] - series["primary"][0]
        + series["fallback"][-1] - series["fallback"][0],
        "tcp_packets": (s[-1].counters["primary_tcp"] - s[0].counters["primary_tcp"]
                        + s[-1].counters["fallback_tcp"] - s[0].counters["fallback_tcp"]),
        "budget_pps_plus_burst": limits,
        "sample_interval_s": SAMPLE_SECONDS,
        "per_second": {},
    }
    per = round(1 / SAMPLE_SECONDS)
    for who in ("primary", "fallback", "primary_passed"):
        values = series[who]
        # Sliding windows: the packets between a sample and the one about a second later.
        windows = [(rel[j], rel[j + per] - rel[j], values[j + per] - values[j])
                   for j in range(1, len(values) - per)]
        info: dict[str, Any] = {}
        for p in phases:
            inside = [w for w in windows if p.start <= w[0] + w[1] / 2 < p.start + p.duration]
            counts = [w[2] for w in inside]
            first = bisect.bisect_left(rel, p.start)
            last = bisect.bisect_right(rel, p.start + p.duration) - 1
            mean = ((values[last] - values[first]) / (rel[last] - rel[first])
                    if last > first else None)
            info[p.name] = {"max_1s": max(counts) if counts else None,
                            "mean_pps": round(mean, 1) if mean is not None else None}
            if who in limits:
                info[p.name]["windows_over_budget"] = sum(c > limits[who] for c in counts)
        if who in limits:
            over = [w for w in windows if w[2] > limits[who]]
            info["windows_over_budget"] = len(over)
            info["windows"] = len(windows)
            info["worst_windows"] = [
                {"t": round(w[0], 2), "span_s": round(w[1], 3), "packets": w[2]}
                for w in sorted(over, key=lambda w: -w[2])[:5]]
        out[who] = info
        # Whole-second buckets from the run's start, for plots.
        out["per_second"][who] = [values[min(len(values) - 1, j + per)] - values[j]
                                  for j in range(1, len(values) - 1, per)]
    return out


def repointing(events: list[dict[str, Any]], rep: Replay) -> dict[str, Any]:
    on = rep.switches.get("on")
    off = rep.switches.get("off")
    on_t = on - rep.wall_start if on else None
    off_t = off - rep.wall_start if off else None
    primary = f"{PRIMARY}:53"
    detect = next((e for e in events if on_t is not None and e["t"] >= on_t and (
        (e["subject"] == primary and e["old"] == "healthy")
        or (e["subject"] == "pool" and e["new"] == "repointed"))), None)
    back = next((e for e in events if off_t is not None and e["t"] >= off_t
                 and e["subject"] == "pool" and e["new"] == "primary"), None)
    healthy = next((e for e in events if off_t is not None and e["t"] >= off_t
                    and e["subject"] == primary and e["new"] == "healthy"), None)
    mode_before = "primary"
    for e in events:
        if on_t is not None and e["t"] < on_t and e["subject"] == "pool":
            mode_before = e["new"]
    return {
        "events": events,
        "mode_at_throttle_on": mode_before,
        "detect_s": round(detect["t"] - on_t, 3) if detect and on_t is not None else None,
        "detect_event": detect,
        "return_s": round(back["t"] - off_t, 3) if back and off_t is not None else None,
        "return_event": back,
        "primary_healthy_again_s": (round(healthy["t"] - off_t, 3)
                                    if healthy and off_t is not None else None),
        "mode_changes": sum(e["subject"] == "pool" for e in events),
        "primary_state_changes": sum(e["subject"] == primary for e in events),
    }


# --- reporting -------------------------------------------------------------------------------


def targets(results: dict[str, Any], budgets: Budgets) -> dict[str, Any]:
    ours = results.get("resolver")
    if ours is None:
        return {}
    thr = ours["phases"]["throttled"]
    rp = ours["repointing"]
    p99 = thr["p99_ms"]
    windows = (ours["upstream"]["primary"]["windows_over_budget"]
               + ours["upstream"]["fallback"]["windows_over_budget"])
    fallback_max = ours["upstream"]["fallback"]["throttled"]["max_1s"] or 0
    out = {
        "correct_100pct_while_fallback_has_room": {
            "value": {n: ours["phases"][n]["correct_pct_while_fallback_has_room"]
                      for n in TARGET_PHASES},
            "all_seconds": {n: ours["phases"][n]["correct_pct"] for n in TARGET_PHASES},
            "seconds_fallback_without_room": {
                n: ours["phases"][n]["seconds_fallback_without_room"] for n in TARGET_PHASES},
            "fallback_max_1s_in_throttled": fallback_max,
            "met": all(ours["phases"][n]["correct_pct_while_fallback_has_room"] in (100.0, None)
                       for n in TARGET_PHASES)},
        "p99_le_50ms_throttled": {"value": p99,
                                  "met": isinstance(p99, float | int) and p99 <= 50},
        "detect_le_2s": {"value": rp["detect_s"],
                         "met": rp["detect_s"] is not None and rp["detect_s"] <= 2},
        "return_le_hold_plus_5s": {"value": rp["return_s"], "hold": budgets.hold_seconds,
                                   "met": rp["return_s"] is not None
                                   and rp["return_s"] <= budgets.hold_seconds + 5},
        "zero_windows_over_budget": {"value": windows, "met": windows == 0},
    }
    if "unbound" in results:
        a = ours["upstream_packets_per_1000_queries"]
        b = results["unbound"]["upstream_packets_per_1000_queries"]
        out["fewer_upstream_packets_than_unbound"] = {"value": [a, b], "met": a < b}
    return out


def table(results: dict[str, Any], phases: list[Phase], budgets: Budgets) -> str:
    names = list(results)
    rows: list[tuple[str, ...]] = [("figure", *names)]
    for key in ("overall_correct_pct", "upstream_packets_per_1000_queries"):
        rows.append((key, *(str(results[n][key]) for n in names)))
    for p in phases:
        rows.append((f"{p.name} ({p.rate:g} q/s) correct %",
                     *(str(results[n]["phases"][p.name]["correct_pct"]) for n in names)))
        rows.append((f"{p.name} correct % in s. fallback had room (s. without)", *(
            f"{results[n]['phases'][p.name]['correct_pct_while_fallback_has_room']} "
            f"({results[n]['phases'][p.name]['seconds_fallback_without_room']})"
            for n in names)))
        rows.append((f"{p.name} p50 / p99 ms", *(
            f"{results[n]['phases'][p.name]['p50_ms']} / {results[n]['phases'][p.name]['p99_ms']}"
            for n in names)))
        rows.append((f"{p.name} timeouts / wrong", *(
            f"{results[n]['phases'][p.name]['timeouts']} / "
            f"{results[n]['phases'][p.name]['wrong_or_failed_answers']}" for n in names)))
        for who, limit in (("primary", budgets.primary_pps), ("fallback", budgets.fallback_pps)):
            rows.append((f"{p.name} {who} pkt/s mean / max-1s (budget {limit})", *(
                f"{results[n]['upstream'][who][p.name]['mean_pps']} / "
                f"{results[n]['upstream'][who][p.name]['max_1s']}" for n in names)))
    for who in ("primary", "fallback"):
        rows.append((f"1-s windows over {who} pps+burst", *(
            f"{results[n]['upstream'][who]['windows_over_budget']} of "
            f"{results[n]['upstream'][who]['windows']}" for n in names)))
    if "resolver" in results:
        rp = results["resolver"]["repointing"]
        rows.append(("resolver: detect s / return s", f"{rp['detect_s']} / {rp['return_s']}",
                     *([""] * (len(names) - 1))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    version = harness.tool_version
    return {"nproc": os.cpu_count(), "cpu_model": harness.cpu_model(),
            "kernel": os.uname().release,
            "python": sys.version.split()[0], "unbound": version(["unbound", "-V"]),
            "knotd": version(["knotd", "--version"]), "dnsmasq": version(["dnsmasq", "--version"]),
            "nft": version(["nft", "--version"])}


# --- the run ---------------------------------------------------------------------------------


def make_phases(args: argparse.Namespace) -> list[Phase]:
    durations = (8.0, 6.0, 15.0, 20.0) if args.quick else (15.0, 10.0, 30.0, 45.0)
    names = ("warm-up", "baseline", "throttled", "recovered")
    return [Phase(n, d, 0.0, n == "throttled") for n, d in zip(names, durations, strict=True)]


def bench(args: argparse.Namespace, python: str) -> int:
    import trio

    from resolver.bench import loadgen

    os.sched_setaffinity(0, {LOAD_CORE})  # children inherit core 0 unless taskset says 1
    args.out.mkdir(parents=True, exist_ok=True)
    namespace = os.environ.get(NETNS_ENV)
    if namespace is None:
        raise SystemExit("incident.py needs root (a private network namespace and nftables); "
                         "no Python throttling proxy is implemented")
    check_addresses()
    hold = args.hold if args.hold is not None else (10.0 if args.quick else 30.0)
    b = args.primary_pps
    budgets = Budgets(b, max(1, b // 10), args.fallback_factor * b,
                      max(1, args.fallback_factor * b // 10), args.kernel_limit or b // 2, hold)
    phases = make_phases(args)
    trace, calibration = plan(phases, budgets, args.domains, args.miss_factor)
    expected_by_q = {q: expectation(*q, ZONE_SEED) for q in set(trace)}
    expected = [expected_by_q[q] for q in trace]
    prepared = loadgen.prepare(trace)
    for p in phases:
        log(f"phase {p.name}: {p.duration:g} s at {p.rate:g} q/s, throttle "
            f"{'on' if p.throttled else 'off'}, ideal-cache misses "
            f"{p.ideal_misses / p.duration:.0f}/s")
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python3", "bench/incident.py", *sys.argv[1:]]),
        "network_namespace": namespace, "machine": machine(), "git": harness.git_state(REPO),
        "loadavg_start": harness.loadavg(),
        "budgets": asdict(budgets), "n_domains": args.domains,
        "phases": [asdict(p) for p in phases], "calibration": calibration,
        "client_timeout_s": CLIENT_TIMEOUT_SECONDS, "kernel_limit_burst": LIMIT_BURST_PACKETS,
        "dnsmasq_cache_rr": dnsmasq_has_cache_rr(),
    }
    results: dict[str, Any] = {}
    run_class = make_run_class()

    harness.sigterm_as_interrupt()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="incident-")))
        nft = Nft(budgets.kernel_limit_pps)
        stack.callback(nft.close)
        knot = start_knot(tmp, args.domains)
        stack.callback(knot.stop)
        for server in args.servers.split(","):
            port = harness.free_port(LISTEN)
            if server == "resolver":
                process = start_resolver(tmp, port, python, budgets)
            elif server == "unbound":
                process = start_unbound(tmp, port)
            elif server == "dnsmasq":
                process = start_dnsmasq(tmp, port)
            else:
                raise SystemExit(f"unknown server {server!r}")
            try:
                wait_answering(process, LISTEN, port, f"ready.{ORIGIN}")
                log(f"{server} answering on {LISTEN}:{port} (pid {process.pid}); replaying")
                run = run_class(prepared, expected, phases, CLIENT_TIMEOUT_SECONDS, SOCKETS)
                run.trace = trace
                rep = trio.run(functools.partial(replay, port, run, phases, nft))
                if not process.alive():
                    log(f"WARNING: {server} died during the run:\n{process.log_tail()}")
            finally:
                process.stop()
            (args.out / process.log_path.name).write_bytes(process.log_path.read_bytes())
            results[server] = analyse(server, run, rep, phases, budgets,
                                      args.out / process.log_path.name)
            log(f"{server}: {results[server]['overall_correct_pct']}% correct, "
                f"{results[server]['upstream_packets_per_1000_queries']} upstream packets "
                "per 1000 queries")
        (args.out / "knotd.log").write_bytes(knot.log_path.read_bytes())
    meta["loadavg_end"] = harness.loadavg()
    report = {"meta": meta, "results": results, "targets": targets(results, budgets)}
    (args.out / "incident.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(results, phases, budgets)
    print(text)
    print(json.dumps(report["targets"], indent=2))
    (args.out / "incident-table.md").write_text(text + "\n")
    log(f"wrote {args.out / 'incident.json'}")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "incident")
    parser.add_argument("--quick", action="store_true",
                        help="phases 8/6/15/20 s instead of 15/10/30/45, hold 10 s")
    parser.add_argument("--servers", default="resolver,unbound,dnsmasq")
    parser.add_argument("--primary-pps", type=int, default=200, help="B: the primary's budget")
    parser.add_argument("--fallback-factor", type=int, default=3,
                        help="the fallback's budget in units of B")
    parser.add_argument("--kernel-limit", type=int, default=None,
                        help="N: the primary's undocumented limit in packets/s (default B/2)")
    parser.add_argument("--miss-factor", type=float, default=3.0,
                        help="ideal-cache misses per second in the throttled phase, in units of B")
    parser.add_argument("--domains", type=int, default=20000)
    parser.add_argument("--hold", type=float, default=None,
                        help="repoint_hold_seconds (default 30, 10 with --quick)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    python = harness.venv_python(VENV_PYTHON)
    if os.geteuid() == 0 and NETNS_ENV not in os.environ:
        if subprocess.run(["nft", "--version"], capture_output=True).returncode != 0:
            raise SystemExit("nft is not available: this benchmark needs nftables")
        return harness.run_in_namespace(
            Path(__file__), argv, python, namespace=f"incident-{os.getpid()}", env_var=NETNS_ENV,
            log=log, forward_signals=(signal.SIGTERM,))
    harness.reexec_in_venv(Path(__file__), argv, VENV_PYTHON)
    try:
        return bench(args, python)
    except KeyboardInterrupt:
        log("interrupted: children stopped, temp dir removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
