"""Mail-shaped DNS traffic: the lookups an MTA makes, per message, over the zones of ``authority``.

Pure and seeded: no I/O except ``write_dnsperf_file``, and the same ``(mix, seed)`` always gives
the same stream, so a benchmark run can be repeated and a failing test reproduced.

What one message costs in DNS (DESIGN.md section 1), with ``d`` = ``d{i}.<origin>``:

- Outbound (we deliver to ``d``): ``d MX``; then ``mx1.d A`` and ``mx1.d AAAA``; for a DANE
  share ``_25._tcp.mx1.d TLSA`` (RFC 7672 section 3: TLSA is looked up for the MX host, after
  its addresses); with some probability the MTA also tries the second MX (``mx2.d A``/``AAAA``),
  as when the first is busy or the MTA resolves every MX host up front.
- Inbound (``d`` sends to us): ``PTR`` of the connecting address, then, when it has a name, the
  forward ``A`` of that name (forward-confirmed reverse DNS, what Postfix does for every
  client); then SPF ``d TXT`` (at MAIL FROM), DKIM ``sel1._domainkey.d TXT`` (after DATA) and
  DMARC ``_dmarc.d TXT`` (after DKIM, RFC 7489 section 6.6).

Domain popularity is Zipf-like: rank ``r`` (domain ``d{r}``) has weight ``1 / (r + 1) ** s``.
With the default ``s = 1.1`` over 5000 domains, ``d0`` takes about 16% of all mail and the top
1% (50 domains) about 60%: a few giant mailbox providers and a long tail.

Invariants (tested in ``tests/test_workload.py``):

1. Every ``(name, type)`` is data in ``authority.generate_zone`` / ``generate_reverse_zone``
   built with the same ``origin`` and ``n_domains``, or a deliberate NXDOMAIN: only PTR
   questions for unknown connecting addresses are NXDOMAIN.
2. Within a message, an MX question comes before the address questions of its hosts.
3. The same ``(mix, seed)`` gives the same messages.

Unknown connecting addresses: only the first ``authority.REVERSE_HOSTS`` (254) domains send
from an address with a PTR (``192.0.2.{i + 1}``, their mx1). A message from any other domain
comes from an address without one. The natural choice, a random address in 198.51.100.0/24,
has its reverse name in a zone knotd does not serve, so knotd would answer REFUSED, not
NXDOMAIN, and a forwarder in front of it would turn that into SERVFAIL. So the PTR question
for an unknown address is a name *below* the reverse zone that has no node,
``{a}.{b}.2.0.192.in-addr.arpa.`` with ``a`` and ``b`` random octets: knotd is authoritative
for it and answers NXDOMAIN, and the 65536 possible names keep the long tail of connecting
addresses (mostly distinct, so mostly cache misses) that real inbound traffic has.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from resolver.bench.authority import (
    DEFAULT_ORIGIN,
    REVERSE_HOSTS,
    REVERSE_ORIGIN,
    mx1_ipv4,
    reverse_name,
)

Lookup = tuple[str, str]  # (owner name with a trailing dot, RR type mnemonic)

# How many random octet labels an unknown connecting address gets below the reverse zone: two
# give 65536 distinct NXDOMAIN names (see the module docstring for why not a real address).
UNKNOWN_CLIENT_LABELS = 2


@dataclass(frozen=True)
class MailMix:
    """The shape of the mail traffic. Fractions are probabilities per message, in [0, 1]."""

    outbound_fraction: float = 0.5
    """Share of messages we send (MX → A/AAAA); the rest are received (PTR, SPF, DKIM, DMARC)."""

    dane_fraction: float = 0.1
    """Share of outbound messages whose MTA looks up TLSA for the MX host (RFC 7672)."""

    second_mx_probability: float = 0.2
    """Share of outbound messages where the MTA also resolves the second MX host."""

    zipf_exponent: float = 1.1
    """``s`` in weight ``1 / (rank + 1) ** s``; 0 is uniform, larger is more skewed."""

    n_domains: int = 200
    """How many ``d{i}`` domains exist; match the ``n_domains`` of the zone being served (the
    default matches ``authority.Knot``)."""

    origin: str = DEFAULT_ORIGIN
    """The forward zone, as in ``authority.generate_zone``."""

    def __post_init__(self) -> None:
        for field in ("outbound_fraction", "dane_fraction", "second_mx_probability"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be in [0, 1], not {value!r}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, not {self.zipf_exponent!r}")
        if self.n_domains < 1:
            raise ValueError(f"n_domains must be >= 1, not {self.n_domains!r}")
        if not self.origin.endswith("."):
            # The zone generator appends the dot itself; names here must match its owners.
            object.__setattr__(self, "origin", self.origin + ".")
        object.__setattr__(self, "origin", self.origin.lower())


@functools.lru_cache(maxsize=8)
def zipf_cdf(n_domains: int, exponent: float) -> tuple[float, ...]:
    """Cumulative (unnormalised) weights of ranks ``0 .. n_domains - 1``; cached, since a run
    draws millions of domains from the same table."""
    return tuple(itertools.accumulate(1.0 / (rank + 1) ** exponent for rank in range(n_domains)))


def draw_domain(cdf: tuple[float, ...], rng: random.Random) -> int:
    """A domain rank drawn from ``cdf`` by inverse transform (bisect on the cumulative table)."""
    point = rng.random() * cdf[-1]
    # random() < 1, but the product can round up to cdf[-1]; never return past the last rank.
    return min(bisect.bisect_right(cdf, point), len(cdf) - 1)


def outbound_lookups(mix: MailMix, index: int, rng: random.Random) -> list[Lookup]:
    """The lookups for delivering one message to ``d{index}``."""
    domain = f"d{index}.{mix.origin}"
    mx1 = f"mx1.{domain}"
    lookups: list[Lookup] = [(domain, "MX"), (mx1, "A"), (mx1, "AAAA")]
    # Draw both decisions every time, so one knob does not shift the random stream of the other.
    dane = rng.random() < mix.dane_fraction
    second_mx = rng.random() < mix.second_mx_probability
    if dane:
        lookups.append((f"_25._tcp.{mx1}", "TLSA"))
    if second_mx:
        mx2 = f"mx2.{domain}"
        lookups += [(mx2, "A"), (mx2, "AAAA")]
    return lookups


def unknown_client_ptr(rng: random.Random) -> str:
    """The PTR question for a connecting address without a PTR: NXDOMAIN in the reverse zone."""
    octets = [str(rng.randrange(256)) for _ in range(UNKNOWN_CLIENT_LABELS)]
    return ".".join(octets) + "." + REVERSE_ORIGIN


def inbound_lookups(mix: MailMix, index: int, rng: random.Random) -> list[Lookup]:
    """The lookups for receiving one message from ``d{index}``."""
    domain = f"d{index}.{mix.origin}"
    lookups: list[Lookup]
    if index < REVERSE_HOSTS:
        # The sender connects from its mx1, whose PTR names it; confirm the name forwards.
        lookups = [(reverse_name(mx1_ipv4(index)), "PTR"), (f"mx1.{domain}", "A")]
    else:
        lookups = [(unknown_client_ptr(rng), "PTR")]
    lookups += [
        (domain, "TXT"),
        (f"sel1._domainkey.{domain}", "TXT"),
        (f"_dmarc.{domain}", "TXT"),
    ]
    return lookups


def messages(mix: MailMix, seed: int) -> Iterator[list[Lookup]]:
    """Each message's lookups, in the order the MTA makes them. Endless: bound it yourself
    (``itertools.islice``, or ``queries``)."""
    rng = random.Random(seed)
    cdf = zipf_cdf(mix.n_domains, mix.zipf_exponent)
    while True:
        index = draw_domain(cdf, rng)
        if rng.random() < mix.outbound_fraction:
            yield outbound_lookups(mix, index, rng)
        else:
            yield inbound_lookups(mix, index, rng)


def queries(mix: MailMix, seed: int, count: int) -> list[Lookup]:
    """The first ``count`` lookups of ``messages(mix, seed)``, flattened (the last message may
    be cut short)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count!r}")
    flat: list[Lookup] = []
    for lookups in messages(mix, seed):
        if len(flat) >= count:
            break
        flat += lookups
    del flat[count:]
    return flat


def write_dnsperf_file(path: str | Path, lookups: Iterable[Lookup]) -> int:
    """Write ``lookups`` as a dnsperf/resperf query file (``name TYPE`` per line); returns the
    number of lines."""
    lines = [f"{name} {rdtype}\n" for name, rdtype in lookups]
    Path(path).write_text("".join(lines), encoding="ascii")
    return len(lines)
