"""The fleet model behind `resolver bench plan`: upstream packets per second from mail volume.

Pure: numbers in, numbers out, no I/O and no clock. The formula, its assumptions and a worked
example are in ``docs/fleet-model.md``; in short:

- Messages arrive at ``messages_per_second`` (λ). Each message picks a domain by Zipf
  popularity, ``p_r = (r + 1) ** -s / H(N, s)`` over ranks ``r = 0 .. N - 1``, and makes the
  lookups of its ``LookupKind`` table (the mail mix of ``workload.py`` by default).
- A cache key (one ``(name, type)``) requested as a Poisson stream of rate ``q`` with TTL ``T``
  misses, then hits for ``T`` seconds, then waits for the next request, which misses. The misses
  form a renewal process with mean gap ``T + 1/q``, so in steady state the key misses
  ``q / (1 + q T)`` times per second (exact for Poisson arrivals: the classic TTL-cache result).
  Popular keys cost ``1/T`` per second each, rare keys cost every request.
- Expected upstream queries per second are the sum of that over every key; upstream packets are
  that times ``overhead_factor`` (UDP retries after loss, the rare TCP fallback).
- From a cold cache, over the first ``horizon_seconds``, a key misses
  ``sum_k P(S_k <= t)`` times, ``S_k`` the time of its k-th miss (``expected_misses``); for
  ``t < T`` that is just ``1 - exp(-q t)``, the chance it was asked at all.

Invariants (tested in ``tests/test_plan.py``): the predicted miss rate never exceeds the client
query rate; it falls as TTLs grow and rises with the message rate and the number of domains;
with TTL 0 every query misses; hosts and interfaces needed are the least that keep every
interface within the usable allowance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from resolver.bench import authority, workload

DEFAULT_ALLOWANCE_PPS = 1024.0  # AWS: packets/s per network interface to link-local services
DEFAULT_MARGIN = 0.25  # plan to use at most 75 % of the allowance: bursts ride above the mean
DEFAULT_OVERHEAD = 1.05  # upstream packets per miss: UDP retries on loss, rare TCP fallback
MAX_EXACT_RENEWALS = 8  # past this many TTL windows in the horizon, the renewal asymptote is exact
MAX_HOSTS = 1_000_000  # bound of the search for the number of hosts


@dataclass(frozen=True)
class LookupKind:
    """One lookup a message makes, and the cache keys it falls on."""

    key: str
    """The cache key's label; kinds with the same label share one key per domain (the mx1 A of
    an outbound delivery and of an inbound forward-confirmed reverse lookup)."""
    per_message: float
    """Expected lookups of this kind per message to or from a domain of the covered ranks."""
    ttl_seconds: float
    """How long the answer is cached (the negative TTL for NXDOMAIN, RFC 2308 section 5)."""
    first_rank: int = 0
    """Only domains of rank ``first_rank`` .."""
    end_rank: int | None = None
    """.. up to ``end_rank`` (exclusive; None: all) make this lookup."""
    pool_size: int | None = None
    """None: one key per domain. K: the name is drawn uniformly from K names, whatever the
    domain (the PTR of a connecting address without a PTR record)."""


def mail_kinds(mix: workload.MailMix | None = None,
               ttl_override_seconds: float | None = None) -> tuple[LookupKind, ...]:
    """The lookup table of ``workload.messages`` with the TTLs of ``authority`` (or all set to
    ``ttl_override_seconds``)."""
    mix = mix or workload.MailMix()
    out, inbound = mix.outbound_fraction, 1.0 - mix.outbound_fraction

    def ttl(seconds: float) -> float:
        return seconds if ttl_override_seconds is None else ttl_override_seconds

    known = authority.REVERSE_HOSTS
    return (
        LookupKind("MX d", out, ttl(authority.TTL_MX)),
        LookupKind("A mx1", out, ttl(authority.TTL_ADDRESS)),
        LookupKind("A mx1", inbound, ttl(authority.TTL_ADDRESS), end_rank=known),
        LookupKind("AAAA mx1", out, ttl(authority.TTL_ADDRESS)),
        LookupKind("TLSA mx1", out * mix.dane_fraction, ttl(authority.TTL_TLSA)),
        LookupKind("A mx2", out * mix.second_mx_probability, ttl(authority.TTL_ADDRESS)),
        LookupKind("AAAA mx2", out * mix.second_mx_probability, ttl(authority.TTL_ADDRESS)),
        LookupKind("PTR known", inbound, ttl(authority.TTL_PTR), end_rank=known),
        LookupKind("PTR unknown", inbound, ttl(authority.NEGATIVE_TTL), first_rank=known,
                   pool_size=256 ** workload.UNKNOWN_CLIENT_LABELS),
        LookupKind("TXT spf", inbound, ttl(authority.TTL_TXT)),
        LookupKind("TXT dkim", inbound, ttl(authority.TTL_TXT)),
        LookupKind("TXT dmarc", inbound, ttl(authority.TTL_TXT)),
    )


def uniform_kinds(queries_per_message: float, ttl_seconds: float) -> tuple[LookupKind, ...]:
    """A generic profile: ``queries_per_message`` distinct per-domain keys, one TTL. A fractional
    count becomes whole keys plus one key asked with that probability."""
    if queries_per_message <= 0:
        raise ValueError(f"queries_per_message must be positive, not {queries_per_message!r}")
    whole, fraction = int(queries_per_message), queries_per_message % 1.0
    kinds = [LookupKind(f"key{n}", 1.0, ttl_seconds) for n in range(whole)]
    if fraction > 1e-12:
        kinds.append(LookupKind(f"key{whole}", fraction, ttl_seconds))
    return tuple(kinds)


@functools.lru_cache(maxsize=8)
def zipf_probabilities(n_domains: int, exponent: float) -> tuple[float, ...]:
    """``p_r`` for ranks ``0 .. n_domains - 1``, the weights of ``workload.zipf_cdf`` normalised."""
    if n_domains < 1:
        raise ValueError(f"n_domains must be >= 1, not {n_domains!r}")
    if exponent < 0:
        raise ValueError(f"zipf exponent must be >= 0, not {exponent!r}")
    weights = [1.0 / (rank + 1) ** exponent for rank in range(n_domains)]
    total = math.fsum(weights)
    return tuple(weight / total for weight in weights)


def steady_miss_rate(rate: float, ttl_seconds: float) -> float:
    """Misses per second of one key asked ``rate`` times a second (Poisson), cached ``ttl``."""
    return rate / (1.0 + rate * ttl_seconds)


def _erlang_cdf(k: int, rate: float, x: float) -> float:
    """P(sum of k Exp(rate) <= x) = P(Poisson(rate x) >= k)."""
    if x <= 0:
        return 0.0
    mean = rate * x
    if k == 1:
        return -math.expm1(-mean)
    below = math.fsum(math.exp(-mean + j * math.log(mean) - math.lgamma(j + 1)) for j in range(k))
    return max(0.0, 1.0 - below)


def expected_misses(rate: float, ttl_seconds: float, horizon_seconds: float) -> float:
    """Expected misses of one key in ``[0, horizon]`` starting from an empty cache.

    The k-th miss comes at ``S_k = E_1 + .. + E_k + (k - 1) T`` (``E_j`` exponential waits for
    the next request after each TTL window), so the count is ``sum_k P(S_k <= t)``. Past
    ``MAX_EXACT_RENEWALS`` windows the renewal asymptote ``t / m + E[G^2] / (2 m^2) - E[E_1] / m``
    (gap ``G = T + E``, ``m = E[G]``) is used; it is exact to within a hair there.
    """
    if rate <= 0 or horizon_seconds <= 0:
        return 0.0
    if ttl_seconds <= 0:
        return rate * horizon_seconds  # nothing is cached: every request misses
    renewals = math.floor(horizon_seconds / ttl_seconds) + 1
    if renewals <= MAX_EXACT_RENEWALS:
        return math.fsum(_erlang_cdf(k, rate, horizon_seconds - (k - 1) * ttl_seconds)
                         for k in range(1, renewals + 1))
    mean_gap = ttl_seconds + 1.0 / rate
    second_moment = 1.0 / rate**2 + mean_gap**2
    return (horizon_seconds / mean_gap + second_moment / (2 * mean_gap**2)
            - (1.0 / rate) / mean_gap)


@dataclass(frozen=True)
class Workload:
    """The traffic shape: domains, popularity and lookups; the message rate is separate."""

    n_domains: int
    zipf_exponent: float
    kinds: tuple[LookupKind, ...]

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("no lookup kinds")
        ttls: dict[str, float] = {}
        for kind in self.kinds:
            if kind.per_message < 0 or kind.ttl_seconds < 0:
                raise ValueError(f"{kind.key}: per_message and ttl_seconds must be >= 0")
            if ttls.setdefault(kind.key, kind.ttl_seconds) != kind.ttl_seconds:
                raise ValueError(f"{kind.key}: one key, one TTL")
        zipf_probabilities(self.n_domains, self.zipf_exponent)  # validates both

    def _mass(self, kind: LookupKind) -> float:
        """Share of messages whose domain is in the kind's ranks."""
        p = zipf_probabilities(self.n_domains, self.zipf_exponent)
        end = self.n_domains if kind.end_rank is None else min(kind.end_rank, self.n_domains)
        return math.fsum(p[kind.first_rank:end]) if kind.first_rank < end else 0.0

    @functools.cached_property
    def queries_per_message(self) -> float:
        return math.fsum(kind.per_message * self._mass(kind) for kind in self.kinds)

    @functools.cached_property
    def key_table(self) -> tuple[tuple[str, float, float, int], ...]:
        """Every cache key as ``(label, requests per message, TTL, how many such keys)``:
        multiply by the message rate for its request rate. Built once per workload."""
        p = zipf_probabilities(self.n_domains, self.zipf_exponent)
        per_domain: dict[str, list[float]] = {}
        ttls: dict[str, float] = {}
        rows: list[tuple[str, float, float, int]] = []
        for kind in self.kinds:
            if kind.pool_size is not None:
                share = kind.per_message * self._mass(kind) / kind.pool_size
                if share > 0:
                    rows.append((kind.key, share, kind.ttl_seconds, kind.pool_size))
                continue
            coefficients = per_domain.setdefault(kind.key, [0.0] * self.n_domains)
            ttls[kind.key] = kind.ttl_seconds
            end = self.n_domains if kind.end_rank is None else min(kind.end_rank, self.n_domains)
            for rank in range(kind.first_rank, end):
                coefficients[rank] += kind.per_message * p[rank]
        for key, coefficients in per_domain.items():
            rows += [(key, c, ttls[key], 1) for c in coefficients if c > 0]
        return tuple(rows)

    def misses_per_second(self, messages_per_second: float,
                          horizon_seconds: float | None = None) -> dict[str, float]:
        """Expected upstream queries per second by key label: steady state, or averaged over
        the first ``horizon_seconds`` from a cold cache."""
        by_key: dict[str, list[float]] = {}
        for key, per_message, ttl, count in self.key_table:
            rate = messages_per_second * per_message
            if horizon_seconds is None:
                misses = steady_miss_rate(rate, ttl)
            else:
                misses = expected_misses(rate, ttl, horizon_seconds) / horizon_seconds
            by_key.setdefault(key, []).append(count * misses)
        return {key: math.fsum(values) for key, values in by_key.items()}


@dataclass(frozen=True)
class PlanInput:
    messages_per_second: float
    """Mail messages per second, sent plus received, for the whole fleet."""
    workload: Workload
    hit_ratio: float | None = None
    """Measured share of client queries answered from the cache; None: the Zipf model's."""
    overhead_factor: float = DEFAULT_OVERHEAD
    """Upstream packets per upstream query (retries, TCP): 1.0 on a lossless link."""
    allowance_pps: float = DEFAULT_ALLOWANCE_PPS
    """Packets per second one network interface may send to the upstream."""
    margin: float = DEFAULT_MARGIN
    """Share of the allowance kept free: usable = allowance x (1 - margin)."""
    horizon_seconds: float | None = None
    """None: steady state. A number: the mean over that long from a cold cache."""

    def __post_init__(self) -> None:
        if self.messages_per_second <= 0:
            raise ValueError("messages_per_second must be positive")
        if self.hit_ratio is not None and not 0 <= self.hit_ratio <= 1:
            raise ValueError("hit_ratio must be in [0, 1]")
        if self.overhead_factor < 1:
            raise ValueError("overhead_factor must be >= 1 (a miss costs at least one packet)")
        if self.allowance_pps <= 0 or not 0 <= self.margin < 1:
            raise ValueError("allowance_pps must be positive and margin in [0, 1)")
        if self.horizon_seconds is not None and self.horizon_seconds <= 0:
            raise ValueError("horizon_seconds must be positive")

    @property
    def usable_pps(self) -> float:
        return self.allowance_pps * (1.0 - self.margin)


@dataclass(frozen=True)
class Prediction:
    messages_per_second: float
    queries_per_message: float
    client_queries_per_second: float
    upstream_queries_per_second: float
    hit_ratio: float
    hit_ratio_source: str  # "given" or "zipf model"
    upstream_packets_per_second: float
    upstream_packets_per_1000_queries: float
    usable_pps: float
    interfaces_needed: int  # on one host, one shared cache, traffic spread over interfaces
    hosts_needed: int  # one interface each, each with its own cache and 1/H of the messages
    per_host_packets_per_second: float  # at hosts_needed hosts
    misses_by_key: dict[str, float] = field(default_factory=dict)


def upstream_packets_per_second(plan: PlanInput, messages_per_second: float) -> float:
    """Upstream packets per second of one cache that sees ``messages_per_second``."""
    workload_ = plan.workload
    if plan.hit_ratio is not None:
        queries = messages_per_second * workload_.queries_per_message
        return queries * (1.0 - plan.hit_ratio) * plan.overhead_factor
    misses = workload_.misses_per_second(messages_per_second, plan.horizon_seconds)
    return math.fsum(misses.values()) * plan.overhead_factor


def hosts_needed(plan: PlanInput) -> int:
    """The fewest hosts (one cache and one interface each, messages split evenly) whose
    upstream rate each fits the usable allowance. The miss rate is concave in the message rate,
    so ``total / usable`` is a lower bound; search up from it by doubling, then bisect."""
    usable = plan.usable_pps
    total = upstream_packets_per_second(plan, plan.messages_per_second)
    low = max(1, math.ceil(total / usable - 1e-9))

    def fits(hosts: int) -> bool:
        return upstream_packets_per_second(plan, plan.messages_per_second / hosts) <= usable

    if fits(low):
        return low
    high = low * 2
    while not fits(high):
        if high >= MAX_HOSTS:
            raise ValueError(f"more than {MAX_HOSTS} hosts needed")
        low, high = high, min(high * 2, MAX_HOSTS)
    while high - low > 1:  # invariant: low does not fit, high fits
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def predict(plan: PlanInput) -> Prediction:
    workload_ = plan.workload
    queries_per_message = workload_.queries_per_message
    client_qps = plan.messages_per_second * queries_per_message
    if plan.hit_ratio is not None:
        misses_by_key: dict[str, float] = {}
        upstream_qps = client_qps * (1.0 - plan.hit_ratio)
        hit_ratio, source = plan.hit_ratio, "given"
    else:
        misses_by_key = workload_.misses_per_second(plan.messages_per_second,
                                                    plan.horizon_seconds)
        upstream_qps = math.fsum(misses_by_key.values())
        hit_ratio, source = 1.0 - upstream_qps / client_qps, "zipf model"
    packets = upstream_qps * plan.overhead_factor
    hosts = hosts_needed(plan)
    return Prediction(
        messages_per_second=plan.messages_per_second,
        queries_per_message=queries_per_message,
        client_queries_per_second=client_qps,
        upstream_queries_per_second=upstream_qps,
        hit_ratio=hit_ratio,
        hit_ratio_source=source,
        upstream_packets_per_second=packets,
        upstream_packets_per_1000_queries=1000.0 * packets / client_qps,
        usable_pps=plan.usable_pps,
        interfaces_needed=max(1, math.ceil(packets / plan.usable_pps - 1e-9)),
        hosts_needed=hosts,
        per_host_packets_per_second=upstream_packets_per_second(
            plan, plan.messages_per_second / hosts),
        misses_by_key=misses_by_key,
    )


def format_prediction(plan: PlanInput, prediction: Prediction) -> list[str]:
    """The terminal report, one line per figure."""
    p = prediction
    regime = ("steady state" if plan.horizon_seconds is None
              else f"mean of the first {plan.horizon_seconds:g} s from a cold cache")
    lines = [
        f"messages/s:                  {p.messages_per_second:g}",
        f"queries per message:         {p.queries_per_message:.3f}",
        f"client queries/s:            {p.client_queries_per_second:.1f}",
        f"hit ratio:                   {p.hit_ratio:.4f} ({p.hit_ratio_source}, {regime})",
        f"upstream queries/s:          {p.upstream_queries_per_second:.1f}",
        f"upstream packets/s:          {p.upstream_packets_per_second:.1f} "
        f"(x{plan.overhead_factor:g} overhead) per single host",
        f"upstream packets/1000 q:     {p.upstream_packets_per_1000_queries:.1f}",
        f"usable per interface:        {p.usable_pps:g} pps ({plan.allowance_pps:g} allowance, "
        f"{plan.margin:.0%} margin)",
        f"interfaces needed (1 host):  {p.interfaces_needed}",
        f"hosts needed (1 iface each): {p.hosts_needed} "
        f"({p.per_host_packets_per_second:.1f} pps each)",
    ]
    if p.misses_by_key:
        lines.append("upstream queries/s by lookup: " + ", ".join(
            f"{key} {value:.1f}" for key, value in sorted(
                p.misses_by_key.items(), key=lambda item: -item[1])))
    return lines


def build_workload(n_domains: int, zipf_exponent: float, queries_per_message: float | None,
                   ttl_seconds: float | None,
                   mix: workload.MailMix | None = None) -> Workload:
    """The mail mix (TTLs from ``authority``, or all ``ttl_seconds``), or, when
    ``queries_per_message`` is given, that many per-domain keys with ``ttl_seconds`` each
    (default: the address TTL, the shortest in the mail mix)."""
    if queries_per_message is not None:
        ttl = authority.TTL_ADDRESS if ttl_seconds is None else ttl_seconds
        kinds = uniform_kinds(queries_per_message, ttl)
    else:
        kinds = mail_kinds(mix, ttl_seconds)
    return Workload(n_domains, zipf_exponent, kinds)


def describe_kinds(kinds: Sequence[LookupKind]) -> str:
    return "; ".join(f"{k.key} x{k.per_message:g} ttl {k.ttl_seconds:g}" for k in kinds)
