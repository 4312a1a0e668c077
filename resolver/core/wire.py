"""DNS wire format: the hot-path byte helpers and the strict parsers for the slow path.

Invariants (property-tested against dnspython in tests/test_wire_props.py):
  1. `question_end(msg)` is the offset just past QTYPE/QCLASS of the single question, for any
     message whose question name is uncompressed (RFC 1035 4.1.2: queries never compress it).
  2. `scan_reply(msg).ttl_offsets` lists the offset of every RR's TTL field in every section,
     OPT excluded, compression pointers included; patching them changes nothing else.
  3. A parser here either returns a result or raises `WireError`/`MalformedQuery`; it never
     raises IndexError or struct.error to its caller, whatever the bytes.

This is the only module that knows byte offsets. dnspython is used only for presentation
(`to_text`) and by the tests as the oracle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from resolver.core.model import Outcome
from resolver.errors import MalformedQuery

HEADER_LEN = 12
MAX_NAME_LEN = 255
MAX_LABEL_LEN = 63
# RFC 6891 6.2.5 and the DNS Flag Day 2020 advice: 1232 bytes avoids IP fragmentation.
EDNS_PAYLOAD = 1232
# RFC 6891 6.2.5: a requestor's payload below 512 is treated as 512.
MIN_UDP_PAYLOAD = 512
MAX_TCP_MESSAGE = 65535

TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_BADVERS = 16  # extended: upper 8 bits go in the OPT TTL field

# Header flag bits, byte 2 and byte 3 of the message.
FLAG2_QR = 0x80
FLAG2_OPCODE = 0x78
FLAG2_AA = 0x04
FLAG2_TC = 0x02
FLAG2_RD = 0x01
FLAG3_RA = 0x80
FLAG3_AD = 0x20
FLAG3_CD = 0x10
FLAG3_RCODE = 0x0F
# The DO bit is the top bit of the OPT record's flags (RFC 3225).
EDNS_DO = 0x80

# Cache key flag byte: which of the query's bits change the answer we get upstream.
KEY_DO = 0x01
KEY_CD = 0x02

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_HEADER = struct.Struct("!2sBBHHHH")


class WireError(ValueError):
    """The bytes are not a well-formed DNS message (for replies from upstream)."""


def opt_record(payload: int, do: bool, ext_rcode: int = 0) -> bytes:
    """An OPT pseudo-RR (RFC 6891 6.1.2) with no options."""
    return b"\x00" + struct.pack("!HHBBHH", TYPE_OPT, payload, ext_rcode, 0, 0x8000 if do else 0, 0)


# The replies' OPT records come from a handful of (payload, DO) pairs; building them once keeps
# the hit path to a dict lookup.
_OPT_CACHE: dict[int, bytes] = {}


def reply_opt(client_payload: int, do: bool) -> bytes:
    """The OPT we answer with: min(client's size, 1232), DO echoed (RFC 3225 3)."""
    advertised = min(max(client_payload, MIN_UDP_PAYLOAD), EDNS_PAYLOAD)
    slot = advertised << 1 | do
    opt = _OPT_CACHE.get(slot)
    if opt is None:
        opt = _OPT_CACHE[slot] = opt_record(advertised, do)
    return opt


def question_end(data: bytes, offset: int = HEADER_LEN) -> int:
    """Offset just past QTYPE and QCLASS of an uncompressed question name starting at offset.

    Raises WireError when the name is compressed, too long, or runs past the end.
    """
    try:
        i = offset
        n = data[i]
        while n:
            if n > MAX_LABEL_LEN:
                raise WireError("compressed or invalid label in question")
            i += n + 1
            n = data[i]
    except IndexError:
        raise WireError("question name runs past the end") from None
    if i - offset + 1 > MAX_NAME_LEN:
        raise WireError("question name longer than 255 bytes")
    end = i + 5
    if end > len(data):
        raise WireError("question truncated")
    return end


def skip_name(data: bytes, offset: int) -> int:
    """Offset just past a possibly compressed name; pointers are not followed (not needed)."""
    length = 0
    try:
        while True:
            n = data[offset]
            if n == 0:
                return offset + 1
            if n >= 0xC0:
                if offset + 2 > len(data):
                    raise WireError("compression pointer truncated")
                return offset + 2
            if n > MAX_LABEL_LEN:
                raise WireError("reserved label type")
            length += n + 1
            if length > MAX_NAME_LEN:
                raise WireError("name longer than 255 bytes")
            offset += n + 1
    except IndexError:
        raise WireError("name runs past the end") from None


def cache_key(name_lower: bytes, qtype_qclass: bytes, key_flags: int) -> bytes:
    """The cache key: case-folded name, type and class bytes, then the DO/CD flag byte."""
    return name_lower + qtype_qclass + _FLAG_BYTES[key_flags]


_FLAG_BYTES = [bytes((i,)) for i in range(256)]


@dataclass(slots=True)  # not frozen: made per query, and frozen init is slow
class QueryInfo:
    """A client query, parsed strictly on the slow path."""

    qid: bytes
    rd: bool
    cd: bool
    question: bytes  # name + type + class exactly as the client sent them (its letter case)
    name_lower: bytes
    qtype: int
    qclass: int
    edns: bool
    payload: int  # the client's UDP payload size; 512 without EDNS
    do: bool

    @property
    def key(self) -> bytes:
        flags = (KEY_DO if self.do else 0) | (KEY_CD if self.cd else 0)
        return cache_key(self.name_lower, self.question[-4:], flags)

    @property
    def udp_limit(self) -> int:
        return max(self.payload, MIN_UDP_PAYLOAD) if self.edns else MIN_UDP_PAYLOAD


def parse_query(data: bytes) -> QueryInfo:
    """Parse a client query strictly, raising MalformedQuery with the rcode it deserves.

    rcode None means: send nothing (RFC 1035 says nothing is owed to a response or a runt).
    """
    if len(data) < HEADER_LEN:
        raise MalformedQuery("shorter than a DNS header", None)
    qid, flags2, flags3, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags2 & FLAG2_QR:
        raise MalformedQuery("QR=1: a response, not a query", None)
    if flags2 & FLAG2_OPCODE:
        raise MalformedQuery(f"opcode {(flags2 & FLAG2_OPCODE) >> 3} not implemented", RCODE_NOTIMP)
    if qdcount != 1:
        raise MalformedQuery(f"{qdcount} questions (exactly one supported)", RCODE_FORMERR)
    if ancount or nscount:
        raise MalformedQuery("answer or authority records in a query", RCODE_FORMERR)
    try:
        qend = question_end(data)
    except WireError as e:
        raise MalformedQuery(str(e), RCODE_FORMERR) from None
    qtype, qclass = struct.unpack_from("!HH", data, qend - 4)
    edns = False
    payload = MIN_UDP_PAYLOAD
    do = False
    offset = qend
    try:
        for _ in range(arcount):
            start = offset
            offset = skip_name(data, offset)
            rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, offset)
            offset += 10 + rdlen
            if offset > len(data):
                raise MalformedQuery("additional record runs past the end", RCODE_FORMERR)
            if rtype != TYPE_OPT:
                continue  # TSIG and friends are not supported; ignoring them is safe
            if edns:
                raise MalformedQuery("more than one OPT record", RCODE_FORMERR)  # RFC 6891 6.1.1
            if data[start] != 0:
                raise MalformedQuery("OPT owner name is not the root", RCODE_FORMERR)
            edns, payload, do = True, rclass, bool(ttl & 0x8000)
            if (ttl >> 16) & 0xFF:
                # The version byte: we speak EDNS version 0 only (RFC 6891 6.1.3).
                raise MalformedQuery("EDNS version not supported", RCODE_BADVERS)
            _check_options(data, offset - rdlen, offset)
    except (WireError, struct.error):
        raise MalformedQuery("malformed additional section", RCODE_FORMERR) from None
    if offset != len(data):
        raise MalformedQuery("trailing bytes after the last record", RCODE_FORMERR)
    if qtype == TYPE_OPT or qclass == 0:
        raise MalformedQuery("meta type or class in the question", RCODE_FORMERR)
    question = data[HEADER_LEN:qend]
    return QueryInfo(
        qid=qid,
        rd=bool(flags2 & FLAG2_RD),
        cd=bool(flags3 & FLAG3_CD),
        question=question,
        name_lower=question[:-4].lower(),
        qtype=qtype,
        qclass=qclass,
        edns=edns,
        payload=payload,
        do=do,
    )


def _check_options(data: bytes, start: int, end: int) -> None:
    """EDNS options must tile the RDATA exactly (RFC 6891 6.1.2)."""
    while start < end:
        if start + 4 > end:
            raise MalformedQuery("truncated EDNS option", RCODE_FORMERR)
        (length,) = _U16.unpack_from(data, start + 2)
        start += 4 + length
    if start != end:
        raise MalformedQuery("EDNS option runs past its record", RCODE_FORMERR)


def error_reply(data: bytes, rcode: int, info: QueryInfo | None = None) -> bytes:
    """A reply carrying only an rcode: the question echoed when we understood it, OPT when due."""
    if len(data) < HEADER_LEN:
        raise ValueError("no header to answer")
    if info is None:
        flags2 = FLAG2_QR | (data[2] & (FLAG2_OPCODE | FLAG2_RD))
        flags3 = (data[3] & FLAG3_CD) | FLAG3_RA | (rcode & FLAG3_RCODE)
        return _HEADER.pack(data[:2], flags2, flags3, 0, 0, 0, 0)
    opt = reply_opt(info.payload, info.do) if info.edns else b""
    return rcode_reply(info.qid, info.rd, info.cd, info.question, rcode, opt)


def rcode_reply(qid: bytes, rd: bool, cd: bool, question: bytes, rcode: int, opt: bytes) -> bytes:
    """A reply with the question echoed and no records: SERVFAIL, REFUSED and friends."""
    flags2 = FLAG2_QR | (FLAG2_RD if rd else 0)
    flags3 = FLAG3_RA | (FLAG3_CD if cd else 0) | (rcode & FLAG3_RCODE)
    return _HEADER.pack(qid, flags2, flags3, 1, 0, 0, 1 if opt else 0) + question + opt


def badvers_reply(data: bytes) -> bytes:
    """RFC 6891 6.1.3: BADVERS goes in the extended rcode of our own OPT (version 0)."""
    qend = question_end(data)
    flags2 = FLAG2_QR | (data[2] & FLAG2_RD)
    header = _HEADER.pack(data[:2], flags2, FLAG3_RA, 1, 0, 0, 1)
    return header + data[HEADER_LEN:qend] + opt_record(EDNS_PAYLOAD, False, RCODE_BADVERS >> 4)


def build_query(qid: int, question: bytes, do: bool, cd: bool) -> bytes:
    """Our query upstream: RD=1 (we forward), EDNS 1232 so large answers fit, DO/CD as asked."""
    flags3 = FLAG3_CD if cd else 0
    return (
        _HEADER.pack(_U16.pack(qid), FLAG2_RD, flags3, 1, 0, 0, 1)
        + question
        + opt_record(EDNS_PAYLOAD, do)
    )


def reply_matches(data: bytes, qid: int, question_lower: bytes) -> bool:
    """RFC 5452 9.1: accept only a reply with our ID and our question (case-insensitively)."""
    if len(data) < HEADER_LEN or not data[2] & FLAG2_QR:
        return False
    if _U16.unpack_from(data)[0] != qid:
        return False
    if data[4:6] != b"\x00\x01":
        # A FORMERR/NOTIMP reply may legitimately omit the question; it still says "not me".
        return data[4:6] == b"\x00\x00" and (data[3] & FLAG3_RCODE) in (RCODE_FORMERR, RCODE_NOTIMP)
    # Only the name is compared case-insensitively: lowering the type bytes would turn
    # 0x41 (HTTPS is type 65) into 0x61.
    name_end = HEADER_LEN + len(question_lower) - 4
    return (data[HEADER_LEN:name_end].lower() == question_lower[:-4]
            and data[name_end:name_end + 4] == question_lower[-4:])


@dataclass(slots=True)  # not frozen: made per query, and frozen init is slow
class ReplyScan:
    """What the cache needs to know about an upstream reply, from one walk over its records."""

    flags2: int
    flags3: int
    rcode: int  # full rcode, extended bits from OPT included
    qend: int
    body: bytes  # every section after the question, OPT removed
    counts: tuple[int, int, int]  # answer, authority, additional (OPT not counted)
    ttl_offsets: tuple[int, ...]  # offsets into body of each RR's TTL field
    ttls: tuple[int, ...]
    answer_min_ttl: int | None
    soa_ttl: int | None  # the first SOA in the authority section: its TTL and MINIMUM
    soa_minimum: int | None

    @property
    def truncated(self) -> bool:
        return bool(self.flags2 & FLAG2_TC)


def scan_reply(data: bytes) -> ReplyScan:
    """Walk every record of a reply once. Raises WireError on anything malformed."""
    try:
        return _scan_reply(data)
    except (IndexError, struct.error):
        raise WireError("record runs past the end") from None


def _scan_reply(data: bytes) -> ReplyScan:
    if len(data) < HEADER_LEN:
        raise WireError("shorter than a header")
    _, flags2, flags3, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if qdcount != 1:
        raise WireError(f"{qdcount} questions in a reply")
    qend = question_end(data)
    offset = qend
    rcode = flags3 & FLAG3_RCODE
    ttl_offsets: list[int] = []
    ttls: list[int] = []
    answer_min: int | None = None
    soa_ttl: int | None = None
    soa_min: int | None = None
    opt_span: tuple[int, int] | None = None
    counts = [ancount, nscount, arcount]
    for section, count in enumerate((ancount, nscount, arcount)):
        for _ in range(count):
            start = offset
            offset = skip_name(data, offset)
            rtype, _rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, offset)
            rdata = offset + 10
            end = rdata + rdlen
            if end > len(data):
                raise WireError("RDATA runs past the end")
            if rtype == TYPE_OPT:
                if section != 2 or opt_span is not None:
                    raise WireError("misplaced or repeated OPT")
                opt_span = (start, end)
                rcode |= (ttl >> 24) << 4
                counts[2] -= 1
            else:
                # TTLs above 2^31-1 are treated as zero (RFC 2181 8).
                if ttl > 0x7FFFFFFF:
                    ttl = 0
                ttl_offsets.append(offset + 4 - qend)
                ttls.append(ttl)
                if section == 0:
                    answer_min = ttl if answer_min is None else min(answer_min, ttl)
                elif section == 1 and rtype == TYPE_SOA and soa_ttl is None and rdlen >= 22:
                    soa_ttl = ttl
                    soa_min = _U32.unpack_from(data, end - 4)[0]
            offset = end
    if offset != len(data):
        raise WireError("trailing bytes after the last record")
    body = data[qend:]
    if opt_span is not None:
        start, end = opt_span
        if end != len(data):
            # RFC 6891 lets the OPT sit anywhere in the additional section; names after it may
            # be compressed against names that follow it, so cutting it out would shift their
            # targets. Rare (servers put OPT last): re-render without it and scan again.
            return _scan_reply(_without_opt(data))
        # The OPT is last: nothing can point into or past it, so cutting it keeps every
        # compression pointer and TTL offset valid.
        body = data[qend:start]
    return ReplyScan(
        flags2=flags2,
        flags3=flags3,
        rcode=rcode,
        qend=qend,
        body=body,
        counts=(counts[0], counts[1], counts[2]),
        ttl_offsets=tuple(ttl_offsets),
        ttls=tuple(ttls),
        answer_min_ttl=answer_min,
        soa_ttl=soa_ttl,
        soa_minimum=soa_min,
    )


def _without_opt(data: bytes) -> bytes:
    """The same reply re-rendered by dnspython with OPT removed (the extended rcode kept)."""
    import dns.exception
    import dns.message

    try:
        msg = dns.message.from_wire(data)
        rcode = msg.rcode()
        msg.use_edns(False)
        msg.set_rcode(rcode & 0xF)  # our own OPT carries no extended rcode bits to the client
        return msg.to_wire(want_shuffle=False)
    except (dns.exception.DNSException, ValueError) as e:
        raise WireError(f"cannot re-render without OPT: {e}") from None


def classify(data: bytes) -> tuple[Outcome, ReplyScan | None]:
    """Sort a matched upstream reply into an Outcome, with its scan when it is well formed."""
    try:
        scan = scan_reply(data)
    except WireError:
        return Outcome.MALFORMED, None
    if scan.truncated:
        return Outcome.TRUNCATED, scan
    rcode = scan.rcode
    if rcode == RCODE_NOERROR:
        return (Outcome.OK if scan.counts[0] else Outcome.NODATA), scan
    if rcode == RCODE_NXDOMAIN:
        return Outcome.NXDOMAIN, scan
    if rcode == RCODE_REFUSED:
        return Outcome.REFUSED, scan
    # SERVFAIL, and FORMERR/NOTIMP/anything else: this upstream could not answer it.
    return Outcome.SERVFAIL, scan


def patch_ttls(body: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...], age: int) -> bytes:
    """The body with every TTL lowered by age seconds (never below zero)."""
    out = bytearray(body)
    pack = _U32.pack_into
    for offset, ttl in zip(offsets, ttls, strict=True):
        pack(out, offset, ttl - age if ttl > age else 0)
    return bytes(out)


def to_text(data: bytes) -> str:
    """Presentation form of any message, for the CLI and logs (slow; never on the hot path)."""
    import dns.message

    return dns.message.from_wire(data, ignore_trailing=True).to_text()
