"""Small builders for DNS messages in tests (dnspython is the oracle, never the code under test)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset


def query(
    name: str,
    rdtype: str = "A",
    *,
    edns: bool = True,
    payload: int = 1232,
    do: bool = False,
    qid: int = 4660,
    rd: bool = True,
) -> bytes:
    msg = dns.message.make_query(
        name, rdtype, use_edns=0 if edns else False, payload=payload, want_dnssec=do
    )
    msg.id = qid
    if not rd:
        msg.flags &= ~dns.flags.RD
    return msg.to_wire()


def response(
    question: bytes,
    answers: list[tuple[str, int, str, str]] = (),
    authority: list[tuple[str, int, str, str]] = (),
    rcode: int = dns.rcode.NOERROR,
) -> bytes:
    """A reply to `question` wire bytes; records are (name, ttl, type, rdata) tuples."""
    q = dns.message.from_wire(question)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for section, records in ((r.answer, answers), (r.authority, authority)):
        for name, ttl, rdtype, text in records:
            section.append(dns.rrset.from_text(name, ttl, "IN", rdtype, text))
    return r.to_wire()


SOA = "ns1.test. hostmaster.test. 1 3600 900 604800 {minimum}"


def soa(zone: str = "test.", ttl: int = 600, minimum: int = 300) -> tuple[str, int, str, str]:
    return (zone, ttl, "SOA", SOA.format(minimum=minimum))


def parse(data: bytes) -> dns.message.Message:
    return dns.message.from_wire(data)
