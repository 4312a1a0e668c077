"""A fake upstream DNS server for fault injection, in the style of dnspython's nanonameserver.

Its whole behaviour is one method, ``handle(request) -> response``. A response may be:

- a ``dns.message.Message`` (rendered and sent, length-prefixed over TCP),
- ``bytes`` (sent as they are over UDP; length-prefixed over TCP),
- ``None`` (dropped silently),
- ``Delayed(seconds, response)`` (sent later without holding up other queries),
- ``FromOtherPort(response)`` (over UDP, sent from a second socket with a different source
  port: a reply an off-path spoofer could send; over TCP it is sent normally),
- ``Close()`` (over TCP, close the connection without answering; over UDP, nothing),
- a list of the above, sent in order (e.g. a spoofed reply, then the right one).

The server runs in a background thread with blocking sockets and a ``select`` loop, so it
serves trio tests and resolver subprocesses alike. Delays live in a heap the same loop drains:
one thread, no timers, and a slow answer never blocks the next query.

Every received query is recorded in ``.queries`` (``Request`` objects with the parsed message,
transport and arrival time) and counted in ``.udp_count`` / ``.tcp_count``. Only the server
thread writes them; tests read them, or wait with ``wait_for_queries``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

LOOP_TICK_SECONDS = 0.05  # how long the server loop sleeps in select: bounds stop() latency
JOIN_TIMEOUT_SECONDS = 2.0
DEFAULT_TTL = 300
NEGATIVE_TTL = 60
UPSTREAM_PAYLOAD = 1232  # what a modern recursive server advertises (DNS flag day 2020)

# A small default data set: enough for MX → A lookups, a TXT, a CNAME and a big RRset.
DEFAULT_ZONE = "test."
BIG_TXT = [f"{n:02d}" + chr(ord("a") + n) * 238 for n in range(8)]  # 1928 bytes of rdata
DEFAULT_ANSWERS: dict[tuple[str, str], list[str]] = {
    ("example.test.", "A"): ["192.0.2.1"],
    ("example.test.", "AAAA"): ["2001:db8::1"],
    ("example.test.", "MX"): ["10 mx1.example.test.", "20 mx2.example.test."],
    ("example.test.", "TXT"): ['"v=spf1 mx ~all"'],
    ("mx1.example.test.", "A"): ["192.0.2.11"],
    ("mx2.example.test.", "A"): ["192.0.2.12"],
    ("www.example.test.", "CNAME"): ["example.test."],
    ("nodata.test.", "A"): ["192.0.2.99"],
    ("big.test.", "TXT"): [f'"{text}"' for text in BIG_TXT],
}


@dataclasses.dataclass(frozen=True)
class Request:
    """One query as the fake received it."""

    message: dns.message.Message
    wire: bytes
    transport: str  # "udp" or "tcp"
    peer: tuple[str, int]
    arrival: float  # time.monotonic() when it was read


@dataclasses.dataclass(frozen=True)
class Delayed:
    """Send ``response`` after ``seconds``, without delaying anything else."""

    seconds: float
    response: Response


@dataclasses.dataclass(frozen=True)
class FromOtherPort:
    """Over UDP, send ``response`` from a socket whose source port differs from the server's."""

    response: dns.message.Message | bytes


@dataclasses.dataclass(frozen=True)
class Close:
    """Over TCP, close the connection instead of answering (nothing happens over UDP)."""


Response = dns.message.Message | bytes | Delayed | FromOtherPort | Close | list | None


@dataclasses.dataclass
class _TcpConnection:
    sock: socket.socket
    peer: tuple[str, int]
    buffer: bytes = b""


class FakeUpstream:
    """A loopback DNS server on one ephemeral port for UDP and TCP; override ``handle``."""

    def __init__(
        self,
        answers: dict[tuple[str, str], list[str]] | None = None,
        ttl: int = DEFAULT_TTL,
        address: str = "127.0.0.1",
    ) -> None:
        self.answers = {
            (name.lower(), rdtype.upper()): rdatas
            for (name, rdtype), rdatas in (DEFAULT_ANSWERS if answers is None else answers).items()
        }
        self.ttl = ttl
        self.address = address
        self.port = 0
        self.queries: list[Request] = []
        self.udp_count = 0
        self.tcp_count = 0
        self.malformed_count = 0
        self.tcp_connections_accepted = 0
        self.errors: list[BaseException] = []  # exceptions raised by handle(), for debugging
        self._udp: socket.socket | None = None
        self._other_udp: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._connections: dict[socket.socket, _TcpConnection] = {}
        self._pending: list[tuple[float, int, Response, str, object]] = []
        self._sequence = itertools.count()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what tests override ----------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Answer from ``self.answers``: NOERROR with data, NODATA, or NXDOMAIN."""
        return self.answer(request)

    # -- building blocks for handle() -------------------------------------------------------

    def answer(self, request: Request) -> dns.message.Message:
        """The correct reply to ``request`` from ``self.answers`` (follows CNAMEs one level)."""
        query = request.message
        reply = self.make_reply(query)
        question = query.question[0]
        qname = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        names_present = {name for name, _ in self.answers}
        rdatas = self.answers.get((qname, rdtype))
        if rdatas is None and rdtype != "CNAME" and (qname, "CNAME") in self.answers:
            # RFC 1034 section 4.3.2: answer with the CNAME and what it points to, if known.
            target = self.answers[(qname, "CNAME")][0].lower()
            reply.answer.append(self._rrset(question.name, "CNAME", [target]))
            if (target, rdtype) in self.answers:
                target_name = dns.name.from_text(target)
                reply.answer.append(
                    self._rrset(target_name, rdtype, self.answers[(target, rdtype)])
                )
            return reply
        if rdatas is not None:
            reply.answer.append(self._rrset(question.name, rdtype, rdatas))
            return reply
        if qname not in names_present:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        # RFC 2308 section 3: negative answers carry the zone's SOA in the authority section.
        reply.authority.append(self.soa_rrset())
        return reply

    def make_reply(
        self, query: dns.message.Message, rcode: int = dns.rcode.NOERROR
    ) -> dns.message.Message:
        """An empty reply to ``query`` with RA set, EDNS mirrored, and ``rcode``."""
        reply = dns.message.make_response(
            query, recursion_available=True, our_payload=UPSTREAM_PAYLOAD
        )
        reply.set_rcode(rcode)
        return reply

    def soa_rrset(self) -> dns.rrset.RRset:
        return dns.rrset.from_text(
            DEFAULT_ZONE,
            NEGATIVE_TTL,
            "IN",
            "SOA",
            f"ns1.{DEFAULT_ZONE} hostmaster.{DEFAULT_ZONE} 1 3600 900 604800 {NEGATIVE_TTL}",
        )

    def _rrset(self, name: dns.name.Name, rdtype: str, rdatas: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(name, self.ttl, dns.rdataclass.IN, rdtype, rdatas)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def addr(self) -> tuple[str, int]:
        return (self.address, self.port)

    def start(self) -> FakeUpstream:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        # UDP and TCP must share one port number: bind UDP first, then try TCP on the same
        # port, and retry with a fresh port if something else holds it over TCP.
        for _attempt in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.address, 0))
            port = udp.getsockname()[1]
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((self.address, port))
            except OSError:
                udp.close()
                listener.close()
                continue
            listener.listen(64)
            break
        else:
            raise RuntimeError(f"no port free for both UDP and TCP on {self.address}")
        other = socket.socket(family, socket.SOCK_DGRAM)
        other.bind((self.address, 0))
        self._udp, self._listener, self._other_udp, self.port = udp, listener, other, port
        self._thread = threading.Thread(
            target=self._serve, name=f"FakeUpstream:{port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the server thread (within about one loop tick) and close every socket."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                raise RuntimeError("FakeUpstream thread did not stop")
            self._thread = None
        self._close_all()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for_queries(self, count: int, timeout_seconds: float = 5.0) -> bool:
        """Wait (bounded) until at least ``count`` queries arrived; True if they did."""
        deadline = time.monotonic() + timeout_seconds
        while len(self.queries) < count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- the server loop --------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None and self._listener is not None
        while not self._stopping.is_set():
            timeout = LOOP_TICK_SECONDS
            if self._pending:
                timeout = max(0.0, min(timeout, self._pending[0][0] - time.monotonic()))
            readable, _, _ = select.select(
                [self._udp, self._listener, *self._connections], [], [], timeout
            )
            for sock in readable:
                if sock is self._udp:
                    self._read_udp()
                elif sock is self._listener:
                    self._accept()
                else:
                    self._read_tcp(self._connections[sock])
            self._send_due()

    def _read_udp(self) -> None:
        assert self._udp is not None
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        self.udp_count += 1
        self._dispatch(wire, "udp", peer, peer)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, peer = self._listener.accept()
        except OSError:
            return
        self.tcp_connections_accepted += 1
        self._connections[sock] = _TcpConnection(sock, peer)

    def _read_tcp(self, connection: _TcpConnection) -> None:
        try:
            data = connection.sock.recv(65535)
        except OSError:
            data = b""
        if not data:
            self._close_tcp(connection.sock)
            return
        connection.buffer += data
        # RFC 1035 section 4.2.2 / RFC 7766: two-octet length prefix; several may be pipelined.
        while len(connection.buffer) >= 2:
            (length,) = struct.unpack("!H", connection.buffer[:2])
            if len(connection.buffer) < 2 + length:
                break
            wire = connection.buffer[2 : 2 + length]
            connection.buffer = connection.buffer[2 + length :]
            self.tcp_count += 1
            self._dispatch(wire, "tcp", connection.peer, connection.sock)

    def _dispatch(self, wire: bytes, transport: str, peer: tuple[str, int], target: object) -> None:
        arrival = time.monotonic()
        try:
            message = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            self.malformed_count += 1
            return
        request = Request(message, wire, transport, peer, arrival)
        self.queries.append(request)
        try:
            response = self.handle(request)
        except Exception as error:  # a bug in a test's handle(): record it, keep serving
            self.errors.append(error)
            return
        self._emit(response, transport, target)

    def _emit(self, response: Response, transport: str, target: object) -> None:
        if response is None:
            return
        if isinstance(response, list):
            for part in response:
                self._emit(part, transport, target)
            return
        if isinstance(response, Delayed):
            due = time.monotonic() + response.seconds
            heapq.heappush(
                self._pending, (due, next(self._sequence), response.response, transport, target)
            )
            return
        if isinstance(response, Close):
            if transport == "tcp" and isinstance(target, socket.socket):
                self._close_tcp(target)
            return
        if isinstance(response, FromOtherPort):
            self._emit_wire(response.response, transport, target, from_other_port=True)
        else:
            self._emit_wire(response, transport, target, from_other_port=False)

    def _emit_wire(
        self,
        response: dns.message.Message | bytes,
        transport: str,
        target: object,
        from_other_port: bool,
    ) -> None:
        wire = response if isinstance(response, bytes) else response.to_wire(max_size=65535)
        try:
            if transport == "udp":
                sock = self._other_udp if from_other_port else self._udp
                assert sock is not None and isinstance(target, tuple)
                sock.sendto(wire, target)
            elif isinstance(target, socket.socket) and target in self._connections:
                target.sendall(struct.pack("!H", len(wire)) + wire)
        except OSError:
            # The client went away (closed TCP connection, unreachable port): like a lost packet.
            return

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._pending and self._pending[0][0] <= now:
            _, _, response, transport, target = heapq.heappop(self._pending)
            self._emit(response, transport, target)

    def _close_tcp(self, sock: socket.socket) -> None:
        self._connections.pop(sock, None)
        with contextlib.suppress(OSError):
            sock.close()

    def _close_all(self) -> None:
        for sock in list(self._connections):
            self._close_tcp(sock)
        for sock in (self._udp, self._listener, self._other_udp):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._udp = self._listener = self._other_udp = None
        self._pending.clear()


# -- ready-made behaviours --------------------------------------------------------------------


class DroppingUpstream(FakeUpstream):
    """Receives and counts everything, answers nothing (a throttled VPC resolver)."""

    def handle(self, request: Request) -> Response:
        return None


class SlowUpstream(FakeUpstream):
    """Answers correctly, ``delay_seconds`` late."""

    def __init__(self, delay_seconds: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.delay_seconds = delay_seconds

    def handle(self, request: Request) -> Response:
        return Delayed(self.delay_seconds, self.answer(request))


class RcodeUpstream(FakeUpstream):
    """Answers every query with an empty reply carrying ``rcode`` (e.g. SERVFAIL, REFUSED)."""

    def __init__(self, rcode: int = dns.rcode.SERVFAIL, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.rcode = rcode

    def handle(self, request: Request) -> Response:
        return self.make_reply(request.message, self.rcode)


class ServfailUpstream(RcodeUpstream):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(rcode=dns.rcode.SERVFAIL, **kwargs)


class RefusedUpstream(RcodeUpstream):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(rcode=dns.rcode.REFUSED, **kwargs)


class SpoofingUpstream(FakeUpstream):
    """Sends a forged reply first; then, if ``then_correct``, the right one.

    Subclasses say how the forgery differs (``forge``). A resolver that follows RFC 5452
    section 9.1 (match ID, source address and port, and question) ignores the forgery: the
    client gets the right answer when it follows, and SERVFAIL when none does.
    """

    def __init__(self, then_correct: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.then_correct = then_correct

    def forge(self, request: Request) -> Response:
        raise NotImplementedError

    def handle(self, request: Request) -> Response:
        forged = self.forge(request)
        return [forged, self.answer(request)] if self.then_correct else forged


class WrongIdUpstream(SpoofingUpstream):
    """The forgery has a different message ID."""

    def forge(self, request: Request) -> Response:
        reply = self.answer(request)
        reply.id = (reply.id + 1) & 0xFFFF
        return reply


class WrongQuestionUpstream(SpoofingUpstream):
    """The forgery has the right ID but answers a different question."""

    def forge(self, request: Request) -> Response:
        question = request.message.question[0]
        other = dns.name.Name((b"spoofed", *question.name.labels))
        reply = self.make_reply(request.message)
        reply.question = [dns.rrset.RRset(other, question.rdclass, question.rdtype)]
        reply.answer.append(
            dns.rrset.from_text(other, self.ttl, "IN", "A", "203.0.113.66")
            if question.rdtype == dns.rdatatype.A
            else dns.rrset.from_text(other, self.ttl, "IN", "TXT", '"spoofed"')
        )
        return reply


class OtherPortUpstream(SpoofingUpstream):
    """The forgery is the right reply, but sent from another source port (over UDP)."""

    def forge(self, request: Request) -> Response:
        reply = self.answer(request)
        # Poison the data too, so a resolver that accepted it would be caught by the answer.
        if request.message.question[0].rdtype == dns.rdatatype.A and reply.answer:
            reply.answer = [
                dns.rrset.from_text(
                    request.message.question[0].name, self.ttl, "IN", "A", "203.0.113.66"
                )
            ]
        return FromOtherPort(reply)


class TruncatingUpstream(FakeUpstream):
    """Over UDP, an empty reply with TC=1; over TCP, the full answer (RFC 7766 section 5)."""

    def handle(self, request: Request) -> Response:
        if request.transport == "udp":
            reply = self.make_reply(request.message)
            reply.flags |= dns.flags.TC
            return reply
        return self.answer(request)


class RateLimitedUpstream(FakeUpstream):
    """Answers at most ``pps`` queries per second and silently drops the rest (AWS VPC style).

    A one-second fixed window is enough for tests and keeps the counting obvious.
    """

    def __init__(self, pps: int = 10, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.pps = pps
        self.dropped = 0
        self._window_start = 0.0
        self._window_count = 0

    def handle(self, request: Request) -> Response:
        if request.arrival - self._window_start >= 1.0:
            self._window_start, self._window_count = request.arrival, 0
        self._window_count += 1
        if self._window_count > self.pps:
            self.dropped += 1
            return None
        return self.answer(request)


BEHAVIOURS: dict[str, type[FakeUpstream]] = {
    "answer": FakeUpstream,
    "drop": DroppingUpstream,
    "slow": SlowUpstream,
    "servfail": ServfailUpstream,
    "refused": RefusedUpstream,
    "wrong-id": WrongIdUpstream,
    "wrong-question": WrongQuestionUpstream,
    "other-port": OtherPortUpstream,
    "truncate": TruncatingUpstream,
    "rate-limited": RateLimitedUpstream,
}


def make_upstream(behaviour: str | type[FakeUpstream] = "answer", **kwargs: object) -> FakeUpstream:
    """A (not yet started) fake upstream by behaviour name or class, e.g. ``"wrong-id"``."""
    cls = BEHAVIOURS[behaviour] if isinstance(behaviour, str) else behaviour
    return cls(**kwargs)


def rrset_texts(rrsets: Iterable[dns.rrset.RRset]) -> list[str]:
    """Sorted rdata texts of ``rrsets``, for order-insensitive comparisons in tests."""
    return sorted(rdata.to_text() for rrset in rrsets for rdata in rrset)
