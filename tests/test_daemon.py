"""The trio daemon over real loopback sockets, with fake upstreams for the faults."""

from __future__ import annotations

import socket
import struct

import dns.flags
import dns.message
import dns.rcode
import trio

from dnsmsg import parse, query
from fakeupstream import (
    DroppingUpstream,
    FakeUpstream,
    RefusedUpstream,
    SlowUpstream,
    TruncatingUpstream,
)
from loopback import addr_of, ask_udp, read_tcp_message, running


async def test_concurrent_identical_misses_reach_the_upstream_once() -> None:
    with SlowUpstream(delay_seconds=0.3) as upstream:
        # A generous per-try timeout: on a loaded machine a retry would muddle the count.
        async with running([upstream], upstream_timeout_seconds=4.0) as svc:
            replies: dict[int, dns.message.Message] = {}

            async def one(i: int) -> None:
                name = "ExAmPlE.test." if i % 2 else "example.TEST."
                replies[i] = parse(await ask_udp(addr_of(svc), query(name, "MX", qid=i)))

            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(one, i)
    assert upstream.udp_count == 1
    assert sorted(replies) == list(range(50))
    for i, msg in replies.items():
        assert msg.id == i and len(msg.answer[0]) == 2
        assert msg.question[0].name.to_text() == ("ExAmPlE.test." if i % 2 else "example.TEST.")


async def test_hits_do_not_reach_the_upstream() -> None:
    with FakeUpstream() as upstream:
        async with running([upstream]) as svc:
            for i in range(5):
                msg = parse(await ask_udp(addr_of(svc), query("example.test.", "A", qid=i)))
                assert msg.answer[0][0].address == "192.0.2.1"
    assert upstream.udp_count == 1


async def test_clients_outside_the_access_list_are_refused() -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], allow=("10.0.0.0/8",)) as svc:
            msg = parse(await ask_udp(addr_of(svc), query("example.test.", "A")))
            assert msg.rcode() == dns.rcode.REFUSED
            stream = await trio.open_tcp_stream(*addr_of(svc))
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""  # closed without an answer
    assert upstream.udp_count == 0


async def test_malformed_gets_formerr_and_runts_get_nothing() -> None:
    with FakeUpstream() as upstream:
        async with running([upstream]) as svc:
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.connect(addr_of(svc))
                await sock.send(b"\x00\x07\x01")  # a runt: no reply owed
                await sock.send(bytes.fromhex("00080100000100000000000005616263"))
                await sock.send(query("example.test.", "A", qid=9))
                with trio.fail_after(5):
                    first = parse(await sock.recv(65535))
                    second = parse(await sock.recv(65535))
    # The runt got nothing: the first datagram back answers the malformed query.
    assert (first.id, first.rcode()) == (8, dns.rcode.FORMERR)
    assert (second.id, second.rcode()) == (9, dns.rcode.NOERROR)


async def test_silent_upstream_means_servfail_at_the_deadline_never_nxdomain() -> None:
    with DroppingUpstream() as upstream:
        async with running(
            [upstream], upstream_timeout_seconds=0.1, query_deadline_seconds=0.35
        ) as svc:
            msg = parse(await ask_udp(addr_of(svc), query("example.test.", "A")))
            assert msg.rcode() == dns.rcode.SERVFAIL
            # RFC 9520: the failure is cached briefly; no new upstream traffic for a retry.
            sent = upstream.udp_count
            msg = parse(await ask_udp(addr_of(svc), query("example.test.", "A")))
            assert msg.rcode() == dns.rcode.SERVFAIL and upstream.udp_count == sent
    assert 1 <= sent <= 4


async def test_fallback_is_asked_only_after_every_primary_failed() -> None:
    with RefusedUpstream() as p1, RefusedUpstream() as p2, FakeUpstream() as fallback:
        async with running([p1, p2], [fallback]) as svc:
            msg = parse(await ask_udp(addr_of(svc), query("example.test.", "A")))
    assert msg.rcode() == dns.rcode.NOERROR
    assert (p1.udp_count, p2.udp_count, fallback.udp_count) == (1, 1, 1)
    assert p1.queries[0].arrival < p2.queries[0].arrival < fallback.queries[0].arrival


async def test_tcp_answers_pipelined_queries_as_they_complete() -> None:
    with SlowUpstream(delay_seconds=0.2) as upstream:
        async with running([upstream]) as svc:
            await ask_udp(addr_of(svc), query("example.test.", "A", qid=1))  # warm one name
            stream = await trio.open_tcp_stream(*addr_of(svc))
            batch = b"".join(
                struct.pack("!H", len(q)) + q
                for q in (
                    query("example.test.", "MX", qid=21),  # miss: slow
                    query("example.test.", "A", qid=22),  # hit: immediate
                    query("nx.test.", "A", qid=23),  # miss
                )
            )
            await stream.send_all(batch)
            with trio.fail_after(5):
                answers = [parse(await read_tcp_message(stream)) for _ in range(3)]
            await stream.aclose()
    assert answers[0].id == 22  # the hit did not wait behind the slow miss
    assert {a.id: a.rcode() for a in answers} == {21: 0, 22: 0, 23: dns.rcode.NXDOMAIN}


async def test_tcp_idle_connections_are_closed() -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], tcp_idle_timeout_seconds=0.2) as svc:
            stream = await trio.open_tcp_stream(*addr_of(svc))
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""


async def test_tcp_cap_closes_the_oldest_idle_connection_first() -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], tcp_max_connections=2) as svc:
            server = addr_of(svc)
            first = await trio.open_tcp_stream(*server)
            second = await trio.open_tcp_stream(*server)
            # Make `second` the more recently active one.
            q = query("example.test.", "A", qid=5)
            await second.send_all(struct.pack("!H", len(q)) + q)
            with trio.fail_after(5):
                await read_tcp_message(second)
            third = await trio.open_tcp_stream(*server)
            await third.send_all(struct.pack("!H", len(q)) + q)
            with trio.fail_after(5):
                assert await first.receive_some(10) == b""  # the oldest idle one went
                assert parse(await read_tcp_message(third)).id == 5
            for s in (second, third):
                await s.aclose()


async def test_truncated_reply_from_upstream_is_retried_over_tcp() -> None:
    with TruncatingUpstream() as upstream:
        async with running([upstream]) as svc:
            reply = await ask_udp(addr_of(svc), query("example.test.", "MX"))
    msg = parse(reply)
    assert not msg.flags & dns.flags.TC and len(msg.answer[0]) == 2
    assert (upstream.udp_count, upstream.tcp_count) == (1, 1)
