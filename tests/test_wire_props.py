"""Property tests of the wire helpers and the engine, with dnspython as the oracle.

Properties (numbered as in the invariants of resolver/core/wire.py and engine.py):
  P1. `question_end` is 12 + the uncompressed question name + 4, for queries and responses.
  P2. `scan_reply` counts records as dnspython does (OPT aside), finds every TTL field: patching
      them ages every record and changes nothing else; rcode, answer minimum and SOA agree.
  P3. `parse_query` reads what dnspython wrote.
  P4. No bytes crash the parsers or the engine; error replies are well-formed errors with the
      client's ID, and only a valid query yields a Fetch or an answer.
  P5. The hit path and the slow path give the same bytes, and that reply is the upstream answer
      with the client's ID, question and EDNS, aged by the whole seconds it was cached.
  P6. Identical concurrent misses share one Fetch; every waiter gets its own ID and letter case,
      and a failure is SERVFAIL for each of them, never NXDOMAIN.
"""

from __future__ import annotations

import contextlib
import struct

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.renderer
import dns.rrset
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from resolver.core import wire
from resolver.core.cache import Cache, TtlPolicy
from resolver.core.engine import Engine
from resolver.core.model import Endpoint, Fetch, Reply
from resolver.core.pool import Pool, Timing, UpstreamSpec
from resolver.errors import MalformedQuery

from dnsgen import (
    IN,
    RDTYPES,
    Edns,
    QuerySpec,
    ResponseSpec,
    cacheable_responses,
    make_query,
    names,
    queries,
    recase,
    responses,
    u16,
)

PROPS = settings(max_examples=200, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
T0 = 1000.0
OPT_LEN = 11  # an OPT record without options: root owner, type, class, TTL, RDLENGTH
ERROR_RCODES = {dns.rcode.FORMERR, dns.rcode.NOTIMP, dns.rcode.REFUSED, dns.rcode.SERVFAIL,
                dns.rcode.BADVERS}
DEFAULT_POLICY = TtlPolicy()


def make_engine() -> Engine:
    """As resolver/daemon/service.py's build_engine does, with the default TTL policy."""
    cache = Cache(10_000, 64 << 20, DEFAULT_POLICY)
    return Engine(cache, Pool([UpstreamSpec(Endpoint("127.0.0.1", 53))]), Timing())


def lower_name(name: dns.name.Name) -> dns.name.Name:
    # bytes.lower folds ASCII only, as DNS case-insensitivity does (RFC 4343).
    return dns.name.Name([label.lower() for label in name.labels])


def question_wire(name: dns.name.Name, qtype: int, qclass: int) -> bytes:
    return name.to_wire() + struct.pack("!HH", qtype, qclass)


def records(message: dns.message.Message) -> list[list[dns.rrset.RRset]]:
    """Answer, authority, additional; parse with one_rr_per_rrset so each entry is one RR."""
    return [list(message.answer), list(message.authority), list(message.additional)]


def parse_rrs(data: bytes) -> dns.message.Message:
    return dns.message.from_wire(data, one_rr_per_rrset=True)


def exact_rr(rrset: dns.rrset.RRset) -> tuple[object, ...]:
    """An RR as bytes, letter case included: patching TTLs must not change anything else."""
    (rdata,) = rrset
    return rrset.name.labels, rrset.rdtype, rrset.rdclass, rdata.to_wire()


# -- P1 -------------------------------------------------------------------------------------


@PROPS
@given(queries())
def test_question_end_of_queries(query: QuerySpec) -> None:
    assert wire.question_end(query.wire) == 12 + len(query.qname.to_wire()) + 4
    # Responses are covered by test_scan_reply_agrees_with_dnspython, which draws them anyway.


# -- P2 -------------------------------------------------------------------------------------


def rebuild(original: bytes, scan: wire.ReplyScan, body: bytes) -> bytes:
    """Header and question of the original around a new body; ARCOUNT without the OPT."""
    header = original[:10] + struct.pack("!H", scan.counts[2])
    return header + original[12:scan.qend] + body


@PROPS
@given(responses(), st.integers(0, 2**32))
def test_scan_reply_agrees_with_dnspython(response: ResponseSpec, age: int) -> None:
    scan = wire.scan_reply(response.wire)
    oracle = parse_rrs(response.wire)  # dnspython reads TTLs above 2^31-1 as 0 too
    sections = records(oracle)

    assert scan.counts == tuple(len(s) for s in sections)
    assert scan.rcode == oracle.rcode()
    qname = response.message.question[0].name
    assert wire.question_end(response.wire) == scan.qend == 12 + len(qname.to_wire()) + 4
    assert scan.truncated == bool(oracle.flags & dns.flags.TC)
    all_rrs = [rr for section in sections for rr in section]
    assert scan.ttls == tuple(rr.ttl for rr in all_rrs)
    for offset, ttl in zip(scan.ttl_offsets, scan.ttls, strict=True):
        raw = struct.unpack_from("!I", scan.body, offset)[0]
        assert ttl == (raw if raw <= 0x7FFFFFFF else 0)

    answer_ttls = [rr.ttl for rr in sections[0]]
    assert scan.answer_min_ttl == (min(answer_ttls) if answer_ttls else None)
    soas = [rr for rr in sections[1] if rr.rdtype == dns.rdatatype.SOA]
    if soas:
        assert (scan.soa_ttl, scan.soa_minimum) == (soas[0].ttl, soas[0][0].minimum)
    else:
        assert (scan.soa_ttl, scan.soa_minimum) == (None, None)

    patched = wire.patch_ttls(scan.body, scan.ttl_offsets, scan.ttls, age)
    # Only the TTL fields may differ.
    mask = bytearray(len(scan.body))
    for offset in scan.ttl_offsets:
        mask[offset:offset + 4] = b"\xff" * 4
    assert all(m or a == b for a, b, m in zip(scan.body, patched, mask, strict=True))

    aged = parse_rrs(rebuild(response.wire, scan, patched))
    assert aged.opt is None  # the body no longer carries the upstream's OPT
    for before, after in zip(sections, records(aged), strict=True):
        assert [exact_rr(rr) for rr in after] == [exact_rr(rr) for rr in before]
        assert [rr.ttl for rr in after] == [max(0, rr.ttl - age) for rr in before]


def test_scan_reply_opt_before_other_additional_records() -> None:
    """An OPT that is not last (RFC 6891 does not require it to be) is cut out cleanly."""
    message = _opt_in_the_middle(new_names_after_opt=False)
    scan = wire.scan_reply(message)
    aged = parse_rrs(rebuild(message, scan, wire.patch_ttls(scan.body, scan.ttl_offsets,
                                                             scan.ttls, 10)))
    assert [rr.ttl for rr in aged.additional] == [290, 290]


def _opt_in_the_middle(new_names_after_opt: bool) -> bytes:
    """A reply whose additional section is OPT, then two records sharing an owner name.

    When the owner first appears after the OPT, the second record's owner is a compression
    pointer to a spot after the OPT (dnspython's renderer does this, and so would any server
    that writes OPT first, as RFC 6891 permits).
    """
    qname = dns.name.from_text("mail.example.com.")
    glue = dns.name.from_text("relay.example.net." if new_names_after_opt
                              else "mail.example.com.")
    query = dns.message.make_query(qname, "MX", use_edns=0)
    renderer = dns.renderer.Renderer(id=query.id, flags=dns.flags.QR | dns.flags.RD)
    renderer.add_question(qname, dns.rdatatype.MX)
    renderer.add_rrset(dns.renderer.ANSWER,
                       dns.rrset.from_text(qname, 300, "IN", "MX", "10 mail.example.com."))
    opt = dns.message.make_query(qname, "MX", use_edns=0, payload=1232).opt
    renderer.add_opt(opt)
    renderer.add_rrset(dns.renderer.ADDITIONAL,
                       dns.rrset.from_text(glue, 300, "IN", "A", "192.0.2.1"))
    renderer.add_rrset(dns.renderer.ADDITIONAL,
                       dns.rrset.from_text(glue, 300, "IN", "AAAA", "2001:db8::1"))
    renderer.write_header()
    return renderer.get_wire()


def test_scan_reply_opt_before_records_with_new_names() -> None:
    message = _opt_in_the_middle(new_names_after_opt=True)
    original = parse_rrs(message)
    scan = wire.scan_reply(message)
    aged = parse_rrs(rebuild(message, scan, scan.body))
    assert [rr.name for rr in aged.additional] == [rr.name for rr in original.additional]


# -- P3 -------------------------------------------------------------------------------------


@PROPS
@given(queries())
def test_parse_query_agrees_with_dnspython(query: QuerySpec) -> None:
    info = wire.parse_query(query.wire)
    assert info.qid == struct.pack("!H", query.qid)
    assert (info.rd, info.cd) == (query.rd, query.cd)
    assert info.question == question_wire(query.qname, query.qtype, query.qclass)
    assert info.name_lower == lower_name(query.qname).to_wire()
    assert (info.qtype, info.qclass) == (query.qtype, query.qclass)
    assert info.edns == (query.edns is not None)
    if query.edns is None:
        assert (info.payload, info.do) == (512, False)
    else:
        assert (info.payload, info.do) == (query.edns.payload, query.edns.do)
    # The key folds case and keeps only what changes the upstream answer (DO and CD).
    flags = (wire.KEY_DO if info.do else 0) | (wire.KEY_CD if info.cd else 0)
    assert info.key == info.name_lower + info.question[-4:] + bytes((flags,))


# -- P4 -------------------------------------------------------------------------------------


def check_engine_survives(engine: Engine, data: bytes, now: float) -> None:
    """Parsers and engine on arbitrary bytes: the documented exceptions only, sane replies."""
    try:
        info: wire.QueryInfo | None = wire.parse_query(data)
        drop = False
    except MalformedQuery as e:
        info, drop = None, e.rcode is None
    with contextlib.suppress(wire.WireError):
        wire.scan_reply(data)

    fast = engine.answer(data, now)
    assert fast is None or isinstance(fast, bytes)
    event("valid query" if info is not None else "rejected")
    if fast is not None:
        event("served by the hit path")
        assert info is not None, "the hit path served bytes the strict parser rejects"
    actions = engine.on_query(data, "client", now)
    if drop:
        assert actions == []
    for action in actions:
        if isinstance(action, Fetch):
            assert info is not None
            # The upstream gets the case-folded name (RFC 4343), the type and class as asked.
            assert action.question == data[12:len(info.question) + 8].lower() + info.question[-4:]
            continue
        assert isinstance(action, Reply)
        assert action.client == "client"
        reply = dns.message.from_wire(action.data)
        assert reply.flags & dns.flags.QR
        assert reply.id == struct.unpack("!H", data[:2])[0]
        if fast is not None:
            assert action.data == fast
        if info is None:
            assert reply.rcode() in ERROR_RCODES, dns.rcode.to_text(reply.rcode())
        elif fast is None and reply.rcode() not in ERROR_RCODES:
            # A valid query the hit path declined (an extra non-OPT record, say) may still be
            # a cache hit on the slow path: then it is the cached answer, for this question.
            event("valid, answered from cache by the slow path")
            assert action.data[12:12 + len(info.question)] == info.question


# A plausible query header (QR=0, opcode 0, one question) makes random tails reach the name,
# question and additional-section parsers instead of dying on the header checks.
query_headers = st.builds(lambda qid, flags, arcount: qid + flags + b"\x00\x01\x00\x00\x00\x00"
                          + arcount, st.binary(min_size=2, max_size=2),
                          st.sampled_from((b"\x01\x00", b"\x00\x10", b"\x01\x20")),
                          st.sampled_from((b"\x00\x00", b"\x00\x01", b"\x00\x02")))
garbage = st.one_of(st.binary(max_size=600),
                    st.builds(bytes.__add__, query_headers, st.binary(max_size=300)))


@PROPS
@given(garbage)
def test_garbage_never_crashes(data: bytes) -> None:
    check_engine_survives(make_engine(), data, T0)


# Mutations of a valid query: what a corrupted or hostile packet looks like in practice.
mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 600), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 600), st.just(0)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=20), st.just(0)),
        st.tuples(st.just("set"), st.integers(0, 600), st.integers(0, 255)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, steps: list[tuple[str, object, int]]) -> bytes:
    out = bytearray(data)
    for op, where, value in steps:
        if op == "append":
            assert isinstance(where, bytes)
            out += where
            continue
        assert isinstance(where, int)
        if not out:
            continue
        index = where % len(out)
        if op == "flip":
            out[index] ^= value
        elif op == "set":
            out[index] = value
        else:
            del out[index:]
    return bytes(out)


def cached_engine(query: QuerySpec) -> Engine:
    """An engine with an answer for query's key in its cache, so mutants can hit it."""
    engine = make_engine()
    (fetch,) = engine.on_query(query.wire, "leader", T0)
    assert isinstance(fetch, Fetch)
    response = dns.message.make_response(query.message)
    response.answer.append(dns.rrset.from_text(query.qname, 300, "IN", "A", "192.0.2.7"))
    engine.on_answer(fetch.key, wire.scan_reply(response.to_wire()), T0)
    assert fetch.key in engine.cache.entries
    return engine


@PROPS
@given(queries(qtype=dns.rdatatype.A, qclass=IN), mutations)
def test_mutated_queries_never_crash(query: QuerySpec, steps: list[tuple[str, object, int]]
                                     ) -> None:
    engine = cached_engine(query)
    check_engine_survives(engine, mutate(query.wire, steps), T0 + 1.5)


# -- P5 -------------------------------------------------------------------------------------


@st.composite
def key_flags(draw: st.DrawFn) -> tuple[bool, bool]:
    return draw(st.booleans()), draw(st.booleans())  # DO, CD


@st.composite
def client_variant(draw: st.DrawFn, qname: dns.name.Name, qtype: int, do: bool, cd: bool
                   ) -> QuerySpec:
    """The same question as another client might ask it: case, ID, RD and EDNS vary."""
    options = st.lists(st.builds(lambda d: dns.edns.GenericOption(65001, d),
                                 st.binary(max_size=8)), max_size=1)
    with_edns = st.builds(Edns, u16, st.just(do), options)
    edns = draw(with_edns if do else st.none() | with_edns)
    return make_query(draw(recase(qname)), qtype, IN, draw(u16), draw(st.booleans()), cd, edns)


def populate(engine: Engine, leader: QuerySpec, data: st.DataObject
             ) -> tuple[Fetch, ResponseSpec]:
    """One miss through the real API: on_query's Fetch answered by a generated response."""
    (fetch,) = engine.on_query(leader.wire, "leader", T0)
    assert isinstance(fetch, Fetch)
    assert fetch.question == question_wire(lower_name(leader.qname), leader.qtype, IN)
    upstream_query = dns.message.from_wire(wire.build_query(4242, fetch.question, fetch.do,
                                                            fetch.cd))
    response = data.draw(cacheable_responses(upstream_query))
    (reply,) = engine.on_answer(fetch.key, wire.scan_reply(response.wire), T0)
    assert reply.client == "leader"
    return fetch, response


def expected_ttls(response: dns.message.Message) -> list[list[int]]:
    """The TTLs the cache stores: negative answers capped at the negative TTL (RFC 2308 5)."""
    sections = records(response)
    if response.answer and response.rcode() == dns.rcode.NOERROR:
        cap = DEFAULT_POLICY.max_ttl
    else:
        soa = next(rr for rr in sections[1] if rr.rdtype == dns.rdatatype.SOA)
        cap = min(soa.ttl, soa[0].minimum, DEFAULT_POLICY.max_negative_ttl)
    return [[min(rr.ttl, cap) for rr in section] for section in sections]


def check_cached_reply(data: bytes, client: QuerySpec, upstream: ResponseSpec, age: int) -> None:
    reply = parse_rrs(data)
    assert reply.id == client.qid
    assert reply.flags & dns.flags.QR
    assert bool(reply.flags & dns.flags.RD) == client.rd
    assert reply.flags & dns.flags.RA
    # The client's question, byte for byte: its letter case is its 0x20 defence.
    question = question_wire(client.qname, client.qtype, IN)
    assert data[12:12 + len(question)] == question
    assert reply.question[0].name.labels == client.qname.labels
    assert (reply.edns >= 0) == (client.edns is not None)
    if client.edns is not None:
        assert reply.payload == min(max(client.edns.payload, 512), 1232)
        assert bool(reply.ednsflags & dns.flags.DO) == client.edns.do
    assert reply.rcode() == upstream.message.rcode()

    limit = 512 if client.edns is None else max(client.edns.payload, 512)
    upstream_opt = OPT_LEN if upstream.message.edns >= 0 else 0
    full_size = len(upstream.wire) - upstream_opt + (OPT_LEN if client.edns else 0)
    event("truncated" if full_size > limit else "full reply")
    if full_size > limit:
        # RFC 2181 9: no partial RRsets; the client retries over TCP.
        assert reply.flags & dns.flags.TC
        assert records(reply) == [[], [], []]
        return
    assert len(data) == full_size
    assert not reply.flags & dns.flags.TC
    original = parse_rrs(upstream.wire)
    for got, want, ttls in zip(records(reply), records(original), expected_ttls(original),
                               strict=True):
        # dnspython compares owners and rdata case-insensitively; a pointer into the question
        # now reads the client's letter case.
        assert [(rr.name, rr.rdtype, rr[0]) for rr in got] == [
            (rr.name, rr.rdtype, rr[0]) for rr in want]
        assert [rr.ttl for rr in got] == [max(0, ttl - age) for ttl in ttls]


@PROPS
@given(st.data(), names(), st.sampled_from(RDTYPES), key_flags())
def test_hit_path_agrees_with_slow_path_and_upstream(
        data: st.DataObject, qname: dns.name.Name, qtype: int, flags: tuple[bool, bool]) -> None:
    do, cd = flags
    engine = make_engine()
    leader = data.draw(client_variant(qname, qtype, do, cd))
    fetch, upstream = populate(engine, leader, data)
    entry = engine.cache.entries.get(fetch.key)
    assume(entry is not None)  # a negative answer whose SOA MINIMUM is 0 is not cached
    assert entry is not None
    event(entry.kind)

    for _ in range(data.draw(st.integers(1, 4))):
        client = data.draw(client_variant(qname, qtype, do, cd))
        # Whole milliseconds keep T0 + offset strictly below the expiry in floating point.
        now = T0 + data.draw(st.integers(0, entry.ttl * 1000 - 1)) / 1000
        fast = engine.answer(client.wire, now)
        assert fast is not None, "an ordinary query for a fresh entry missed the hit path"
        (slow,) = engine.on_query(client.wire, "client", now)
        assert isinstance(slow, Reply)
        assert fast == slow.data
        check_cached_reply(fast, client, upstream, int(now - T0))


# -- P6 -------------------------------------------------------------------------------------


@settings(PROPS, max_examples=100)  # each example is two clients and a whole reply
@given(st.data(), names(), st.sampled_from(RDTYPES), key_flags(), st.booleans())
def test_concurrent_misses_share_one_fetch(data: st.DataObject, qname: dns.name.Name,
                                           qtype: int, flags: tuple[bool, bool],
                                           upstream_answers: bool) -> None:
    do, cd = flags
    engine = make_engine()
    first = data.draw(client_variant(qname, qtype, do, cd))
    second = data.draw(client_variant(qname, qtype, do, cd))
    actions = engine.on_query(first.wire, "first", T0)
    assert [type(a) for a in actions] == [Fetch]
    assert engine.on_query(second.wire, "second", T0 + 0.1) == []
    (fetch,) = actions
    assert isinstance(fetch, Fetch)

    if upstream_answers:
        upstream_query = dns.message.from_wire(
            wire.build_query(7, fetch.question, fetch.do, fetch.cd))
        upstream = data.draw(cacheable_responses(upstream_query))
        replies = engine.on_answer(fetch.key, wire.scan_reply(upstream.wire), T0 + 0.5)
    else:
        replies = engine.on_failure(fetch.key, T0 + 4)
    assert [r.client for r in replies] == ["first", "second"]
    for reply, client in zip(replies, (first, second), strict=True):
        if upstream_answers:
            check_cached_reply(reply.data, client, upstream, 0)
            continue
        message = dns.message.from_wire(reply.data)
        assert message.id == client.qid
        assert message.rcode() == dns.rcode.SERVFAIL  # RFC 9520: never NXDOMAIN on failure
        question = question_wire(client.qname, qtype, IN)
        assert reply.data[12:12 + len(question)] == question
        assert (message.edns >= 0) == (client.edns is not None)
    # Nothing is left waiting: a new query for the key starts a new fetch or is answered.
    assert fetch.key not in engine.inflight


def test_servfail_echoes_cd() -> None:
    engine = make_engine()
    query = make_query(dns.name.from_text("mx.example.com."), dns.rdatatype.A, IN, 0x1234,
                       True, True, None)
    (fetch,) = engine.on_query(query.wire, "client", T0)
    assert isinstance(fetch, Fetch)
    (reply,) = engine.on_failure(fetch.key, T0 + 4)
    assert dns.message.from_wire(reply.data).flags & dns.flags.CD


def test_opcode_in_error_replies_is_readable() -> None:
    """A NOTIMP for an UPDATE is still a reply dnspython reads (a sanity check of P4)."""
    update = bytearray(make_query(dns.name.from_text("a."), 1, IN, 1, True, False, None).wire)
    update[2] |= dns.opcode.UPDATE << 3
    (reply,) = make_engine().on_query(bytes(update), "client", T0)
    assert isinstance(reply, Reply)
    assert dns.message.from_wire(reply.data).rcode() == dns.rcode.NOTIMP

