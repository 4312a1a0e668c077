"""The engine without I/O: errors, hits, coalescing and failures, with explicit `now`."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import pytest

from resolver.core import wire
from resolver.core.cache import Cache, TtlPolicy
from resolver.core.engine import Engine
from resolver.core.model import Endpoint, Fetch, Reply
from resolver.core.pool import Pool, Timing, UpstreamSpec

from dnsmsg import parse, query, response, soa

T0 = 500.0


def make_engine(**policy: float) -> Engine:
    cache = Cache(1000, 1 << 24, TtlPolicy(**policy))
    return Engine(cache, Pool([UpstreamSpec(Endpoint("127.0.0.1", 5300))]), Timing())


def resolve(engine: Engine, data: bytes, answer: bytes, now: float) -> list[Reply]:
    """Drive one miss to completion: on_query → Fetch → on_answer."""
    actions = engine.on_query(data, "client", now)
    fetches = [a for a in actions if isinstance(a, Fetch)]
    assert len(fetches) == 1
    return engine.on_answer(fetches[0].key, wire.scan_reply(answer), now)


def rcode_of(data: bytes) -> int:
    return parse(data).rcode()


@pytest.mark.parametrize(
    ("case", "data", "expected"),
    [
        ("runt", b"\x12\x34\x00", None),
        (
            "response (QR=1)",
            bytes.fromhex("12348180000100000000000001610474657374000001000001"),
            None,
        ),
        (
            "opcode NOTIFY",
            bytes.fromhex("12342000000100000000000001610474657374000001000001"),
            dns.rcode.NOTIMP,
        ),
        (
            "two questions",
            bytes.fromhex("1234010000020000000000000161000001000101620000010001"),
            dns.rcode.FORMERR,
        ),
        ("no question", bytes.fromhex("123401000000000000000000"), dns.rcode.FORMERR),
        (
            "name runs past the end",
            bytes.fromhex("12340100000100000000000005616263"),
            dns.rcode.FORMERR,
        ),
        (
            "compressed question name",
            bytes.fromhex("123401000001000000000000c00c00010001"),
            dns.rcode.FORMERR,
        ),
        ("trailing garbage", query("a.test.", edns=False) + b"\x00", dns.rcode.FORMERR),
        (
            "two OPT records",
            query("a.test.")[:11] + b"\x02" + query("a.test.")[12:] + query("a.test.")[-11:],
            dns.rcode.FORMERR,
        ),
        (
            "OPT with a truncated option",
            query("a.test.")[:-2] + b"\x00\x03" + b"\x00\x0a\x00",
            dns.rcode.FORMERR,
        ),
        (
            "CHAOS class",
            bytes.fromhex("1234010000010000000000000776657273696f6e0462696e640000100003"),
            dns.rcode.REFUSED,
        ),
        ("AXFR", query("test.", "AXFR", edns=False), dns.rcode.REFUSED),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_slow_path_error_answers(case: str, data: bytes, expected: int | None) -> None:
    engine = make_engine()
    assert engine.answer(data, T0) is None  # the hit path never answers these
    actions = engine.on_query(data, "client", T0)
    if expected is None:
        assert actions == []
        return
    assert len(actions) == 1 and isinstance(actions[0], Reply)
    reply = actions[0].data
    assert reply[:2] == data[:2]
    assert reply[2] & wire.FLAG2_QR
    assert rcode_of(reply) == expected


def test_edns_version_1_gets_badvers() -> None:
    data = bytearray(query("a.test."))
    data[-5] = 1  # the OPT version byte sits in the TTL field (RFC 6891 6.1.3)
    [reply] = make_engine().on_query(bytes(data), "c", T0)
    msg = parse(reply.data)
    assert msg.rcode() == dns.rcode.BADVERS and msg.edns == 0


def test_hit_path_serves_after_one_miss() -> None:
    engine = make_engine()
    q = query("d1.test.", "MX", qid=1)
    answer = response(q, [("d1.test.", 300, "MX", "10 mx1.d1.test.")])
    [first] = resolve(engine, q, answer, T0)
    hit = engine.answer(query("D1.Test.", "MX", qid=2), T0 + 10)
    assert hit is not None
    msg = parse(hit)
    assert msg.id == 2 and msg.question[0].name.to_text() == "D1.Test."
    assert msg.answer[0].ttl == 290
    assert parse(first.data).answer[0].ttl == 300
    assert (engine.hits, engine.misses) == (1, 1)


def test_reply_carries_opt_exactly_when_query_did() -> None:
    engine = make_engine()
    q = query("a.test.", "A")
    resolve(engine, q, response(q, [("a.test.", 300, "A", "192.0.2.1")]), T0)
    with_edns = parse(engine.answer(query("a.test.", "A", payload=4096), T0))
    without = parse(engine.answer(query("a.test.", "A", edns=False), T0))
    small = parse(engine.answer(query("a.test.", "A", payload=600), T0))
    assert with_edns.edns == 0 and with_edns.payload == 1232
    assert small.payload == 600
    assert without.edns == -1


def test_answers_larger_than_the_client_limit_are_truncated() -> None:
    engine = make_engine()
    q = query("big.test.", "TXT")
    records = [("big.test.", 300, "TXT", '"' + chr(97 + i) * 200 + '"') for i in range(4)]
    resolve(engine, q, response(q, records), T0)  # about 830 bytes
    no_edns = parse(engine.answer(query("big.test.", "TXT", edns=False), T0))
    assert no_edns.flags & dns.flags.TC and not no_edns.answer
    edns = parse(engine.answer(query("big.test.", "TXT", payload=1232), T0))
    assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 4
    over_tcp = parse(engine.answer(query("big.test.", "TXT", edns=False), T0, tcp=True))
    assert not over_tcp.flags & dns.flags.TC and len(over_tcp.answer[0]) == 4


def test_rd_is_echoed_even_from_cache() -> None:
    engine = make_engine()
    q = query("a.test.", "A")
    resolve(engine, q, response(q, [("a.test.", 300, "A", "192.0.2.1")]), T0)
    no_rd = query("a.test.", "A", rd=False)
    actions = engine.on_query(no_rd, "c", T0)
    assert not parse(actions[0].data).flags & dns.flags.RD


# Coalescing as a time-travel table: (time, event, name, expected upstream fetches so far,
# expected replies from this event)
def test_identical_concurrent_misses_share_one_fetch() -> None:
    engine = make_engine()
    askers = [("c1", "a.test.", 11), ("c2", "A.TEST.", 12), ("c3", "a.Test.", 13)]
    fetches = []
    for client, name, qid in askers:
        fetches += [
            a
            for a in engine.on_query(query(name, "A", qid=qid), client, T0)
            if isinstance(a, Fetch)
        ]
    assert len(fetches) == 1
    assert fetches[0].question[:-4] == b"\x01a\x04test\x00"
    answer = response(query("a.test.", "A"), [("a.test.", 300, "A", "192.0.2.1")])
    replies = engine.on_answer(fetches[0].key, wire.scan_reply(answer), T0 + 0.05)
    assert [r.client for r in replies] == ["c1", "c2", "c3"]
    for reply, (_, name, qid) in zip(replies, askers, strict=True):
        msg = parse(reply.data)
        assert msg.id == qid and msg.question[0].name.to_text() == name
        assert msg.answer[0][0].address == "192.0.2.1"
    # The key is free again: a later miss (after expiry) leads a new fetch.
    assert engine.on_query(query("a.test.", "A"), "c4", T0 + 301)[0].key == fetches[0].key


def test_failure_gives_servfail_to_every_waiter_and_is_cached_briefly() -> None:
    engine = make_engine(failure_ttl=5.0)
    [fetch] = engine.on_query(query("a.test.", "A", qid=1), "c1", T0)
    assert engine.on_query(query("a.test.", "A", qid=2), "c2", T0) == []
    replies = engine.on_failure(fetch.key, T0 + 4)
    assert [rcode_of(r.data) for r in replies] == [dns.rcode.SERVFAIL] * 2
    # (time, outcome): within failure_ttl the answer is SERVFAIL without a fetch.
    for now, expect_fetch in [(T0 + 4.5, False), (T0 + 8.9, False), (T0 + 9.0, True)]:
        actions = engine.on_query(query("a.test.", "A", qid=3), "c3", now)
        assert isinstance(actions[0], Fetch) is expect_fetch, now
        if not expect_fetch:
            assert rcode_of(actions[0].data) == dns.rcode.SERVFAIL


def test_nxdomain_from_upstream_is_passed_through_and_cached() -> None:
    engine = make_engine()
    q = query("nx.test.", "A")
    answer = response(q, authority=[soa()], rcode=dns.rcode.NXDOMAIN)
    [reply] = resolve(engine, q, answer, T0)
    assert rcode_of(reply.data) == dns.rcode.NXDOMAIN
    hit = engine.answer(q, T0 + 1)
    assert hit is not None and rcode_of(hit) == dns.rcode.NXDOMAIN


def test_coalescing_is_bounded() -> None:
    engine = make_engine()
    engine.inflight.max_waiters = 2
    results = [engine.on_query(query("a.test.", "A", qid=i), f"c{i}", T0) for i in range(3)]
    assert isinstance(results[0][0], Fetch) and results[1] == []
    assert rcode_of(results[2][0].data) == dns.rcode.SERVFAIL


def test_upstream_opt_is_removed_and_replaced_with_ours() -> None:
    engine = make_engine()
    q = query("a.test.", "A")
    upstream = dns.message.from_wire(response(q, [("a.test.", 300, "A", "192.0.2.1")]))
    upstream.use_edns(0, payload=4096)
    resolve(engine, q, upstream.to_wire(), T0)
    msg = parse(engine.answer(query("a.test.", "A", payload=1232), T0))
    assert msg.payload == 1232 and len(msg.additional) == 0


def test_ad_flag_only_for_do_clients() -> None:
    engine = make_engine()
    for do in (False, True):
        q = query("a.test.", "A", do=do)
        upstream = bytearray(response(q, [("a.test.", 300, "A", "192.0.2.1")]))
        upstream[3] |= wire.FLAG3_AD
        resolve(engine, q, bytes(upstream), T0)
        reply = engine.answer(q, T0)
        assert bool(reply[3] & wire.FLAG3_AD) is do


def test_hit_path_declines_unusual_queries() -> None:
    engine = make_engine()
    q = query("a.test.", "A", edns=False)
    resolve(engine, q, response(q, [("a.test.", 300, "A", "192.0.2.1")]), T0)
    odd = bytearray(q)
    struct.pack_into("!H", odd, 6, 1)  # an answer record count in a query
    assert engine.answer(bytes(odd), T0) is None
    assert engine.answer(q, T0) is not None


def test_upstream_replies_match_on_type_bytes_exactly() -> None:
    # HTTPS is type 65 (0x41): a case-folded comparison of the whole question would turn it
    # into 0x61 and never match.
    question = wire.parse_query(query("a.test.", "HTTPS")).question
    reply = response(query("a.test.", "HTTPS", qid=7), [])
    assert wire.reply_matches(reply, 7, question.lower()[:-4] + question[-4:])
    other_type = response(query("a.test.", "A", qid=7), [])
    assert not wire.reply_matches(other_type, 7, question)


def test_servfail_echoes_cd() -> None:
    engine = make_engine()
    data = bytearray(query("a.test.", "A"))
    data[3] |= wire.FLAG3_CD
    [fetch] = engine.on_query(bytes(data), "c", T0)
    [reply] = engine.on_failure(fetch.key, T0)
    assert reply.data[3] & wire.FLAG3_CD
