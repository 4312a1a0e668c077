"""ENA counters: parsing `ethtool -S` output and which upstreams an increase implicates."""

from __future__ import annotations

from resolver.core import ena
from resolver.core.model import Endpoint, Outcome
from resolver.core.pool import Pool, Role, UpstreamSpec

ETHTOOL = """NIC statistics:
     tx_timeout: 0
     queue_0_tx_cnt: 918273
     bw_in_allowance_exceeded: 0
     bw_out_allowance_exceeded: 0
     pps_allowance_exceeded: {pps}
     conntrack_allowance_exceeded: 0
     linklocal_allowance_exceeded: {linklocal}
"""


def sample(linklocal: int, pps: int = 0) -> dict[str, int]:
    return ena.parse_ethtool(ETHTOOL.format(linklocal=linklocal, pps=pps))


def test_parse_ethtool() -> None:
    counters = sample(17, 3)
    assert counters[ena.LINKLOCAL] == 17 and counters[ena.PPS] == 3
    assert counters["queue_0_tx_cnt"] == 918273
    assert "NIC statistics" not in counters


def test_increases_ignore_resets() -> None:
    assert ena.increases(sample(10), sample(15)) == {ena.LINKLOCAL: 5}
    assert ena.increases(sample(15), sample(0)) == {}  # driver reload


def make_pool() -> Pool:
    return Pool([UpstreamSpec(Endpoint("10.0.0.2", 53), Role.PRIMARY),
                 UpstreamSpec(Endpoint("169.254.169.253", 53), Role.FALLBACK, 900)], 0.0)


def test_linklocal_increase_implicates_the_vpc_resolver_we_send_to() -> None:
    pool = make_pool()
    cluster, vpc = pool.upstreams
    for upstream in (cluster, vpc):
        pool.on_sent(upstream, 1.0)
        pool.report(upstream, Outcome.OK, 0.001, 1.0)
    found = list(ena.evidence(sample(10), sample(40), pool.upstreams, 1.5))
    assert [u.endpoint for u, _ in found] == [vpc.endpoint]
    assert "linklocal_allowance_exceeded rose by 30" in found[0][1]


def test_no_evidence_against_an_upstream_we_are_not_sending_to() -> None:
    pool = make_pool()
    assert list(ena.evidence(sample(10), sample(40), pool.upstreams, 1.5)) == []


def test_pps_allowance_implicates_everyone_we_send_to() -> None:
    pool = make_pool()
    for upstream in pool.upstreams:
        pool.on_sent(upstream, 1.0)
    found = list(ena.evidence(sample(0, 0), sample(0, 9), pool.upstreams, 1.5))
    assert len(found) == 2 and all("pps_allowance_exceeded" in e for _, e in found)


def test_evidence_throttles_the_vpc_resolver_and_repoints_nothing_else() -> None:
    pool = make_pool()
    vpc = pool.upstreams[1]
    pool.on_sent(vpc, 1.0)
    for upstream, evidence in ena.evidence(sample(0), sample(5), pool.upstreams, 1.5):
        pool.note_external(upstream, evidence, 1.5)
    assert vpc.state.value == "throttled" and vpc.bucket.rate == 900 * 0.7
