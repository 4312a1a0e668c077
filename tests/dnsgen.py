"""Hypothesis strategies for DNS messages, built and serialised by dnspython (the test oracle).

Messages come out of dnspython's own renderer, so compression pointers, OPT placement and
section order are what a real implementation produces; the property tests then hold the
resolver's byte-level code to what dnspython reads back.
"""

from __future__ import annotations

import ipaddress
import string
from dataclasses import dataclass, field

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rrset
from hypothesis import strategies as st

IN = dns.rdataclass.IN
MAX_TTL_RFC2181 = 2**31 - 1  # RFC 2181 8: larger values mean zero
MAX_U32 = 2**32 - 1
MAX_NAME_WIRE_LEN = 255

RDTYPES = (
    dns.rdatatype.A,
    dns.rdatatype.AAAA,
    dns.rdatatype.MX,
    dns.rdatatype.TXT,
    dns.rdatatype.CNAME,
    dns.rdatatype.NS,
    dns.rdatatype.PTR,
    dns.rdatatype.SOA,
    dns.rdatatype.SRV,
)

_LDH = string.ascii_letters + string.digits + "-"

# Hostname-like labels most of the time; now and then a long one (to approach the 255-byte name
# limit) or raw bytes, where '\x00', '.' and uppercase non-letters test the byte handling.
_LDH_BYTES = _LDH.encode()
# One bytes draw mapped onto letters/digits/hyphen: far fewer choices than st.text, so the
# message strategies stay fast enough for hundreds of examples.
_ldh_labels = st.binary(min_size=1, max_size=10).map(
    lambda raw: bytes(_LDH_BYTES[b % len(_LDH_BYTES)] for b in raw))
# Repeating one drawn label keeps long labels cheap to generate (and to shrink).
_long_labels = st.builds(lambda label, size: (label * 63)[:size], _ldh_labels,
                         st.integers(40, 63))
labels = st.one_of(_ldh_labels, _ldh_labels, _long_labels, st.binary(min_size=1, max_size=8))


def _random_case(draw: st.DrawFn, label: bytes) -> bytes:
    flips = draw(st.integers(0, (1 << len(label)) - 1))  # one draw, bit i flips byte i
    return bytes(b ^ 0x20 if flips >> i & 1 and 0x41 <= (b & ~0x20) <= 0x5A else b
                 for i, b in enumerate(label))


@st.composite
def names(draw: st.DrawFn, min_labels: int = 1, max_labels: int = 5) -> dns.name.Name:
    """An absolute name of 1-5 labels that fits in 255 bytes of wire."""
    parts = draw(st.lists(labels, min_size=min_labels, max_size=max_labels))
    while sum(len(p) + 1 for p in parts) + 1 > MAX_NAME_WIRE_LEN:
        parts.pop()  # shrink rather than filter: long labels would make filtering wasteful
    return dns.name.Name([*parts, b""])


@st.composite
def recase(draw: st.DrawFn, name: dns.name.Name) -> dns.name.Name:
    """The same name with random ASCII letter case (what a 0x20-encoding client sends)."""
    return dns.name.Name([_random_case(draw, label) for label in name.labels])


_relations = st.sampled_from(("same", "child", "other"))


@st.composite
def related_names(draw: st.DrawFn, qname: dns.name.Name) -> dns.name.Name:
    """The question name, a name under it, or an unrelated one: all three compress differently."""
    how = draw(_relations)
    if how == "same":
        return qname
    if how == "child":
        child = draw(_ldh_labels)
        if len(qname.to_wire()) + len(child) + 1 <= MAX_NAME_WIRE_LEN:
            return dns.name.Name([child, *qname.labels])
    return draw(names())


ttls_any = st.one_of(
    st.integers(0, MAX_TTL_RFC2181),
    st.integers(0, 3600),
    st.integers(MAX_TTL_RFC2181 + 1, MAX_U32),  # RFC 2181 8: read as zero
)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, MAX_U32)


# Mostly short strings; sometimes long ones (up to the 255-byte limit) built cheaply, so
# replies cross the 512-byte and 1232-byte limits without huge draws.
txt_strings = st.one_of(
    st.binary(max_size=16),
    st.builds(lambda chunk, size: (chunk * 255)[:size], st.binary(min_size=1, max_size=4),
              st.integers(100, 255)),
)


@st.composite
def rdatas(draw: st.DrawFn, rdtype: int, near: dns.name.Name) -> dns.rdata.Rdata:
    """One rdata of rdtype; embedded names are drawn near `near` so pointers get exercised."""
    target = related_names(near)
    if rdtype == dns.rdatatype.A:
        return dns.rdtypes.IN.A.A(IN, rdtype, str(ipaddress.IPv4Address(draw(u32))))
    if rdtype == dns.rdatatype.AAAA:
        address = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
        return dns.rdtypes.IN.AAAA.AAAA(IN, rdtype, str(address))
    if rdtype == dns.rdatatype.MX:
        return dns.rdtypes.ANY.MX.MX(IN, rdtype, draw(u16), draw(target))
    if rdtype == dns.rdatatype.TXT:
        strings = draw(st.lists(txt_strings, min_size=1, max_size=3))
        return dns.rdtypes.ANY.TXT.TXT(IN, rdtype, strings)
    if rdtype == dns.rdatatype.CNAME:
        return dns.rdtypes.ANY.CNAME.CNAME(IN, rdtype, draw(target))
    if rdtype == dns.rdatatype.NS:
        return dns.rdtypes.ANY.NS.NS(IN, rdtype, draw(target))
    if rdtype == dns.rdatatype.PTR:
        return dns.rdtypes.ANY.PTR.PTR(IN, rdtype, draw(target))
    if rdtype == dns.rdatatype.SOA:
        return dns.rdtypes.ANY.SOA.SOA(IN, rdtype, draw(target), draw(target), draw(u32),
                                       draw(u32), draw(u32), draw(u32), draw(u32))
    if rdtype == dns.rdatatype.SRV:
        return dns.rdtypes.IN.SRV.SRV(IN, rdtype, draw(u16), draw(u16), draw(u16), draw(target))
    raise AssertionError(f"no strategy for {rdtype}")


@st.composite
def rrsets(draw: st.DrawFn, qname: dns.name.Name, ttls: st.SearchStrategy[int] = ttls_any,
           rdtype: int | None = None, owner: dns.name.Name | None = None) -> dns.rrset.RRset:
    rdtype = draw(st.sampled_from(RDTYPES)) if rdtype is None else rdtype
    owner = draw(related_names(qname)) if owner is None else owner
    items = draw(st.lists(rdatas(rdtype, qname), min_size=1, max_size=3))
    return dns.rrset.from_rdata_list(owner, draw(ttls), items)


@dataclass
class Edns:
    payload: int
    do: bool
    options: list[dns.edns.Option] = field(default_factory=list)


cookies = st.builds(lambda client: dns.edns.CookieOption(client, b""),
                    st.binary(min_size=8, max_size=8))
edns_options = st.lists(st.one_of(cookies, st.builds(
    lambda data: dns.edns.GenericOption(65001, data), st.binary(max_size=20))), max_size=2)


def ednses(options: bool = True) -> st.SearchStrategy[Edns | None]:
    return st.none() | st.builds(Edns, u16, st.booleans(),
                                 edns_options if options else st.just([]))


def _set_edns(message: dns.message.Message, edns: Edns | None) -> None:
    if edns is None:
        message.use_edns(False)
    else:
        message.use_edns(0, dns.flags.DO if edns.do else 0, edns.payload,
                         options=edns.options)


@dataclass
class QuerySpec:
    """What a client query was made from, so tests can state what the parser should see."""

    qname: dns.name.Name
    qtype: int
    qclass: int
    qid: int
    rd: bool
    cd: bool
    edns: Edns | None
    message: dns.message.Message
    wire: bytes


def make_query(qname: dns.name.Name, qtype: int, qclass: int, qid: int, rd: bool, cd: bool,
               edns: Edns | None) -> QuerySpec:
    message = dns.message.make_query(qname, qtype, qclass, id=qid)
    message.flags = (dns.flags.RD if rd else 0) | (dns.flags.CD if cd else 0)
    _set_edns(message, edns)
    return QuerySpec(qname, qtype, qclass, qid, rd, cd, edns, message, message.to_wire())


query_types = st.one_of(st.sampled_from(RDTYPES), u16.filter(lambda t: t != dns.rdatatype.OPT))


@st.composite
def queries(draw: st.DrawFn, qname: dns.name.Name | None = None,
            qtype: int | None = None, qclass: int | None = None,
            edns: st.SearchStrategy[Edns | None] | None = None) -> QuerySpec:
    """A client query; unset parameters are drawn (any type but OPT, any class but 0)."""
    return make_query(
        draw(names()) if qname is None else qname,
        draw(query_types) if qtype is None else qtype,
        draw(st.sampled_from((IN, IN, dns.rdataclass.CH, dns.rdataclass.ANY))
             | st.integers(1, 0xFFFF)) if qclass is None else qclass,
        draw(u16),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(ednses() if edns is None else edns),
    )


RCODES = (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL)
# Only expressible with an OPT record: the upper 8 bits live in its TTL (RFC 6891 6.1.3).
EXTENDED_RCODES = (dns.rcode.BADVERS, 23)  # 23 is BADCOOKIE (RFC 7873)


@dataclass
class ResponseSpec:
    message: dns.message.Message
    wire: bytes


def build_response(query: dns.message.Message, rcode: int, answer: list[dns.rrset.RRset],
                   authority: list[dns.rrset.RRset], additional: list[dns.rrset.RRset],
                   edns: Edns | None, flags: int = 0) -> ResponseSpec:
    """dnspython's reply to query; RRsets with a repeated (owner, type) in a section are
    dropped, because dnspython would merge them on parse and the TTL oracle would blur."""
    response = dns.message.make_response(query)
    response.flags |= flags
    _set_edns(response, edns)
    response.set_rcode(rcode)
    for section, rrs in ((response.answer, answer), (response.authority, authority),
                         (response.additional, additional)):
        seen: set[tuple[dns.name.Name, int]] = set()
        for rrset in rrs:
            if (rrset.name, rrset.rdtype) not in seen:
                seen.add((rrset.name, rrset.rdtype))
                section.append(rrset)
    # want_shuffle=False: dnspython would shuffle RRs with the global `random`, which makes
    # Hypothesis examples irreproducible; record order is not what is under test.
    return ResponseSpec(response, response.to_wire(max_size=65535, want_shuffle=False))


response_flags = st.sampled_from(
    (0, dns.flags.AA, dns.flags.RA, dns.flags.RA | dns.flags.AD, dns.flags.AA | dns.flags.CD))


@st.composite
def responses(draw: st.DrawFn, query: dns.message.Message | None = None) -> ResponseSpec:
    """Any reply the scanner must read: random sections, TTLs, rcode and EDNS."""
    if query is None:
        query = draw(queries(qclass=IN)).message
    qname = query.question[0].name
    edns = draw(ednses(options=False))
    rcodes = RCODES + EXTENDED_RCODES if edns is not None else RCODES
    soa_first = draw(st.booleans())
    authority = draw(st.lists(rrsets(qname), max_size=2))
    if soa_first:
        authority.insert(0, draw(rrsets(qname, rdtype=dns.rdatatype.SOA)))
    return build_response(
        query,
        draw(st.sampled_from(rcodes)),
        draw(st.lists(rrsets(qname), max_size=4)),
        authority,
        draw(st.lists(rrsets(qname), max_size=2)),
        edns,
        draw(response_flags),
    )


cacheable_ttls = st.integers(1, 86400)


@st.composite
def cacheable_responses(draw: st.DrawFn, query: dns.message.Message) -> ResponseSpec:
    """A reply the cache stores: positive (NOERROR with answers) or negative with an SOA first
    in authority (RFC 2308 5), TTLs within the cache's default clamps so aging is exact."""
    qname = query.question[0].name
    qtype = query.question[0].rdtype
    edns = draw(st.none() | st.builds(Edns, st.sampled_from((1232, 4096, 512)), st.booleans()))
    if draw(st.booleans()):
        answer = [draw(rrsets(qname, cacheable_ttls, rdtype=qtype, owner=qname))]
        answer += draw(st.lists(rrsets(qname, cacheable_ttls), max_size=3))
        authority = draw(st.lists(rrsets(qname, cacheable_ttls), max_size=2))
        rcode = dns.rcode.NOERROR
    else:
        answer = []
        soa = draw(rrsets(qname, cacheable_ttls, rdtype=dns.rdatatype.SOA))
        authority = [soa, *draw(st.lists(rrsets(qname, cacheable_ttls), max_size=2))]
        rcode = draw(st.sampled_from((dns.rcode.NOERROR, dns.rcode.NXDOMAIN)))
    additional = draw(st.lists(rrsets(qname, cacheable_ttls), max_size=3))
    return build_response(query, rcode, answer, authority, additional, edns,
                          draw(response_flags))
