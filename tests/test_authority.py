"""The generated zones are valid and knotd serves them as the integration tests expect."""

from __future__ import annotations

import os

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.zone
import pytest

from resolver.bench import authority
from resolver.bench.authority import (
    REVERSE_ORIGIN,
    Knot,
    generate_reverse_zone,
    generate_zone,
    query_names,
)

from conftest import require_binary

TIMEOUT = 2.0


def forward_zone(n_domains: int = 5, seed: int = 1) -> dns.zone.Zone:
    return dns.zone.from_text(
        generate_zone("test.", n_domains, seed), origin="test.", relativize=False
    )


def reverse_zone(n_domains: int = 5) -> dns.zone.Zone:
    return dns.zone.from_text(
        generate_reverse_zone("test.", n_domains), origin=REVERSE_ORIGIN, relativize=False
    )


def test_soa_values_and_negative_ttl() -> None:
    zone = forward_zone()
    soa_rdataset = zone.find_rdataset("test.", "SOA")
    assert soa_rdataset.ttl == authority.SOA_TTL == 600
    assert soa_rdataset[0].minimum == authority.SOA_MINIMUM == 300
    assert authority.NEGATIVE_TTL == 300
    assert zone.find_rdataset("test.", "NS")[0].target.to_text() == "ns1.test."


def test_mail_domain_records() -> None:
    zone = forward_zone()
    mx = zone.find_rdataset("d3.test.", "MX")
    assert mx.ttl == authority.TTL_MX
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx1.d3.test."),
        (20, "mx2.d3.test."),
    ]
    for host in ("mx1.d3.test.", "mx2.d3.test."):
        assert zone.find_rdataset(host, "A").ttl == authority.TTL_ADDRESS
        assert zone.find_rdataset(host, "AAAA").ttl == authority.TTL_ADDRESS
    assert zone.find_rdataset("mx1.d3.test.", "A")[0].address == "192.0.2.4"
    spf = b"".join(zone.find_rdataset("d3.test.", "TXT")[0].strings)
    assert spf.startswith(b"v=spf1 ")
    dmarc = b"".join(zone.find_rdataset("_dmarc.d3.test.", "TXT")[0].strings)
    assert dmarc.startswith(b"v=DMARC1; ")
    tlsa = zone.find_rdataset("_25._tcp.mx1.d3.test.", "TLSA")[0]
    assert (tlsa.usage, tlsa.selector, tlsa.mtype, len(tlsa.cert)) == (3, 1, 1, 32)


def test_dkim_key_is_long_and_split_into_character_strings() -> None:
    dkim = forward_zone().find_rdataset("sel1._domainkey.d0.test.", "TXT")[0]
    assert len(dkim.strings) == 2
    assert all(len(part) <= 255 for part in dkim.strings)
    joined = b"".join(dkim.strings)
    assert joined.startswith(b"v=DKIM1; k=rsa; p=")
    assert 380 <= len(joined) <= 450


def test_cname_chain_ends_at_an_address() -> None:
    zone = forward_zone()
    assert zone.find_rdataset("www.d2.test.", "CNAME")[0].target.to_text() == "alias.d2.test."
    assert zone.find_rdataset("alias.d2.test.", "CNAME")[0].target.to_text() == "mx1.d2.test."
    assert zone.get_rdataset("mx1.d2.test.", "A") is not None


def test_special_names() -> None:
    zone = forward_zone()
    big = zone.find_rdataset("big.test.", "TXT")
    assert sum(len(b"".join(r.strings)) for r in big) > 1500
    assert [dns.rdatatype.to_text(r.rdtype) for r in zone.find_node("nodata.test.")] == ["A"]
    assert zone.get_node("nx1.test.") is None


def test_reverse_zone_points_at_mx_hosts() -> None:
    zone = reverse_zone(5)
    ptr = zone.find_rdataset("1.2.0.192.in-addr.arpa.", "PTR")
    assert ptr.ttl == authority.TTL_PTR
    assert ptr[0].target.to_text() == "mx1.d0.test."
    assert zone.get_node("6.2.0.192.in-addr.arpa.") is None  # only 5 domains
    # The reverse zone cannot hold more than one /24's worth of PTRs.
    big = dns.zone.from_text(
        generate_reverse_zone("test.", 1000), origin=REVERSE_ORIGIN, relativize=False
    )
    assert len([name for name in big.nodes if big[name].get_rdataset(1, dns.rdatatype.PTR)]) == 254


def test_generation_is_deterministic_per_seed() -> None:
    assert generate_zone(n_domains=3, seed=7) == generate_zone(n_domains=3, seed=7)
    assert generate_zone(n_domains=3, seed=7) != generate_zone(n_domains=3, seed=8)


def test_other_origin() -> None:
    zone = dns.zone.from_text(generate_zone("mail.example.", 2), origin="mail.example.")
    assert zone.get_rdataset("d1", "MX") is not None


def test_query_names_cover_every_type_and_exist() -> None:
    names = query_names("test.", 5)
    assert {rdtype for _, rdtype in names} == {"MX", "A", "AAAA", "TXT", "TLSA", "PTR"}
    forward, reverse = forward_zone(5), reverse_zone(5)
    for name, rdtype in names:
        zone = reverse if name.endswith(REVERSE_ORIGIN) else forward
        if name.startswith(("nx1.", "nodata.")):
            continue  # the negative questions, checked in test_special_names
        node = zone.get_node(name)
        assert node is not None, name
        found = node.get_rdataset(1, dns.rdatatype.from_text(rdtype)) or node.get_rdataset(
            1, dns.rdatatype.CNAME
        )
        assert found is not None, (name, rdtype)
    assert ("nodata.test.", "MX") in names and ("nx1.test.", "A") in names


# -- knotd ----------------------------------------------------------------------------------


def ask_tcp(knot: Knot, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
    return dns.query.tcp(query, knot.address, port=knot.port, timeout=TIMEOUT)


def test_knot_answers_mail_types_over_tcp(knot: Knot) -> None:
    for name, rdtype in [
        ("d1.test.", "MX"),
        ("d1.test.", "TXT"),
        ("_dmarc.d1.test.", "TXT"),
        ("sel1._domainkey.d1.test.", "TXT"),
        ("_25._tcp.mx1.d1.test.", "TLSA"),
        ("mx2.d1.test.", "AAAA"),
        ("2.2.0.192.in-addr.arpa.", "PTR"),
    ]:
        reply = ask_tcp(knot, name, rdtype)
        assert reply.rcode() == dns.rcode.NOERROR, (name, rdtype)
        assert reply.flags & dns.flags.AA
        assert [dns.rdatatype.to_text(rrset.rdtype) for rrset in reply.answer] == [rdtype]
    ptr = ask_tcp(knot, "2.2.0.192.in-addr.arpa.", "PTR")
    assert ptr.answer[0][0].target.to_text() == "mx1.d1.test."


def test_knot_follows_the_cname_chain(knot: Knot) -> None:
    reply = ask_tcp(knot, "www.d4.test.", "A")
    assert [
        (rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype)) for rrset in reply.answer
    ] == [
        ("www.d4.test.", "CNAME"),
        ("alias.d4.test.", "CNAME"),
        ("mx1.d4.test.", "A"),
    ]


def test_knot_big_txt_truncated_over_udp_whole_over_tcp(knot: Knot) -> None:
    query = dns.message.make_query("big.test.", "TXT", use_edns=0, payload=1232)
    over_udp = dns.query.udp(query, knot.address, port=knot.port, timeout=TIMEOUT)
    assert over_udp.flags & dns.flags.TC
    over_tcp = ask_tcp(knot, "big.test.", "TXT")
    assert not over_tcp.flags & dns.flags.TC
    assert len(over_tcp.answer[0]) == authority.BIG_TXT_COUNT


def test_knot_negative_answers(knot: Knot) -> None:
    nx = ask_tcp(knot, "nx1.test.", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.answer == []
    assert [dns.rdatatype.to_text(rrset.rdtype) for rrset in nx.authority] == ["SOA"]
    nodata = ask_tcp(knot, "nodata.test.", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR
    assert nodata.answer == []
    assert [dns.rdatatype.to_text(rrset.rdtype) for rrset in nodata.authority] == ["SOA"]
    # Knot puts the SOA in the authority section with TTL min(SOA TTL, MINIMUM) (RFC 2308 §3).
    assert nodata.authority[0].ttl == authority.NEGATIVE_TTL


def test_knot_stop_ends_the_process_and_cleans_up() -> None:
    knotd = require_binary("knotd")
    server = Knot(n_domains=2, knotd=knotd).start()
    pid, workdir = server.pid, server.workdir
    assert pid is not None and workdir.is_dir()
    reply = ask_tcp(server, "d1.test.", "MX")
    assert reply.rcode() == dns.rcode.NOERROR
    server.stop()
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped by stop(), so the PID no longer exists


def test_knot_on_ipv6_loopback() -> None:
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6 on this host")
    knotd = require_binary("knotd")
    try:
        server = Knot(address="::1", n_domains=2, knotd=knotd).start()
    except OSError as error:  # ::1 can be absent even when the kernel has IPv6
        pytest.skip(f"cannot bind ::1: {error}")
    try:
        assert ask_tcp(server, "d0.test.", "MX").rcode() == dns.rcode.NOERROR
    finally:
        server.stop()
