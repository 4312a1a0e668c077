"""The mail workload: deterministic, inside the generated zones, Zipf-skewed, MTA-ordered.

Statistical checks use fixed seeds and tolerances of five standard deviations of the binomial
count, so they fail for a wrong distribution, not by bad luck (p < 1e-6 per check).
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import dns.name
import dns.rdatatype
import dns.zone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.bench.authority import (
    REVERSE_HOSTS,
    REVERSE_ORIGIN,
    generate_reverse_zone,
    generate_zone,
)
from resolver.bench.workload import MailMix, messages, queries, write_dnsperf_file

ORIGIN = "test."
SIGMAS = 5.0
SAMPLE_MESSAGES = 20_000

mixes = st.builds(
    MailMix,
    outbound_fraction=st.floats(0.0, 1.0),
    dane_fraction=st.floats(0.0, 1.0),
    second_mx_probability=st.floats(0.0, 1.0),
    zipf_exponent=st.floats(0.0, 3.0),
    # Around REVERSE_HOSTS (254), where senders stop having PTR records.
    n_domains=st.sampled_from([1, 7, 253, 254, 255, 300]),
)
seeds = st.integers(0, 2**32)


@functools.cache
def zones(n_domains: int) -> tuple[dns.zone.Zone, dns.zone.Zone]:
    forward = dns.zone.from_text(generate_zone(ORIGIN, n_domains), origin=ORIGIN, relativize=False)
    reverse = dns.zone.from_text(
        generate_reverse_zone(ORIGIN, n_domains), origin=REVERSE_ORIGIN, relativize=False
    )
    return forward, reverse


def answer_kind(n_domains: int, name_text: str, rdtype_text: str) -> str:
    """Whether the zones answer with data or NXDOMAIN; anything else (NODATA, a CNAME, a name
    outside both zones) fails the test."""
    forward, reverse = zones(n_domains)
    name = dns.name.from_text(name_text)
    zone = next((z for z in (forward, reverse) if name.is_subdomain(z.origin)), None)
    assert zone is not None, f"{name_text} is in no zone knotd serves"
    node = zone.get_node(name)
    if node is None:
        # Not an empty non-terminal either: no owner lies below it (that would make it NODATA).
        assert not any(owner.is_subdomain(name) for owner in zone.nodes), name_text
        return "nxdomain"
    rdtype = dns.rdatatype.from_text(rdtype_text)
    assert node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME) is None, name_text
    assert node.get_rdataset(dns.rdataclass.IN, rdtype) is not None, (name_text, rdtype_text)
    return "data"


def first(mix: MailMix, seed: int, count: int) -> list[list[tuple[str, str]]]:
    return list(itertools.islice(messages(mix, seed), count))


def is_outbound(message: list[tuple[str, str]]) -> bool:
    return message[0][1] == "MX"


def message_domain(message: list[tuple[str, str]]) -> int:
    """The rank of the domain a message is to (its MX) or from (its SPF TXT at ``d{i}.O``)."""
    for name, rdtype in message:
        labels = name.split(".")
        if rdtype in ("MX", "TXT") and len(labels) == 3 and labels[0].startswith("d"):
            return int(labels[0][1:])
    raise AssertionError(f"no domain in {message}")


def zipf_share(n_domains: int, exponent: float, top: int) -> float:
    """Expected share of the ``top`` ranks, computed here independently of workload.py."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(n_domains)]
    return sum(weights[:top]) / sum(weights)


def assert_binomial(observed: int, trials: int, probability: float) -> None:
    sigma = math.sqrt(trials * probability * (1 - probability))
    expected = trials * probability
    assert abs(observed - expected) <= SIGMAS * sigma + 1, (observed, expected, sigma)


# -- structure, for any mix -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(mixes, seeds)
def test_same_seed_same_stream(mix: MailMix, seed: int) -> None:
    assert first(mix, seed, 300) == first(mix, seed, 300)
    flat = [lookup for message in first(mix, seed, 300) for lookup in message]
    assert queries(mix, seed, 500) == flat[:500]
    assert len(queries(mix, seed, 500)) == 500


@settings(max_examples=40, deadline=None)
@given(mixes, seeds)
def test_every_question_is_data_or_a_deliberate_nxdomain(mix: MailMix, seed: int) -> None:
    for message in first(mix, seed, 300):
        for name, rdtype in message:
            kind = answer_kind(mix.n_domains, name, rdtype)
            if kind == "nxdomain":
                # Only the PTR of a connecting address without one, in the served reverse zone.
                assert rdtype == "PTR" and name.endswith("." + REVERSE_ORIGIN), (name, rdtype)
                assert message_domain(message) >= REVERSE_HOSTS


@settings(max_examples=40, deadline=None)
@given(mixes, seeds)
def test_address_lookups_follow_the_record_that_named_the_host(mix: MailMix, seed: int) -> None:
    """An MTA asks for a host's address only after an MX (outbound) or a PTR (forward
    confirmation, inbound) gave it that host name."""
    forward, reverse = zones(mix.n_domains)
    for message in first(mix, seed, 200):
        learned: set[str] = set()
        for name, rdtype in message:
            owner = dns.name.from_text(name)
            if rdtype in ("A", "AAAA"):
                assert name in learned, (name, message)
            elif rdtype == "MX":
                learned |= {rd.exchange.to_text() for rd in forward.find_rdataset(owner, "MX")}
            elif rdtype == "PTR" and reverse.get_node(owner) is not None:
                learned |= {rd.target.to_text() for rd in reverse.find_rdataset(owner, "PTR")}
            elif rdtype == "TLSA":
                assert name.removeprefix("_25._tcp.") in learned, (name, message)


@settings(max_examples=40, deadline=None)
@given(mixes, seeds)
def test_message_shapes(mix: MailMix, seed: int) -> None:
    for message in first(mix, seed, 200):
        types = [rdtype for _, rdtype in message]
        if is_outbound(message):
            assert types[:3] == ["MX", "A", "AAAA"]
            assert set(types[3:]) <= {"TLSA", "A", "AAAA"}
        else:
            assert types[0] == "PTR"
            assert types[-3:] == ["TXT", "TXT", "TXT"]  # SPF, DKIM, DMARC


def test_mix_validation() -> None:
    with pytest.raises(ValueError):
        MailMix(outbound_fraction=1.5)
    with pytest.raises(ValueError):
        MailMix(n_domains=0)
    with pytest.raises(ValueError):
        MailMix(zipf_exponent=-1)
    assert MailMix(origin="Example").origin == "example."


def test_dnsperf_file(tmp_path: Path) -> None:
    lookups = queries(MailMix(), 1, 50)
    path = tmp_path / "queries.txt"
    assert write_dnsperf_file(path, lookups) == 50
    lines = path.read_text().splitlines()
    assert [tuple(line.split(" ")) for line in lines] == lookups


# -- distribution, fixed seeds ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_zipf_skew(seed: int) -> None:
    mix = MailMix(n_domains=1000, zipf_exponent=1.1)
    ranks = [message_domain(message) for message in first(mix, seed, SAMPLE_MESSAGES)]
    # The rank-0 provider alone: about 18% of all mail for these parameters.
    assert_binomial(ranks.count(0), SAMPLE_MESSAGES, zipf_share(1000, 1.1, 1))
    # The top 1% of domains (10): about 48%.
    top = mix.n_domains // 100
    assert_binomial(sum(rank < top for rank in ranks), SAMPLE_MESSAGES, zipf_share(1000, 1.1, top))
    # And the long tail is really drawn from: most of the domains appear at least once.
    assert len(set(ranks)) > mix.n_domains // 2


def test_uniform_when_exponent_is_zero() -> None:
    mix = MailMix(n_domains=50, zipf_exponent=0.0)
    ranks = [message_domain(message) for message in first(mix, 7, SAMPLE_MESSAGES)]
    for rank in (0, 25, 49):
        assert_binomial(ranks.count(rank), SAMPLE_MESSAGES, 1 / 50)


@pytest.mark.parametrize("seed", [1, 2])
def test_fractions(seed: int) -> None:
    mix = MailMix(
        outbound_fraction=0.3, dane_fraction=0.25, second_mx_probability=0.4, n_domains=1000
    )
    sample = first(mix, seed, SAMPLE_MESSAGES)
    outbound = [message for message in sample if is_outbound(message)]
    inbound = [message for message in sample if not is_outbound(message)]
    assert_binomial(len(outbound), SAMPLE_MESSAGES, 0.3)
    dane = sum(any(rdtype == "TLSA" for _, rdtype in message) for message in outbound)
    assert_binomial(dane, len(outbound), 0.25)
    second = sum(any(name.startswith("mx2.") for name, _ in message) for message in outbound)
    assert_binomial(second, len(outbound), 0.4)
    # Inbound senders beyond rank 253 connect from addresses without a PTR.
    beyond = sum(message_domain(message) >= REVERSE_HOSTS for message in inbound)
    without_ptr = sum(message[1][1] != "A" for message in inbound)  # no forward confirmation
    assert beyond == without_ptr
    assert_binomial(beyond, len(inbound), 1 - zipf_share(1000, 1.1, REVERSE_HOSTS))


def test_unknown_clients_are_mostly_distinct() -> None:
    """Connecting addresses without a PTR are a long tail: mostly cache misses, like spam."""
    mix = MailMix(outbound_fraction=0.0, n_domains=5000, zipf_exponent=0.5)
    names = [
        message[0][0] for message in first(mix, 1, 2000) if message_domain(message) >= REVERSE_HOSTS
    ]
    assert len(names) > 1000
    assert len(set(names)) > 0.95 * len(names)
