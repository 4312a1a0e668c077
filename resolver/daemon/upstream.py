"""One exchange with one upstream: UDP with RFC 5452 defences, TCP when truncated.

Per try: a fresh unpredictable ID (`secrets`) and a fresh socket, so a fresh random source port
chosen by the kernel. A reply counts only if it comes from the address and port we asked, with
our ID and our question; anything else is ignored and the wait goes on until the deadline.
"""

from __future__ import annotations

import _socket
import errno
import logging
import secrets
import socket
import struct
import time
from typing import Protocol

import trio

from resolver.core import wire
from resolver.core.budget import TCP_RESERVE_BYTES, tcp_packets
from resolver.core.model import Endpoint, Outcome

log = logging.getLogger("resolver.upstream")

_MAX_UDP_REPLY = 65535
_TCP_BASE_PACKETS = tcp_packets(TCP_RESERVE_BYTES)


class Exchange:
    """The result of one try: how it ended, the parsed reply when there is one, and the RTT."""

    __slots__ = ("outcome", "rtt", "scan", "size", "spoofed")

    def __init__(self, outcome: Outcome, scan: wire.ReplyScan | None, rtt: float,
                 spoofed: int = 0, size: int = 0) -> None:
        self.outcome = outcome
        self.scan = scan
        self.rtt = rtt
        self.spoofed = spoofed
        self.size = size  # bytes of the reply, for TCP's packet cost


class TcpBudget(Protocol):
    """Lets an exchange pay for TCP's packets: the handshake before, the ACKs after."""

    def try_spend(self, packets: int) -> bool: ...

    def charge(self, packets: int) -> None: ...


async def exchange(upstream: Endpoint, question: bytes, do: bool, cd: bool,
                   timeout: float, tcp_budget: TcpBudget | None = None) -> Exchange:
    """Ask upstream once over UDP (then TCP on TC=1), within timeout seconds in all.

    The UDP query's one packet is paid for by the caller; a TCP retry pays its own way through
    tcp_budget, and is not made when the budget says no (the outcome stays TRUNCATED).
    """
    started = time.monotonic()
    # Counted outside the try so a spoofing attempt that ends in a timeout is still reported.
    spoofed = [0]
    with trio.move_on_after(timeout):
        result = await _udp(upstream, question, do, cd, spoofed)
        if result.outcome is Outcome.TRUNCATED and (tcp_budget is None
                                                    or tcp_budget.try_spend(_TCP_BASE_PACKETS)):
            # RFC 7766 5: a truncated answer is retried over TCP, to the same server.
            result = await tcp_exchange(upstream, question, do, cd)
            if tcp_budget is not None and tcp_packets(result.size) > _TCP_BASE_PACKETS:
                tcp_budget.charge(tcp_packets(result.size) - _TCP_BASE_PACKETS)
        result.rtt = time.monotonic() - started
        result.spoofed = spoofed[0]
        return result
    return Exchange(Outcome.TIMEOUT, None, time.monotonic() - started, spoofed[0])


async def _udp(upstream: Endpoint, question: bytes, do: bool, cd: bool,
               spoofed: list[int]) -> Exchange:
    qid = secrets.randbits(16)
    query = wire.build_query(qid, question, do, cd)
    family = socket.AF_INET6 if upstream.family_v6 else socket.AF_INET
    # A plain non-blocking socket and trio's readiness wait: trio.socket's per-call address
    # handling doubled the cost of a miss. Connecting an unbound UDP socket makes the kernel
    # pick a random ephemeral port for this try alone, drop datagrams from other peers, and
    # report ICMP unreachable to us.
    # _socket's object rather than socket.socket: the Python wrapper class costs more than
    # the syscalls here, once per miss.
    sock = _socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect(upstream.sockaddr)
            sock.send(query)
        except OSError as e:
            log.debug("send to %s failed: %s", upstream, e)
            return Exchange(Outcome.REFUSED, None, 0.0)
        while True:
            try:
                data, peer = sock.recvfrom(_MAX_UDP_REPLY)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except ConnectionRefusedError:
                # ICMP port unreachable: nobody listens there; as good as REFUSED, and faster.
                return Exchange(Outcome.REFUSED, None, 0.0)
            except OSError as e:
                if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                    return Exchange(Outcome.REFUSED, None, 0.0)
                raise
            if (peer[0], peer[1]) != upstream.sockaddr or not wire.reply_matches(
                    data, qid, question):
                spoofed[0] += 1  # RFC 5452 9.1: not ours; keep waiting for the real one
                continue
            outcome, scan = wire.classify(data)
            return Exchange(outcome, scan, 0.0)
    finally:
        sock.close()


async def tcp_exchange(upstream: Endpoint, question: bytes, do: bool, cd: bool) -> Exchange:
    """One query over TCP (RFC 7766), matched like UDP; the caller bounds the time."""
    qid = secrets.randbits(16)
    query = wire.build_query(qid, question, do, cd)
    try:
        stream = await trio.open_tcp_stream(upstream.host, upstream.port)
    except OSError as e:
        log.debug("tcp connect to %s failed: %s", upstream, e)
        return Exchange(Outcome.REFUSED, None, 0.0)
    async with stream:
        try:
            await stream.send_all(struct.pack("!H", len(query)) + query)
            (length,) = struct.unpack("!H", await _receive_exactly(stream, 2))
            data = await _receive_exactly(stream, length)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError):
            return Exchange(Outcome.MALFORMED, None, 0.0)
    if not wire.reply_matches(data, qid, question):
        return Exchange(Outcome.MISMATCHED, None, 0.0, size=len(data))
    outcome, scan = wire.classify(data)
    if outcome is Outcome.TRUNCATED:
        outcome = Outcome.MALFORMED  # TC over TCP: nothing more can be had from this server
    return Exchange(outcome, scan, 0.0, size=len(data))


async def _receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        chunk = await stream.receive_some(count - len(buf))
        if not chunk:
            raise EOFError("connection closed mid-message")
        buf += chunk
    return bytes(buf)
