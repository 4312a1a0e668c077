"""The real resolver (a subprocess of the CLI) in front of knotd or a fake upstream, asked by
real clients: dig, kdig and dnspython.

The knotd-backed tests share one resolver per module, so each test asks about its own domain
(``d{N}``) whenever the answer's freshness matters. The fake-upstream tests start a resolver of
their own, because they count what reaches the upstream.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from resolver.bench import authority
from resolver.bench.authority import Knot

from conftest import ResolverLauncher, ResolverProcess, require_binary
from fakeupstream import FakeUpstream, rrset_texts

TIMEOUT = 3.0
CLIENT_COMMAND_TIMEOUT_SECONDS = 15
# Short upstream timers so failure tests finish in about a second (config keys of
# resolver/config.py). max_tries x upstream_timeout stays below the deadline.
QUERY_DEADLINE_SECONDS = 1.0
FAST_FAILURE_CONFIG: dict[str, object] = {
    "upstream_timeout_seconds": 0.2,
    "query_deadline_seconds": QUERY_DEADLINE_SECONDS,
    "max_tries": 3,
}
# What the resolver advertises and accepts (DNS flag day 2020); see DESIGN.md section 3.
RESOLVER_PAYLOAD = 1232

StartUpstream = Callable[..., FakeUpstream]
StartResolver = Callable[..., ResolverProcess]


@pytest.fixture(scope="module")
def resolver(knot: Knot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResolverProcess]:
    """One resolver in front of the session's knotd for every knot-backed test here."""
    launcher = ResolverLauncher(tmp_path_factory.mktemp("resolver"))
    try:
        yield launcher.start(knot)
    finally:
        launcher.stop_all()


# -- clients --------------------------------------------------------------------------------


@dataclasses.dataclass
class DigOutput:
    """What dig or kdig printed, picked apart: header, flags, sections, EDNS, transport."""

    text: str
    status: str
    flags: set[str]
    question: list[str]
    answer: list[list[str]]
    authority: list[list[str]]
    edns_payload: int | None  # None when the reply had no OPT record
    transport: str  # "UDP" or "TCP": how the final reply came

    def records(self, rdtype: str, section: str = "answer") -> list[list[str]]:
        return [record for record in getattr(self, section) if record[3] == rdtype]


def _section(text: str, title: str) -> list[str]:
    """The lines of one ``;; TITLE SECTION:`` block (until the next blank line)."""
    match = re.search(rf"^;; {title} SECTION:\n(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    return match.group(1).splitlines() if match else []


def parse_dig(text: str) -> DigOutput:
    """Parse dig's and kdig's default output (their formats differ in separators only)."""
    status = re.search(r"status: (\w+)", text)
    flags = re.search(r"^;; [Ff]lags: ([a-z ]*)[;]", text, re.M)
    if status is None or flags is None:
        raise AssertionError(f"no DNS reply in client output:\n{text}")
    payload = re.search(r"udp: (\d+)|UDP size: (\d+) B", text)
    has_opt = ";; OPT PSEUDOSECTION:" in text or ";; EDNS PSEUDOSECTION:" in text
    transports = re.findall(r"\((UDP|TCP)\)", text)

    def records(title: str) -> list[list[str]]:
        return [line.split(None, 4) for line in _section(text, title) if not line.startswith(";")]

    return DigOutput(
        text=text,
        status=status.group(1),
        flags=set(flags.group(1).split()),
        question=[line.lstrip("; ").split()[0] for line in _section(text, "QUESTION")],
        answer=records("ANSWER"),
        authority=records("AUTHORITY"),
        edns_payload=int(payload.group(1) or payload.group(2)) if has_opt and payload else None,
        transport=transports[-1] if transports else "",
    )


def run_client(command: list[str]) -> str:
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=CLIENT_COMMAND_TIMEOUT_SECONDS
    )
    assert completed.returncode == 0, f"{' '.join(command)}\n{completed.stdout}{completed.stderr}"
    return completed.stdout


def dig(resolver: ResolverProcess, *args: str) -> DigOutput:
    """``dig @resolver`` with one try; dig sends only to the server named with @."""
    command = [require_binary("dig"), f"@{resolver.address}", "-p", str(resolver.port)]
    return parse_dig(run_client([*command, "+tries=1", "+time=3", *args]))


def kdig(resolver: ResolverProcess, *args: str) -> DigOutput:
    command = [require_binary("kdig"), f"@{resolver.address}", "-p", str(resolver.port)]
    return parse_dig(run_client([*command, "+retry=0", "+timeout=3", *args]))


def ask_udp(
    resolver: ResolverProcess, name: str, rdtype: str, payload: int | None = 1232
) -> dns.message.Message:
    """dnspython over UDP; ``payload=None`` sends no OPT record."""
    if payload is None:
        query = dns.message.make_query(name, rdtype, use_edns=False)
    else:
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=payload)
    return dns.query.udp(query, resolver.address, port=resolver.port, timeout=TIMEOUT)


def ask_tcp(resolver: ResolverProcess, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
    return dns.query.tcp(query, resolver.address, port=resolver.port, timeout=TIMEOUT)


def rdtypes(rrsets: list[dns.rrset.RRset]) -> list[str]:
    return [dns.rdatatype.to_text(rrset.rdtype) for rrset in rrsets]


def txt_value(reply: dns.message.Message) -> list[str]:
    """Each TXT record's character-strings joined, decoded (RFC 7208 section 3.3)."""
    return sorted(
        b"".join(rdata.strings).decode()
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.TXT
        for rdata in rrset
    )


# -- positive answers from knotd --------------------------------------------------------------


def test_mx_with_dig(resolver: ResolverProcess) -> None:
    out = dig(resolver, "d1.test.", "MX")
    assert out.status == "NOERROR"
    assert {"qr", "rd", "ra"} <= out.flags
    assert "aa" not in out.flags  # a forwarder is not authoritative (RFC 1035 section 4.1.1)
    assert sorted(record[4] for record in out.records("MX")) == [
        "10 mx1.d1.test.",
        "20 mx2.d1.test.",
    ]
    dig_short = [require_binary("dig"), "@127.0.0.1", "-p", str(resolver.port), "+short"]
    short = run_client([*dig_short, "+tries=1", "d1.test.", "MX"])
    assert sorted(short.split("\n")[:2]) == ["10 mx1.d1.test.", "20 mx2.d1.test."]


def test_a_and_aaaa_with_kdig(resolver: ResolverProcess) -> None:
    a = kdig(resolver, "mx1.d2.test.", "A")
    aaaa = kdig(resolver, "mx2.d2.test.", "AAAA")
    assert (a.status, aaaa.status) == ("NOERROR", "NOERROR")
    assert [record[4] for record in a.records("A")] == [authority.mx1_ipv4(2)]
    assert [record[4] for record in aaaa.records("AAAA")] == [authority.mx2_ipv6(2)]
    assert int(a.records("A")[0][1]) <= authority.TTL_ADDRESS


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("d3.test.", authority.spf_text(3)),
        ("_dmarc.d3.test.", authority.dmarc_text(3)),
        ("sel1._domainkey.d3.test.", authority.dkim_text(3, seed=1)),
    ],
    ids=["spf", "dmarc", "dkim"],
)
def test_txt_with_dnspython(resolver: ResolverProcess, name: str, expected: str) -> None:
    reply = ask_udp(resolver, name, "TXT")
    assert reply.rcode() == dns.rcode.NOERROR
    assert txt_value(reply) == [expected]
    # The DKIM key spans two character-strings; they must arrive as two, not merged.
    if "_domainkey" in name:
        assert len(reply.answer[0][0].strings) == 2


def test_ptr_with_dig(resolver: ResolverProcess) -> None:
    out = dig(resolver, "-x", "192.0.2.5")
    assert out.status == "NOERROR"
    assert [record[4] for record in out.records("PTR")] == ["mx1.d4.test."]


def test_tlsa_with_kdig(resolver: ResolverProcess) -> None:
    out = kdig(resolver, "_25._tcp.mx1.d5.test.", "TLSA")
    assert out.status == "NOERROR"
    assert [record[4].lower() for record in out.records("TLSA")] == [
        f"3 1 1 {authority.tlsa_digest(5, seed=1)}"
    ]


def test_cname_chain_is_answered_whole(resolver: ResolverProcess) -> None:
    reply = ask_udp(resolver, "www.d6.test.", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    chain = [(rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype)) for rrset in reply.answer]
    assert chain == [
        ("www.d6.test.", "CNAME"),
        ("alias.d6.test.", "CNAME"),
        ("mx1.d6.test.", "A"),
    ]
    assert rrset_texts(reply.answer[2:]) == [authority.mx1_ipv4(6)]
    # And once more from the cache, over TCP: still the whole chain.
    again = ask_tcp(resolver, "www.d6.test.", "A")
    assert rdtypes(again.answer) == ["CNAME", "CNAME", "A"]


# -- negative answers ----------------------------------------------------------------------


def test_nxdomain(resolver: ResolverProcess) -> None:
    out = dig(resolver, "nx-dig.test.", "A")
    assert out.status == "NXDOMAIN"
    assert out.answer == []
    assert [record[3] for record in out.authority] == ["SOA"]
    reply = ask_udp(resolver, "nx-dnspython.test.", "MX")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert rdtypes(reply.authority) == ["SOA"]
    # RFC 2308 section 5: the SOA's TTL bounds how long the client may cache the denial.
    assert reply.authority[0].ttl <= authority.NEGATIVE_TTL


def test_nxdomain_is_cached_and_stays_nxdomain(resolver: ResolverProcess) -> None:
    first = ask_udp(resolver, "nx-twice.test.", "A")
    second = ask_udp(resolver, "nx-twice.test.", "A")
    assert first.rcode() == second.rcode() == dns.rcode.NXDOMAIN
    assert rdtypes(second.authority) == ["SOA"]
    assert second.authority[0].ttl <= first.authority[0].ttl


def test_nodata(resolver: ResolverProcess) -> None:
    out = kdig(resolver, "nodata.test.", "MX")
    assert out.status == "NOERROR"
    assert out.answer == []
    assert [record[3] for record in out.authority] == ["SOA"]
    reply = ask_udp(resolver, "nodata.test.", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer == []
    assert rdtypes(reply.authority) == ["SOA"]
    # The name exists: its A record is still there (NODATA is per type, RFC 2308 section 2.2).
    assert rrset_texts(ask_udp(resolver, "nodata.test.", "A").answer) == ["192.0.2.255"]


# -- truncation and EDNS ------------------------------------------------------------------------


def test_big_txt_truncated_over_udp(resolver: ResolverProcess) -> None:
    reply = ask_udp(resolver, "big.test.", "TXT", payload=1232)
    assert reply.flags & dns.flags.TC
    assert reply.rcode() == dns.rcode.NOERROR
    out = dig(resolver, "+ignore", "+notcp", "big.test.", "TXT")
    assert "tc" in out.flags
    assert out.transport == "UDP"
    # Without EDNS the limit is 512 bytes (RFC 1035 section 4.2.1): truncated as well.
    assert ask_udp(resolver, "big.test.", "TXT", payload=None).flags & dns.flags.TC


def test_big_txt_whole_over_tcp(resolver: ResolverProcess) -> None:
    # dig's default: on TC it retries over TCP and prints the full RRset.
    out = dig(resolver, "big.test.", "TXT")
    assert out.status == "NOERROR"
    assert "tc" not in out.flags
    assert out.transport == "TCP"
    assert len(out.records("TXT")) == authority.BIG_TXT_COUNT
    reply = ask_tcp(resolver, "big.test.", "TXT")
    assert not reply.flags & dns.flags.TC
    assert txt_value(reply) == sorted(authority.big_txt_strings())


@pytest.mark.parametrize("client_payload", [256, 512, 1000, 1232, 4096])
def test_edns_payload_advertised(resolver: ResolverProcess, client_payload: int) -> None:
    reply = ask_udp(resolver, "d7.test.", "MX", payload=client_payload)
    assert reply.edns == 0
    # RFC 6891 section 6.2.5: a payload below 512 counts as 512.
    assert reply.payload == min(max(client_payload, 512), RESOLVER_PAYLOAD)


def test_cached_answer_keeps_opt_matching_each_query(resolver: ResolverProcess) -> None:
    # The first query (with EDNS) fills the cache; the hit without EDNS must not carry OPT,
    # and the hit with EDNS again must (DESIGN.md section 3: whether the query had EDNS
    # belongs in the key, or the entry keeps both renderings).
    assert ask_udp(resolver, "d13.test.", "MX", payload=1232).edns == 0
    assert ask_udp(resolver, "d13.test.", "MX", payload=None).edns == -1
    assert ask_udp(resolver, "d13.test.", "MX", payload=4096).edns == 0


def test_edns_opt_only_when_asked(resolver: ResolverProcess) -> None:
    # RFC 6891 section 7: no OPT in the reply to a query without one. Asked twice so that
    # both the miss and the cached rendering are checked.
    for _ in range(2):
        out = dig(resolver, "+noedns", "d8.test.", "MX")
        assert out.status == "NOERROR"
        assert out.edns_payload is None
        assert ";; OPT PSEUDOSECTION:" not in out.text
        assert ask_udp(resolver, "d8.test.", "MX", payload=None).edns == -1
    with_edns = dig(resolver, "+bufsize=4096", "d8.test.", "MX")
    assert with_edns.edns_payload == RESOLVER_PAYLOAD


def test_question_case_is_echoed(resolver: ResolverProcess) -> None:
    # dnspython compares names case-insensitively, so compare the label bytes themselves.
    for asked in ("D9.TeSt.", "d9.TEST.", "d9.test."):
        reply = ask_udp(resolver, asked, "MX")
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.question[0].name.to_text() == asked
        assert len(reply.answer[0]) == 2


# -- the cache ---------------------------------------------------------------------------------


def test_second_answer_ttl_does_not_grow(resolver: ResolverProcess) -> None:
    first = ask_udp(resolver, "d10.test.", "MX")
    second = ask_udp(resolver, "d10.test.", "MX")
    assert first.answer[0].ttl <= authority.TTL_MX
    assert second.answer[0].ttl <= first.answer[0].ttl
    assert rrset_texts(second.answer) == rrset_texts(first.answer)


def test_cached_ttl_ages(resolver: ResolverProcess) -> None:
    # Not a synchronisation sleep: the cache counts whole seconds, so we poll (bounded) until
    # at least one has passed and the TTL handed out must have dropped with it.
    first = ask_udp(resolver, "d14.test.", "MX").answer[0].ttl
    deadline = time.monotonic() + 3.0
    aged = first
    while aged >= first and time.monotonic() < deadline:
        time.sleep(0.2)
        aged = ask_udp(resolver, "d14.test.", "MX").answer[0].ttl
    assert first - 3 <= aged < first


# -- robustness --------------------------------------------------------------------------------


def test_malformed_and_unsupported_queries(resolver: ResolverProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(TIMEOUT)
        # A header with no question: FORMERR (RFC 1035 section 4.1.1), same ID.
        sock.sendto(struct.pack("!HHHHHH", 0x1234, 0x0100, 0, 0, 0, 0), resolver.addr)
        formerr = dns.message.from_wire(sock.recv(65535), question_only=True)
        assert (formerr.id, formerr.rcode()) == (0x1234, dns.rcode.FORMERR)
        assert formerr.flags & dns.flags.QR
        # Opcode UPDATE is not something a forwarding cache does: NOTIMP.
        update = dns.message.make_query("d15.test.", "SOA")
        update.set_opcode(dns.opcode.UPDATE)
        sock.sendto(update.to_wire(), resolver.addr)
        notimp = dns.message.from_wire(sock.recv(65535), question_only=True)
        assert (notimp.id, notimp.rcode()) == (update.id, dns.rcode.NOTIMP)
        # Garbage too short for a header gets nothing back (there is no ID to answer to)...
        sock.sendto(b"\x01\x02\x03", resolver.addr)
    # ...and the resolver keeps serving.
    reply = ask_udp(resolver, "d15.test.", "MX")
    assert reply.rcode() == dns.rcode.NOERROR
    assert resolver.process.poll() is None, resolver.stderr_text()


# -- TCP ---------------------------------------------------------------------------------------


def read_tcp_message(conn: socket.socket) -> dns.message.Message:
    """One length-prefixed DNS message (RFC 1035 section 4.2.2), reading until complete."""

    def read_exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = conn.recv(count - len(data))
            if not chunk:
                raise ConnectionError(f"connection closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    (length,) = struct.unpack("!H", read_exactly(2))
    return dns.message.from_wire(read_exactly(length))


def test_tcp_pipelined_queries(resolver: ResolverProcess) -> None:
    # RFC 7766 section 6.2.1.1: several queries on one connection, answers in any order.
    queries = [
        dns.message.make_query("d11.test.", "MX"),
        dns.message.make_query("mx1.d11.test.", "A"),
        dns.message.make_query("nx-pipelined.test.", "A"),
    ]
    wire = b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
    with socket.create_connection(resolver.addr, timeout=TIMEOUT) as conn:
        conn.sendall(wire)
        replies = {reply.id: reply for reply in (read_tcp_message(conn) for _ in queries)}
    assert sorted(replies) == sorted(query.id for query in queries)
    for query in queries:
        assert replies[query.id].question == query.question
    assert rdtypes(replies[queries[0].id].answer) == ["MX"]
    assert rrset_texts(replies[queries[1].id].answer) == [authority.mx1_ipv4(11)]
    assert replies[queries[2].id].rcode() == dns.rcode.NXDOMAIN


def test_tcp_query_split_across_segments(resolver: ResolverProcess) -> None:
    # A length prefix and message arriving in pieces must be reassembled (RFC 7766 section 8).
    query = dns.message.make_query("d16.test.", "MX")
    wire = query.to_wire()
    framed = struct.pack("!H", len(wire)) + wire
    with socket.create_connection(resolver.addr, timeout=TIMEOUT) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (framed[:1], framed[1:5], framed[5:]):
            conn.sendall(piece)
            # Give each piece its own segment; correctness does not depend on this pause.
            time.sleep(0.02)
        reply = read_tcp_message(conn)
    assert reply.id == query.id
    assert len(reply.answer[0]) == 2


def test_kdig_over_tcp(resolver: ResolverProcess) -> None:
    out = kdig(resolver, "+tcp", "d12.test.", "MX")
    assert out.status == "NOERROR"
    assert out.transport == "TCP"
    assert len(out.records("MX")) == 2


# -- fake upstream: what reaches the upstream -----------------------------------------------


def queries_for(upstream: FakeUpstream, name: str) -> list[str]:
    """The transports of the queries for ``name`` the upstream received (probe excluded)."""
    return [
        request.transport
        for request in upstream.queries
        if request.message.question[0].name.to_text().lower() == name.lower()
    ]


def test_cache_hit_does_not_reach_upstream(
    fake_upstream: StartUpstream, resolver_process: StartResolver
) -> None:
    upstream = fake_upstream()
    process = resolver_process(upstream)
    first = ask_udp(process, "example.test.", "A")
    assert rrset_texts(first.answer) == ["192.0.2.1"]
    assert queries_for(upstream, "example.test.") == ["udp"]
    second = ask_udp(process, "EXAMPLE.test.", "A")
    third = ask_tcp(process, "example.test.", "A")
    assert rrset_texts(second.answer) == rrset_texts(third.answer) == ["192.0.2.1"]
    assert queries_for(upstream, "example.test.") == ["udp"]
    # The upstream said TTL 300; the cached copy must not claim more.
    assert second.answer[0].ttl <= upstream.ttl


def test_concurrent_misses_are_coalesced(
    fake_upstream: StartUpstream, resolver_process: StartResolver
) -> None:
    upstream = fake_upstream("slow", delay_seconds=0.3)
    process = resolver_process(upstream)
    queries = [dns.message.make_query("mx1.example.test.", "A") for _ in range(20)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for query in queries:
            sock.sendto(query.to_wire(), process.addr)
        replies = []
        deadline = time.monotonic() + TIMEOUT
        while len(replies) < len(queries) and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                replies.append(dns.message.from_wire(sock.recv(65535)))
            except TimeoutError:
                break
    assert sorted(reply.id for reply in replies) == sorted(query.id for query in queries)
    assert all(rrset_texts(reply.answer) == ["192.0.2.11"] for reply in replies)
    assert queries_for(upstream, "mx1.example.test.") == ["udp"]


@pytest.mark.parametrize("behaviour", ["servfail", "refused"])
def test_upstream_failure_gives_servfail_never_nxdomain(
    fake_upstream: StartUpstream, resolver_process: StartResolver, behaviour: str
) -> None:
    upstream = fake_upstream(behaviour)
    process = resolver_process(upstream, config=FAST_FAILURE_CONFIG)
    reply = ask_udp(process, "example.test.", "A")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.answer == []
    assert queries_for(upstream, "example.test.")  # it did ask


def test_dropping_upstream_gives_servfail_by_the_deadline(
    fake_upstream: StartUpstream, resolver_process: StartResolver
) -> None:
    upstream = fake_upstream("drop")
    process = resolver_process(upstream, config=FAST_FAILURE_CONFIG)
    started = time.monotonic()
    reply = ask_udp(process, "example.test.", "A")
    elapsed = time.monotonic() - started
    assert reply.rcode() == dns.rcode.SERVFAIL
    # At least one per-try timeout passed, and the deadline (plus scheduling slack) held.
    assert 0.2 <= elapsed <= FAST_FAILURE_CONFIG["query_deadline_seconds"] + 0.5
    # Tries are bounded: max_tries, all upstreams together.
    assert 1 <= len(queries_for(upstream, "example.test.")) <= 3


@pytest.mark.parametrize("behaviour", ["wrong-id", "wrong-question", "other-port"])
def test_spoofed_reply_is_ignored_and_the_real_one_used(
    fake_upstream: StartUpstream, resolver_process: StartResolver, behaviour: str
) -> None:
    upstream = fake_upstream(behaviour, then_correct=True)
    process = resolver_process(upstream, config=FAST_FAILURE_CONFIG)
    reply = ask_udp(process, "example.test.", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.question[0].name.to_text() == "example.test."
    assert rrset_texts(reply.answer) == ["192.0.2.1"]  # not the forged 203.0.113.66


@pytest.mark.parametrize("behaviour", ["wrong-id", "wrong-question", "other-port"])
def test_spoofed_reply_alone_gives_servfail(
    fake_upstream: StartUpstream, resolver_process: StartResolver, behaviour: str
) -> None:
    upstream = fake_upstream(behaviour, then_correct=False)
    process = resolver_process(upstream, config=FAST_FAILURE_CONFIG)
    reply = ask_udp(process, "example.test.", "A")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.answer == []


def test_negative_answer_is_cached(
    fake_upstream: StartUpstream, resolver_process: StartResolver
) -> None:
    upstream = fake_upstream()
    process = resolver_process(upstream)
    for _ in range(3):
        reply = ask_udp(process, "missing.test.", "A")
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert rdtypes(reply.authority) == ["SOA"]
        assert reply.authority[0].ttl <= 60  # the fake's SOA TTL and MINIMUM
    assert queries_for(upstream, "missing.test.") == ["udp"]


def test_failure_is_cached_briefly(
    fake_upstream: StartUpstream, resolver_process: StartResolver
) -> None:
    # RFC 9520 section 3.2: a resolver caches resolution failures (here failure_ttl_seconds,
    # 5 s by default), so an MTA retrying at once does not multiply the upstream's load.
    upstream = fake_upstream("servfail")
    process = resolver_process(upstream, config=FAST_FAILURE_CONFIG)
    assert ask_udp(process, "example.test.", "A").rcode() == dns.rcode.SERVFAIL
    tries = len(queries_for(upstream, "example.test."))
    assert ask_udp(process, "example.test.", "A").rcode() == dns.rcode.SERVFAIL
    assert len(queries_for(upstream, "example.test.")) == tries


def test_upstream_queries_use_fresh_ids_and_ports(
    fake_upstream: StartUpstream, resolver_process: StartResolver
) -> None:
    # RFC 5452 section 9.2: random ID and random source port for each upstream query.
    upstream = fake_upstream(answers={(f"r{n}.test.", "A"): ["192.0.2.7"] for n in range(8)})
    process = resolver_process(upstream)
    client_ids = []
    for n in range(8):
        query = dns.message.make_query(f"r{n}.test.", "A")
        client_ids.append(query.id)
        reply = dns.query.udp(query, process.address, port=process.port, timeout=TIMEOUT)
        assert rrset_texts(reply.answer) == ["192.0.2.7"]
    names = {f"r{n}.test." for n in range(8)}
    sent = [r for r in upstream.queries if r.message.question[0].name.to_text() in names]
    assert len(sent) == 8
    assert [r.message.id for r in sent] != client_ids
    assert len({r.peer[1] for r in sent}) > 1


def test_sigterm_stops_promptly_and_cleanly(
    fake_upstream: StartUpstream, resolver_process: StartResolver
) -> None:
    process = resolver_process(fake_upstream())
    started = time.monotonic()
    process.stop()
    assert time.monotonic() - started < 3.0
    assert process.returncode == 0, process.stderr_text()


def test_truncated_upstream_reply_is_retried_over_tcp(
    fake_upstream: StartUpstream, resolver_process: StartResolver
) -> None:
    upstream = fake_upstream("truncate")
    process = resolver_process(upstream)
    small = ask_udp(process, "example.test.", "MX")
    assert not small.flags & dns.flags.TC
    assert rrset_texts(small.answer) == ["10 mx1.example.test.", "20 mx2.example.test."]
    assert queries_for(upstream, "example.test.") == ["udp", "tcp"]
    # The big RRset: the client over UDP gets TC, then over TCP gets all of it from the cache.
    big_udp = ask_udp(process, "big.test.", "TXT")
    assert big_udp.flags & dns.flags.TC
    big_tcp = ask_tcp(process, "big.test.", "TXT")
    assert len(big_tcp.answer[0]) == 8
    assert queries_for(upstream, "big.test.") == ["udp", "tcp"]
