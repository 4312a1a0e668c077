"""DNS over TCP to an upstream (RFC 7766), for answers that came back truncated over UDP.

UDP tries are the fetcher's (resolver/daemon/fetcher.py), which runs them all from one task.
Here as there: a fresh unpredictable ID (`secrets`) per query, and a reply counts only with our
ID and our question (RFC 5452).
"""

from __future__ import annotations

import logging
import secrets
import struct

import trio

from resolver.core import wire
from resolver.core.model import Endpoint, Outcome

log = logging.getLogger("resolver.upstream")


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
