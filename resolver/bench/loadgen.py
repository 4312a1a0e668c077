"""An open-loop UDP DNS load generator on trio, for loopback benchmarks.

Open loop: query ``k`` is due at ``k / rate_qps`` seconds after the start and goes out then,
whether or not earlier queries were answered. A closed-loop client (dnsperf ``-q``) slows down
when the server does, which hides exactly the latency and loss that matter under overload; here
the offered load stays fixed, so latency and timeouts under load are honest.

How it works:

- Each distinct ``(name, type)`` is rendered once with dnspython (RD set, EDNS0 with a payload
  of 1232, RFC 9715 / DNS flag day 2020). Sending only prepends the two ID bytes.
- ``sockets`` connected UDP sockets share the load round-robin. Connecting makes the kernel drop
  datagrams from any other source, and the message ID comes from a per-socket counter stepped by
  an odd stride, so IDs look scattered but repeat only every 65536 sends on one socket.
- The sender wakes every ``BATCH_INTERVAL_S`` (or at the next due time, if later) and sends
  everything due: at ``t`` seconds, ``floor(rate_qps * t) + 1`` queries have been sent, capped
  by ``ceil(rate_qps * duration_s)``. A sender that falls behind (CPU-bound) catches up in a
  burst and reports how late it got in ``max_schedule_lag_s``; it never sends past
  ``duration_s + SEND_GRACE_S``, so the run is bounded in time.
- One receiver task per socket matches replies by ``(socket, ID)`` and the question section
  (RFC 5452 section 9.1), and records the latency from the actual send time.
- After the last send it waits until every query is answered, or ``timeout_s``, whichever comes
  first; then it stops. A query is *answered* if its reply came within ``timeout_s`` of its send,
  and a *timeout* otherwise (a reply that came later also counts in ``late``).

Invariants: ``answered + timeouts == sent`` overall and in every per-second bucket (queries are
bucketed by the second they were due in, so a sender that keeps up puts ``rate_qps`` in each);
``sum(rcodes.values()) == answered``.

Only loopback targets are accepted unless ``allow_non_loopback=True``: a load generator pointed
at someone else's resolver by a typo is an attack.

Manual use: ``python -m resolver.bench.loadgen --server 127.0.0.1:5353 --rate 2000
--duration 5 --domains 5000 --seed 1`` sends the mail workload of ``workload.py`` and prints
the result as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import json
import math
import random
import socket
import sys
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.message
import dns.name
import dns.rcode
import trio

from resolver.bench import workload

BATCH_INTERVAL_S = 0.001  # wake-ups per second = 1000: batches stay small, the rate stays exact
SEND_GRACE_S = 0.005  # a wake-up can overshoot by a millisecond or so; past this, stop sending
EDNS_PAYLOAD = 1232  # RFC 9715: what stub and recursive clients advertise since flag day 2020
ID_STRIDE = 40503  # odd, so (start + n * stride) mod 65536 visits every ID once in 65536 sends
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024  # bursts of replies must not overflow the default ~208 kB
RECV_SIZE = 65535
PACKETS_PER_CHECKPOINT = 64  # yield to the other tasks every so many packets in a tight loop
WRITABLE_RETRIES = 100  # bounded: a socket that never drains means something is badly wrong
DRAIN_POLL_S = 0.005  # how often the end-of-run wait checks whether every query was answered
HEADER_BYTES = 12  # RFC 1035 section 4.1.1
CLI_MAX_QUERIES = 2_000_000  # the CLI generates at most this many lookups, then cycles


@dataclass(frozen=True)
class PreparedQuery:
    """One question rendered once: the wire after the ID, and its question section."""

    tail: bytes
    question: bytes


def prepare(queries: Sequence[tuple[str, str]]) -> list[PreparedQuery]:
    """Render each query once (and each distinct one only once: the workload repeats a lot)."""
    cache: dict[tuple[str, str], PreparedQuery] = {}
    prepared: list[PreparedQuery] = []
    for name, rdtype in queries:
        key = (name, rdtype)
        if key not in cache:
            message = dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
            message.id = 0
            wire = message.to_wire()
            # The question is the first name in the message, so it is never compressed.
            question_length = len(dns.name.from_text(name).to_wire()) + 4  # + QTYPE, QCLASS
            cache[key] = PreparedQuery(
                wire[2:], wire[HEADER_BYTES : HEADER_BYTES + question_length]
            )
        prepared.append(cache[key])
    return prepared


@dataclass(frozen=True)
class SecondBucket:
    """The queries due during one whole second of the run (``second`` counts from 0)."""

    second: int
    sent: int
    answered: int
    timeouts: int
    latency_p99_s: float | None


@dataclass(frozen=True)
class LoadResult:
    """What a run did. Latencies are of answered queries, in seconds; None when there are none."""

    target_rate_qps: float
    duration_s: float
    timeout_s: float
    sockets: int
    scheduled: int  # queries due within duration_s: ceil(target_rate_qps * duration_s)
    sent: int
    answered: int
    timeouts: int  # no reply within timeout_s of the send, including late ones
    late: int  # a reply came, but after timeout_s
    rcodes: dict[str, int]  # of answered queries, from the header (extended rcodes not decoded)
    truncated: int  # answered with TC=1 (not retried over TCP)
    send_errors: int  # sends the kernel refused (e.g. ICMP port unreachable reported on send)
    receive_errors: int  # ICMP errors reported on receive (the server port was closed)
    unmatched: int  # replies with an unknown ID or QR not set (duplicates, very late)
    mismatched: int  # replies whose ID matched but whose question did not (ignored)
    id_reuses: int  # sends that reused an ID still outstanding; the older query times out
    achieved_rate_qps: float
    max_schedule_lag_s: float  # how far behind its schedule the sender got at worst
    wall_time_s: float
    latency_p50_s: float | None
    latency_p90_s: float | None
    latency_p99_s: float | None
    latency_max_s: float | None
    seconds: list[SecondBucket] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def percentile(sorted_values: Sequence[float], percent: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None for no values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percent / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def scheduled_count(rate_qps: float, duration_s: float) -> int:
    """How many queries fall due in ``[0, duration_s)``: query ``k`` is due at ``k / rate``."""
    # rate * duration can come out a hair above an integer (10 * 0.7 = 7.000000000000001).
    return max(0, math.ceil(rate_qps * duration_s - 1e-9))


class LoadRun:
    """The bookkeeping of one run, free of I/O: which query to send next, on which socket, with
    which ID; replies in; a ``LoadResult`` out. Times are seconds since the start of the run."""

    def __init__(
        self,
        prepared: Sequence[PreparedQuery],
        rate_qps: float,
        duration_s: float,
        timeout_s: float,
        sockets: int,
        seed: int = 0,
    ) -> None:
        if not prepared:
            raise ValueError("no queries to send")
        if rate_qps <= 0 or duration_s <= 0 or timeout_s <= 0:
            raise ValueError("rate_qps, duration_s and timeout_s must be positive")
        if sockets < 1:
            raise ValueError("sockets must be at least 1")
        self.prepared = prepared
        self.rate_qps = rate_qps
        self.duration_s = duration_s
        self.timeout_s = timeout_s
        self.sockets = sockets
        self.scheduled = scheduled_count(rate_qps, duration_s)
        rng = random.Random(seed)
        self._id_start = [rng.randrange(65536) for _ in range(sockets)]
        self._sends_on_socket = [0] * sockets
        self.next_index = 0  # the next query to send, counting every attempt
        # Per attempted query k: send time (NaN if the send failed), latency (NaN until a
        # reply), rcode (-1 until a reply) and whether TC was set. Arrays keep a long run small.
        self.send_times = array("d")
        self.latencies = array("d")
        self.rcodes = array("b")
        self.truncated = array("b")
        self.pending: dict[tuple[int, int], int] = {}  # (socket, ID) -> k
        self.send_errors = 0
        self.receive_errors = 0
        self.unmatched = 0
        self.mismatched = 0
        self.id_reuses = 0
        self.max_schedule_lag_s = 0.0

    def due(self, now: float) -> int:
        """How many queries should have been sent by ``now``."""
        if now < 0:
            return 0
        return min(math.floor(self.rate_qps * now) + 1, self.scheduled)

    def due_time(self, index: int) -> float:
        return index / self.rate_qps

    def done_sending(self, now: float) -> bool:
        return self.next_index >= self.scheduled or now >= self.duration_s + SEND_GRACE_S

    def take(self, now: float) -> tuple[int, bytes]:
        """The next query as (socket index, wire), recorded as sent at ``now``."""
        k = self.next_index
        self.next_index += 1
        socket_index = k % self.sockets
        n = self._sends_on_socket[socket_index]
        self._sends_on_socket[socket_index] = n + 1
        query_id = (self._id_start[socket_index] + n * ID_STRIDE) & 0xFFFF
        if (socket_index, query_id) in self.pending:
            self.id_reuses += 1  # the older query can no longer be matched: it will time out
        self.pending[(socket_index, query_id)] = k
        self.send_times.append(now)
        self.latencies.append(math.nan)
        self.rcodes.append(-1)
        self.truncated.append(0)
        self.max_schedule_lag_s = max(self.max_schedule_lag_s, now - self.due_time(k))
        query = self.prepared[k % len(self.prepared)]
        return socket_index, query_id.to_bytes(2, "big") + query.tail

    def send_failed(self, socket_index: int, wire: bytes) -> None:
        """The kernel refused the last ``take``: it was never sent."""
        self.send_errors += 1
        k = self.pending.pop((socket_index, int.from_bytes(wire[:2], "big")), None)
        if k is not None:
            self.send_times[k] = math.nan

    def on_reply(self, socket_index: int, wire: bytes, now: float) -> None:
        if len(wire) < HEADER_BYTES or not wire[2] & 0x80:  # QR: a reply, not a query
            self.unmatched += 1
            return
        key = (socket_index, int.from_bytes(wire[:2], "big"))
        k = self.pending.get(key)
        if k is None:
            self.unmatched += 1
            return
        question = self.prepared[k % len(self.prepared)].question
        if wire[HEADER_BYTES : HEADER_BYTES + len(question)] != question:
            self.mismatched += 1  # keep waiting: the right reply may still come
            return
        del self.pending[key]
        self.latencies[k] = now - self.send_times[k]
        self.rcodes[k] = wire[3] & 0x0F
        self.truncated[k] = 1 if wire[2] & 0x02 else 0

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    def result(self, wall_time_s: float) -> LoadResult:
        """Summarise: every sent query is answered (reply within timeout_s) or a timeout."""
        answered_latencies: list[float] = []
        rcodes: Counter[str] = Counter()
        buckets: dict[int, list[int]] = {}  # second -> [sent, answered, timeouts]
        bucket_latencies: dict[int, list[float]] = {}
        sent = answered = late = truncated = 0
        last_send = 0.0
        for k, send_time in enumerate(self.send_times):
            if math.isnan(send_time):
                continue
            sent += 1
            last_send = max(last_send, send_time)
            # Bucket by the second the query was due in, not sent in: a wake-up a millisecond
            # late must not move the last query of second 1 into a second 2 of its own.
            second = math.floor(self.due_time(k))
            counts = buckets.setdefault(second, [0, 0, 0])
            counts[0] += 1
            latency = self.latencies[k]
            if not math.isnan(latency) and latency <= self.timeout_s:
                answered += 1
                counts[1] += 1
                answered_latencies.append(latency)
                bucket_latencies.setdefault(second, []).append(latency)
                rcodes[dns.rcode.to_text(dns.rcode.Rcode(self.rcodes[k]))] += 1
                truncated += self.truncated[k]
            else:
                counts[2] += 1
                late += 0 if math.isnan(latency) else 1
        answered_latencies.sort()
        seconds = []
        for second in sorted(buckets):
            latencies = sorted(bucket_latencies.get(second, []))
            s_sent, s_answered, s_timeouts = buckets[second]
            seconds.append(
                SecondBucket(second, s_sent, s_answered, s_timeouts, percentile(latencies, 99))
            )
        return LoadResult(
            target_rate_qps=self.rate_qps,
            duration_s=self.duration_s,
            timeout_s=self.timeout_s,
            sockets=self.sockets,
            scheduled=self.scheduled,
            sent=sent,
            answered=answered,
            timeouts=sent - answered,
            late=late,
            rcodes=dict(sorted(rcodes.items())),
            truncated=truncated,
            send_errors=self.send_errors,
            receive_errors=self.receive_errors,
            unmatched=self.unmatched,
            mismatched=self.mismatched,
            id_reuses=self.id_reuses,
            achieved_rate_qps=sent / max(self.duration_s, last_send),
            max_schedule_lag_s=self.max_schedule_lag_s,
            wall_time_s=wall_time_s,
            latency_p50_s=percentile(answered_latencies, 50),
            latency_p90_s=percentile(answered_latencies, 90),
            latency_p99_s=percentile(answered_latencies, 99),
            latency_max_s=answered_latencies[-1] if answered_latencies else None,
            seconds=seconds,
        )


def check_target(server: tuple[str, int], allow_non_loopback: bool = False) -> tuple[str, int]:
    """``server`` as (IP literal, port); ValueError for a name, or a non-loopback address
    unless allowed."""
    host, port = server
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"server must be an IP address, not {host!r}") from None
    if not address.is_loopback and not allow_non_loopback:
        raise ValueError(
            f"refusing to send load to non-loopback {address}; pass allow_non_loopback=True"
        )
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port!r}")
    return str(address), port


def _open_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            # Best effort: the kernel caps it at net.core.rmem_max / wmem_max.
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        sock.setblocking(False)
        sock.connect((host, port))  # the kernel now drops datagrams from any other source
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_one(sock: socket.socket, wire: bytes) -> bool:
    """Send now, or wait for room (bounded); False if the kernel refused the datagram."""
    for _attempt in range(WRITABLE_RETRIES):
        try:
            sock.send(wire)
            return True
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        except ConnectionRefusedError:
            # ICMP port unreachable from an earlier datagram, reported on this send: the
            # server is not listening (yet, or any more). Counted, never retried.
            return False
    return False


async def _sender(socks: list[socket.socket], run: LoadRun, start: float) -> None:
    while True:
        now = trio.current_time() - start
        if run.done_sending(now):
            return
        for _ in range(run.due(now) - run.next_index):
            send_time = trio.current_time() - start
            if run.done_sending(send_time):
                break  # a long catch-up burst must not run past the end either
            socket_index, wire = run.take(send_time)
            if not await _send_one(socks[socket_index], wire):
                run.send_failed(socket_index, wire)
            if run.next_index % PACKETS_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()  # a catch-up burst must not starve receivers
        wake = max(run.due_time(run.next_index), now + BATCH_INTERVAL_S)
        await trio.sleep_until(start + min(wake, run.duration_s + SEND_GRACE_S))


async def _receiver(sock: socket.socket, socket_index: int, run: LoadRun, start: float) -> None:
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(PACKETS_PER_CHECKPOINT):
            try:
                wire = sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                run.receive_errors += 1  # ICMP port unreachable: the server is gone
                continue
            run.on_reply(socket_index, wire, trio.current_time() - start)
        await trio.lowlevel.checkpoint()


async def run_load(
    server: tuple[str, int],
    queries: Sequence[tuple[str, str]],
    rate_qps: float,
    duration_s: float,
    timeout_s: float = 2.0,
    sockets: int = 4,
    *,
    allow_non_loopback: bool = False,
    seed: int = 0,
) -> LoadResult:
    """Send ``queries`` (cyclically) to ``server`` at ``rate_qps`` for ``duration_s``, open
    loop, and report what came back. Ends within about ``duration_s + timeout_s``."""
    host, port = check_target(server, allow_non_loopback)
    run = LoadRun(prepare(queries), rate_qps, duration_s, timeout_s, sockets, seed)
    socks: list[socket.socket] = []
    try:
        for _ in range(sockets):
            socks.append(_open_socket(host, port))
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for socket_index, sock in enumerate(socks):
                nursery.start_soon(_receiver, sock, socket_index, run, start)
            await _sender(socks, run, start)
            drain_deadline = trio.current_time() + timeout_s
            while run.outstanding and trio.current_time() < drain_deadline:
                await trio.sleep(min(DRAIN_POLL_S, max(0.0, drain_deadline - trio.current_time())))
            nursery.cancel_scope.cancel()
        wall_time_s = trio.current_time() - start
    finally:
        for sock in socks:
            sock.close()
    return run.result(wall_time_s)


def parse_server(text: str) -> tuple[str, int]:
    """``127.0.0.1:5353`` or ``[::1]:5353``."""
    host, separator, port = text.rpartition(":")
    if not separator or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resolver.bench.loadgen",
        description="Open-loop mail-shaped UDP DNS load against a loopback server.",
    )
    parser.add_argument("--server", type=parse_server, required=True, help="HOST:PORT")
    parser.add_argument("--rate", type=float, default=2000.0, help="queries per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sending")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per query")
    parser.add_argument("--sockets", type=int, default=4)
    parser.add_argument("--domains", type=int, default=workload.MailMix.n_domains)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    mix = workload.MailMix(n_domains=args.domains)
    count = min(scheduled_count(args.rate, args.duration), CLI_MAX_QUERIES)
    lookups = workload.queries(mix, args.seed, max(1, count))
    try:
        result = trio.run(
            functools.partial(
                run_load,
                args.server,
                lookups,
                args.rate,
                args.duration,
                timeout_s=args.timeout,
                sockets=args.sockets,
                seed=args.seed,
            )
        )
    except ValueError as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
