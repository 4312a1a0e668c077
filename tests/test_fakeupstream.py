"""The fake upstream does what each behaviour promises; the resolver tests depend on it."""

from __future__ import annotations

import socket
import struct
import threading
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from fakeupstream import (
    Close,
    Delayed,
    DroppingUpstream,
    FakeUpstream,
    OtherPortUpstream,
    RateLimitedUpstream,
    RefusedUpstream,
    Request,
    Response,
    ServfailUpstream,
    SlowUpstream,
    TruncatingUpstream,
    WrongIdUpstream,
    WrongQuestionUpstream,
    make_upstream,
    rrset_texts,
)

TIMEOUT = 2.0


def receive_packets(
    sock: socket.socket, max_packets: int, timeout_seconds: float
) -> list[tuple[bytes, tuple[str, int]]]:
    """Up to ``max_packets`` datagrams that arrive on ``sock`` within ``timeout_seconds``."""
    packets: list[tuple[bytes, tuple[str, int]]] = []
    deadline = time.monotonic() + timeout_seconds
    while len(packets) < max_packets:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            packets.append(sock.recvfrom(65535))
        except TimeoutError:
            break
    return packets


def raw_udp(
    upstream: FakeUpstream, query: dns.message.Message, max_packets: int, timeout_seconds: float
) -> list[tuple[dns.message.Message, tuple[str, int]]]:
    """Send ``query`` from a plain socket and parse whatever comes back, spoofs included."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(query.to_wire(), upstream.addr)
        packets = receive_packets(sock, max_packets, timeout_seconds)
    return [(dns.message.from_wire(data), source) for data, source in packets]


def test_default_answers_over_udp_and_tcp() -> None:
    with FakeUpstream() as upstream:
        query = dns.message.make_query("example.test.", "A")
        over_udp = dns.query.udp(query, upstream.address, port=upstream.port, timeout=TIMEOUT)
        over_tcp = dns.query.tcp(query, upstream.address, port=upstream.port, timeout=TIMEOUT)
        for reply in (over_udp, over_tcp):
            assert reply.rcode() == dns.rcode.NOERROR
            assert reply.flags & dns.flags.RA
            assert rrset_texts(reply.answer) == ["192.0.2.1"]
            assert reply.answer[0].ttl == upstream.ttl
        assert (upstream.udp_count, upstream.tcp_count) == (1, 1)
        assert [request.transport for request in upstream.queries] == ["udp", "tcp"]
        assert upstream.queries[0].message.question[0].name.to_text() == "example.test."
        assert upstream.queries[0].arrival <= upstream.queries[1].arrival


def test_nxdomain_and_nodata_carry_soa() -> None:
    with FakeUpstream() as upstream:
        nx = dns.query.udp(
            dns.message.make_query("missing.test.", "A"),
            upstream.address,
            port=upstream.port,
            timeout=TIMEOUT,
        )
        nodata = dns.query.udp(
            dns.message.make_query("nodata.test.", "MX"),
            upstream.address,
            port=upstream.port,
            timeout=TIMEOUT,
        )
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nodata.rcode() == dns.rcode.NOERROR
    for reply in (nx, nodata):
        assert reply.answer == []
        assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]


def test_cname_is_followed_and_case_insensitive() -> None:
    with FakeUpstream() as upstream:
        reply = dns.query.udp(
            dns.message.make_query("WWW.Example.TEST.", "A"),
            upstream.address,
            port=upstream.port,
            timeout=TIMEOUT,
        )
    assert [rrset.rdtype for rrset in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert rrset_texts(reply.answer[1:]) == ["192.0.2.1"]


def test_custom_answers_and_edns_mirrored() -> None:
    answers = {("Mail.Example.", "mx"): ["5 in.mail.example."]}
    with FakeUpstream(answers=answers, ttl=42) as upstream:
        with_edns = dns.query.udp(
            dns.message.make_query("mail.example.", "MX", use_edns=0, payload=4096),
            upstream.address,
            port=upstream.port,
            timeout=TIMEOUT,
        )
        without_edns = dns.query.udp(
            dns.message.make_query("mail.example.", "MX", use_edns=False),
            upstream.address,
            port=upstream.port,
            timeout=TIMEOUT,
        )
    assert rrset_texts(with_edns.answer) == ["5 in.mail.example."]
    assert with_edns.answer[0].ttl == 42
    assert with_edns.edns == 0 and with_edns.payload == 1232
    assert without_edns.edns == -1


def test_drop_counts_but_never_answers() -> None:
    with DroppingUpstream() as upstream:
        query = dns.message.make_query("example.test.", "A")
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(query, upstream.address, port=upstream.port, timeout=0.3)
        with pytest.raises(dns.exception.Timeout):
            dns.query.tcp(query, upstream.address, port=upstream.port, timeout=0.3)
        assert upstream.wait_for_queries(2, TIMEOUT)
        assert (upstream.udp_count, upstream.tcp_count) == (1, 1)


def test_slow_answers_late() -> None:
    with SlowUpstream(delay_seconds=0.4) as upstream:
        started = time.monotonic()
        reply = dns.query.udp(
            dns.message.make_query("example.test.", "A"),
            upstream.address,
            port=upstream.port,
            timeout=TIMEOUT,
        )
        elapsed = time.monotonic() - started
    assert reply.rcode() == dns.rcode.NOERROR
    assert 0.35 <= elapsed < TIMEOUT


class SlowForOneName(FakeUpstream):
    """Delays only ``slow.test.``, so we can see it does not hold up other queries."""

    def handle(self, request: Request) -> Response:
        if request.message.question[0].name.to_text() == "slow.test.":
            return Delayed(1.0, self.answer(request))
        return self.answer(request)


def test_delay_does_not_block_other_queries() -> None:
    with SlowForOneName() as upstream, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        slow = dns.message.make_query("slow.test.", "A")
        sock.sendto(slow.to_wire(), upstream.addr)
        started = time.monotonic()
        fast = dns.query.udp(
            dns.message.make_query("example.test.", "A"),
            upstream.address,
            port=upstream.port,
            timeout=TIMEOUT,
        )
        assert time.monotonic() - started < 0.5
        assert fast.rcode() == dns.rcode.NOERROR
        packets = receive_packets(sock, 1, TIMEOUT)
        assert len(packets) == 1
        assert dns.message.from_wire(packets[0][0]).id == slow.id
        assert time.monotonic() - started >= 0.9


@pytest.mark.parametrize(
    ("cls", "rcode"),
    [(ServfailUpstream, dns.rcode.SERVFAIL), (RefusedUpstream, dns.rcode.REFUSED)],
)
def test_rcode_behaviours(cls: type[FakeUpstream], rcode: int) -> None:
    with cls() as upstream:
        query = dns.message.make_query("example.test.", "A")
        reply = dns.query.udp(query, upstream.address, port=upstream.port, timeout=TIMEOUT)
    assert reply.rcode() == rcode
    assert reply.id == query.id
    assert reply.answer == []


def test_wrong_id_then_correct() -> None:
    with WrongIdUpstream() as upstream:
        query = dns.message.make_query("example.test.", "A")
        replies = raw_udp(upstream, query, 2, TIMEOUT)
    assert [reply.id for reply, _ in replies] == [(query.id + 1) & 0xFFFF, query.id]
    assert all(source == upstream.addr for _, source in replies)


def test_wrong_id_alone() -> None:
    with WrongIdUpstream(then_correct=False) as upstream:
        query = dns.message.make_query("example.test.", "A")
        replies = raw_udp(upstream, query, 2, 0.3)
    assert [reply.id for reply, _ in replies] == [(query.id + 1) & 0xFFFF]


def test_wrong_question_then_correct() -> None:
    with WrongQuestionUpstream() as upstream:
        query = dns.message.make_query("example.test.", "A")
        replies = raw_udp(upstream, query, 2, TIMEOUT)
    assert len(replies) == 2
    forged, correct = replies[0][0], replies[1][0]
    assert forged.id == correct.id == query.id
    assert forged.question[0].name.to_text() == "spoofed.example.test."
    assert correct.question == query.question
    assert rrset_texts(correct.answer) == ["192.0.2.1"]


def test_other_port_then_correct() -> None:
    with OtherPortUpstream() as upstream:
        query = dns.message.make_query("example.test.", "A")
        replies = raw_udp(upstream, query, 2, TIMEOUT)
    assert len(replies) == 2
    (forged, forged_source), (correct, correct_source) = replies
    assert forged_source[0] == "127.0.0.1" and forged_source[1] != upstream.port
    assert correct_source == upstream.addr
    assert forged.id == correct.id == query.id
    assert rrset_texts(forged.answer) == ["203.0.113.66"]
    assert rrset_texts(correct.answer) == ["192.0.2.1"]


def test_truncating_udp_full_over_tcp() -> None:
    with TruncatingUpstream() as upstream:
        query = dns.message.make_query("big.test.", "TXT", use_edns=0, payload=1232)
        over_udp = dns.query.udp(query, upstream.address, port=upstream.port, timeout=TIMEOUT)
        over_tcp = dns.query.tcp(query, upstream.address, port=upstream.port, timeout=TIMEOUT)
        assert (upstream.udp_count, upstream.tcp_count) == (1, 1)
    assert over_udp.flags & dns.flags.TC
    assert over_udp.answer == []
    assert not over_tcp.flags & dns.flags.TC
    assert len(over_tcp.answer[0]) == 8
    assert len(over_tcp.to_wire()) > 1500


def test_tcp_pipelined_queries_on_one_connection() -> None:
    names = ["example.test.", "mx1.example.test.", "missing.test."]
    queries = [dns.message.make_query(name, "A") for name in names]
    with FakeUpstream() as upstream, socket.create_connection(upstream.addr, TIMEOUT) as conn:
        conn.sendall(
            b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
        )
        replies = [read_tcp_message(conn) for _ in queries]
        assert upstream.tcp_count == 3
        assert upstream.tcp_connections_accepted == 1
    assert sorted(reply.id for reply in replies) == sorted(query.id for query in queries)
    by_id = {reply.id: reply for reply in replies}
    assert by_id[queries[2].id].rcode() == dns.rcode.NXDOMAIN


def read_tcp_message(conn: socket.socket) -> dns.message.Message:
    """One length-prefixed DNS message from ``conn`` (RFC 1035 section 4.2.2)."""

    def read_exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = conn.recv(count - len(data))
            if not chunk:
                raise ConnectionError("connection closed mid-message")
            data += chunk
        return data

    (length,) = struct.unpack("!H", read_exactly(2))
    return dns.message.from_wire(read_exactly(length))


class ClosingUpstream(FakeUpstream):
    def handle(self, request: Request) -> Response:
        return Close() if request.transport == "tcp" else self.answer(request)


def test_close_ends_tcp_connection_without_answer() -> None:
    with ClosingUpstream() as upstream, socket.create_connection(upstream.addr, TIMEOUT) as conn:
        wire = dns.message.make_query("example.test.", "A").to_wire()
        conn.sendall(struct.pack("!H", len(wire)) + wire)
        conn.settimeout(TIMEOUT)
        assert conn.recv(2) == b""


def test_rate_limited_drops_above_budget() -> None:
    with (
        RateLimitedUpstream(pps=3) as upstream,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(("127.0.0.1", 0))
        for n in range(6):
            sock.sendto(dns.message.make_query(f"q{n}.test.", "A").to_wire(), upstream.addr)
        answered = receive_packets(sock, 6, 0.5)
        assert upstream.wait_for_queries(6, TIMEOUT)
    assert len(answered) == 3
    assert upstream.dropped == 3


def test_malformed_packets_are_counted_not_answered() -> None:
    with FakeUpstream() as upstream, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(b"\x00\x01garbage", upstream.addr)
        # The valid query after it proves the loop survived the garbage.
        sock.sendto(dns.message.make_query("example.test.", "A").to_wire(), upstream.addr)
        packets = receive_packets(sock, 2, 0.5)
        assert upstream.malformed_count == 1
        assert upstream.udp_count == 2
    assert len(packets) == 1


def test_handle_errors_are_recorded_and_serving_continues() -> None:
    class Broken(FakeUpstream):
        def handle(self, request: Request) -> Response:
            if request.message.question[0].name.to_text() == "boom.test.":
                raise ValueError("boom")
            return self.answer(request)

    with Broken() as upstream:
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(
                dns.message.make_query("boom.test.", "A"),
                upstream.address,
                port=upstream.port,
                timeout=0.3,
            )
        reply = dns.query.udp(
            dns.message.make_query("example.test.", "A"),
            upstream.address,
            port=upstream.port,
            timeout=TIMEOUT,
        )
        assert reply.rcode() == dns.rcode.NOERROR
        assert [type(error) for error in upstream.errors] == [ValueError]


def test_stop_is_prompt_and_releases_the_port() -> None:
    upstream = FakeUpstream().start()
    port = upstream.port
    threads_before = threading.active_count()
    started = time.monotonic()
    upstream.stop()
    assert time.monotonic() - started < 0.5
    assert threading.active_count() == threads_before - 1
    # The port is free again for both transports once the sockets are closed.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_make_upstream_by_name() -> None:
    upstream = make_upstream("wrong-id", then_correct=False)
    assert isinstance(upstream, WrongIdUpstream)
    assert upstream.then_correct is False
    with pytest.raises(KeyError):
        make_upstream("no-such-behaviour")
