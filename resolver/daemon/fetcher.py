"""Upstream traffic, event-driven: every miss's Resolution, hedges, probes, ENA counters.

All decisions are the pool's and the resolution's (resolver/core/pool.py); this module only
performs them. One task owns all UDP tries: each try still gets its own socket, so its own
random source port (RFC 5452), but the sockets sit in one epoll set that this task waits on,
and deadlines sit in one heap. So a miss costs no task, no cancel scope and no trio
registration of its own (measured: those took about half of a miss's CPU time). TCP retries,
rare, run as tasks.
"""

from __future__ import annotations

import _socket
import errno
import heapq
import itertools
import logging
import math
import secrets
import select
import socket
import time
from collections.abc import Callable

import trio

from resolver.core import ena, wire
from resolver.core.budget import TCP_RESERVE_BYTES, Priority, tcp_packets
from resolver.core.engine import Engine
from resolver.core.model import Fetch, Outcome, Reply
from resolver.core.pool import Done, Pool, Resolution, Try, Upstream
from resolver.daemon import upstream as upstream_io

log = logging.getLogger("resolver.upstream")

TICK_SECONDS = 0.25
ENA_READ_SECONDS = 1.0
# `. NS` is what probes ask when no upstream has answered anything yet.
ROOT_NS_QUESTION = (b"\x00\x00\x02\x00\x01", False, False)
_MAX_UDP_REPLY = 65535
_TCP_BASE_PACKETS = tcp_packets(TCP_RESERVE_BYTES)
_REFUSED_ERRNOS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


class Pending:
    """One miss being resolved (or a probe, with no resolution)."""

    __slots__ = ("answer", "done", "job", "resolution", "stale_at", "wake_at")

    def __init__(self, job: Fetch, resolution: Resolution | None, stale_at: float) -> None:
        self.job = job
        self.resolution = resolution
        self.stale_at = stale_at
        self.wake_at = math.inf
        self.answer: wire.ReplyScan | None = None
        self.done = False


class Flight:
    """One UDP try on the wire."""

    __slots__ = ("attempt", "fd", "pending", "qid", "sock", "spoofed", "started", "upstream")

    def __init__(self, pending: Pending, attempt: Try | None, upstream: Upstream,
                 sock: _socket.socket, qid: int, started: float) -> None:
        self.pending = pending
        self.attempt = attempt
        self.upstream = upstream
        self.sock = sock
        self.fd = sock.fileno()
        self.qid = qid
        self.started = started
        self.spoofed = 0


class Fetcher:
    def __init__(self, engine: Engine, nursery: trio.Nursery, deliver: Callable[[Reply], None],
                 stale_answer_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        # The cache's and the pool's clock; tests move it forward instead of waiting.
        self.clock = clock
        self.engine = engine
        self.pool: Pool = engine.pool
        self.nursery = nursery
        self.deliver = deliver
        self.stale_answer_timeout = stale_answer_timeout
        self.running = 0  # misses being resolved
        self.epoll = select.epoll()
        self.flights: dict[int, Flight] = {}
        # (when, sequence, kind, object): kinds are "flight" (a try's deadline), "wake" (a
        # resolution's next step) and "stale" (the stale-answer timeout).
        self.timers: list[tuple[float, int, str, object]] = []
        self._sequence = itertools.count()
        self._sleep: trio.CancelScope | None = None
        self._sleep_until = math.inf

    # -- starting work ------------------------------------------------------------------------
    def start(self, job: Fetch) -> None:
        """Resolve a key (called synchronously by the listeners and the hit path)."""
        now = self.clock()
        resolution = self.engine.resolution(now, background=job.background,
                                            question=job.question)
        stale_at = math.inf if job.background else now + self.stale_answer_timeout
        pending = Pending(job, resolution, stale_at)
        self.running += 1
        if stale_at < math.inf and job.key in self.engine.cache.entries:
            # An expired answer exists: it may be served if upstreams are slow (RFC 8767).
            self._timer(stale_at, "stale", pending)
        self._advance(pending, now)

    def _advance(self, pending: Pending, now: float) -> None:
        """Take resolution steps until it waits or is done."""
        try:
            while not pending.done:
                step = pending.resolution.next_step(now)
                if isinstance(step, Done):
                    self._finish(pending, now)
                elif isinstance(step, Try):
                    self._launch(pending, step, step.upstream, now)
                else:
                    if step.until < pending.wake_at or pending.wake_at <= now:
                        pending.wake_at = step.until
                        self._timer(step.until, "wake", pending)
                    return
        except Exception:
            # A bug on one miss must not take the resolver down or leave clients hanging:
            # log it loudly and answer from stale data or SERVFAIL.
            log.exception("resolution failed unexpectedly")
            pending.answer = None
            self._finish(pending, now)

    def _launch(self, pending: Pending, attempt: Try | None, upstream: Upstream,
                now: float) -> None:
        job = pending.job
        upstream.pool.on_sent(upstream, now)
        qid = secrets.randbits(16)
        endpoint = upstream.endpoint
        family = socket.AF_INET6 if endpoint.family_v6 else socket.AF_INET
        # A fresh socket per try: connecting it picks a random ephemeral port for this try
        # alone (RFC 5452), and makes the kernel drop datagrams from other peers.
        sock = _socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(endpoint.sockaddr)
            sock.send(wire.build_query(qid, job.question, job.do, job.cd))
        except OSError as e:
            sock.close()
            log.debug("send to %s failed: %s", endpoint, e)
            self._report(pending, attempt, upstream, Outcome.REFUSED, None, 0.0, now)
            return
        flight = Flight(pending, attempt, upstream, sock, qid, now)
        self.flights[flight.fd] = flight
        self.epoll.register(flight.fd, select.EPOLLIN)
        timeout = attempt.timeout if attempt is not None else self.engine.timing.try_timeout
        self._timer(now + timeout, "flight", flight)

    # -- the I/O task ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Wait for replies and deadlines; handle them; forever."""
        try:
            while True:
                delay = (self.timers[0][0] - self.clock()) if self.timers else math.inf
                if delay > 0:
                    with trio.CancelScope() as self._sleep:
                        self._sleep_until = self.clock() + delay
                        if delay < math.inf:
                            self._sleep.deadline = trio.current_time() + delay
                        await trio.lowlevel.wait_readable(self.epoll)
                    self._sleep = None
                    self._sleep_until = math.inf
                else:
                    await trio.lowlevel.checkpoint()  # due work, but let others run first
                now = self.clock()
                for fd, _ in self.epoll.poll(0):
                    flight = self.flights.get(fd)
                    if flight is not None:
                        self._guarded(self._readable, flight, now)
                self._expire(now)
        finally:
            for flight in list(self.flights.values()):
                self._close(flight)
            self.epoll.close()

    def _timer(self, when: float, kind: str, obj: object) -> None:
        heapq.heappush(self.timers, (when, next(self._sequence), kind, obj))
        if when < self._sleep_until and self._sleep is not None:
            # The I/O task sleeps past this deadline: move its wake-up earlier.
            self._sleep.deadline = trio.current_time() + max(0.0, when - self.clock())
            self._sleep_until = when

    def _expire(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, kind, obj = heapq.heappop(timers)
            self._guarded(self._fire, kind, obj, now)

    def _guarded(self, handler: Callable[..., None], *args: object) -> None:
        """Run one event's handler; a bug in it is logged, never the end of the I/O task."""
        try:
            handler(*args)
        except Exception:
            log.exception("upstream event handler failed")

    def _fire(self, kind: str, obj: object, now: float) -> None:
        if kind == "flight":
            flight = obj
            if self.flights.get(flight.fd) is flight:  # still on the wire
                self._complete(flight, Outcome.TIMEOUT, None, now)
        elif kind == "wake":
            pending = obj
            if not pending.done and pending.wake_at <= now:
                pending.wake_at = math.inf
                self._advance(pending, now)
        elif kind == "stale":
            pending = obj
            if not pending.done:
                for reply in self.engine.on_stale_timeout(pending.job.key, now):
                    self.deliver(reply)

    def _readable(self, flight: Flight, now: float) -> None:
        sock = flight.sock
        endpoint = flight.upstream.endpoint
        question = flight.pending.job.question
        while True:
            try:
                data, peer = sock.recvfrom(_MAX_UDP_REPLY)
            except BlockingIOError:
                return
            except OSError as e:
                # ICMP unreachable (nobody listens there) is as good as REFUSED, and faster;
                # any other socket error ends this try the same way rather than the loop.
                if e.errno not in _REFUSED_ERRNOS:
                    log.warning("receive from %s failed: %s", endpoint, e)
                self._complete(flight, Outcome.REFUSED, None, now)
                return
            if (peer[0], peer[1]) != endpoint.sockaddr or not wire.reply_matches(
                    data, flight.qid, question):
                flight.spoofed += 1  # RFC 5452 9.1: not ours; keep waiting for the real one
                continue
            outcome, scan = wire.classify(data)
            if outcome is Outcome.TRUNCATED:
                self._close(flight)
                # The TCP retry is the same try: its time and RTT count from the UDP query.
                self.nursery.start_soon(self._tcp, flight, flight.started)
                return
            self._complete(flight, outcome, scan, now)
            return

    def _close(self, flight: Flight) -> None:
        if self.flights.get(flight.fd) is flight:
            del self.flights[flight.fd]
            self.epoll.unregister(flight.fd)
            flight.sock.close()

    def _complete(self, flight: Flight, outcome: Outcome, scan: wire.ReplyScan | None,
                  now: float) -> None:
        self._close(flight)
        if flight.spoofed:
            log.warning("ignored %d unmatched replies from %s (RFC 5452)", flight.spoofed,
                        flight.upstream.endpoint)
        self._report(flight.pending, flight.attempt, flight.upstream, outcome, scan,
                     now - flight.started, now)

    def _report(self, pending: Pending, attempt: Try | None, upstream: Upstream,
                outcome: Outcome, scan: wire.ReplyScan | None, rtt: float, now: float) -> None:
        job = pending.job
        if (attempt is None and outcome is Outcome.REFUSED and scan is not None
                and job.question == ROOT_NS_QUESTION[0]):
            # A probe's `. NS` refused by an authoritative-only upstream is still an answer:
            # it is alive (an ICMP refusal has no scan and stays a failure).
            outcome = Outcome.NODATA
        upstream.pool.report(upstream, outcome, rtt, now, (job.question, job.do, job.cd))
        if self._events_pending():
            self.log_events()
        if pending.done or attempt is None:
            return  # a hedge that lost, or a probe: the pool has what it needs
        pending.resolution.record(attempt, outcome, now)
        if outcome.is_answer:
            pending.answer = scan
        self._advance(pending, now)

    async def _tcp(self, flight: Flight, started: float) -> None:
        """RFC 7766 5: a truncated answer is retried over TCP, paying for its packets."""
        job = flight.pending.job
        upstream = flight.upstream
        priority = Priority.BACKGROUND if job.background else Priority.CLIENT
        outcome: Outcome = Outcome.TRUNCATED
        scan = None
        if upstream.bucket.try_spend(_TCP_BASE_PACKETS, self.clock(), priority):
            upstream.stats.sent += _TCP_BASE_PACKETS
            timeout = flight.attempt.timeout if flight.attempt else 1.0
            with trio.move_on_after(max(0.0, started + timeout - self.clock())):
                result = await upstream_io.tcp_exchange(upstream.endpoint, job.question,
                                                        job.do, job.cd)
                outcome, scan = result.outcome, result.scan
                extra = tcp_packets(result.size) - _TCP_BASE_PACKETS
                if extra > 0:
                    upstream.pool.charge(upstream, extra, self.clock())
            if outcome is Outcome.TRUNCATED:
                outcome = Outcome.TIMEOUT
        now = self.clock()
        self._report(flight.pending, flight.attempt, upstream, outcome, scan, now - started, now)

    def _finish(self, pending: Pending, now: float) -> None:
        if pending.done:
            return
        pending.done = True
        self.running -= 1
        job = pending.job
        if pending.answer is not None:
            replies = self.engine.on_answer(job.key, pending.answer, now)
        else:
            if pending.resolution.denied and not job.background:
                # One line per event that matters; the repeat filter (daemon/logs.py) keeps a
                # sustained shortage to one line per 10 s with a count.
                log.warning("budget exhausted: no upstream had a token for a miss within "
                            "the queue wait; answered from stale data or SERVFAIL")
            replies = self.engine.on_failure(job.key, now, background=job.background,
                                             remember=not pending.resolution.denied)
        for reply in replies:
            self.deliver(reply)
        if self._events_pending():
            self.log_events()

    # -- probes and time-driven health ------------------------------------------------------
    def probe(self, upstream: Upstream) -> None:
        """Ask a DOWN upstream one question it should know, from spare tokens only."""
        now = self.clock()
        if not upstream.bucket.try_spend(1, now, Priority.BACKGROUND):
            return
        question, do, cd = upstream.pool.last_good_question or ROOT_NS_QUESTION
        job = Fetch(b"", question, do, cd, background=True)
        self._launch(Pending(job, None, math.inf), None, upstream, now)

    async def ticker(self) -> None:
        while True:
            await trio.sleep(TICK_SECONDS)
            now = self.clock()
            for pool in self.engine.pools:
                for upstream in pool.tick(now):
                    self.probe(upstream)
            self.log_events()

    def log_events(self) -> None:
        for pool in self.engine.pools:
            zone = f"zone {pool.zone} " if pool.zone else ""
            for event in pool.drain_events():
                log.warning("%s%s", zone, event)

    def _events_pending(self) -> bool:
        return any(pool.pending_events for pool in self.engine.pools)


class EnaReader:
    """Reads ENA counters once a second and turns increases into evidence (DESIGN.md 4)."""

    def __init__(self, pool: Pool, command: str | None, path: str | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.pool = pool
        self.command = command
        self.path = path
        self.previous: dict[str, int] | None = None
        self.last: dict[str, int] = {}
        self.errors = 0

    async def read(self) -> str:
        if self.path is not None:
            return await trio.Path(self.path).read_text()
        result = await trio.run_process(self.command, shell=True, capture_stdout=True,
                                        capture_stderr=True, check=False)
        if result.returncode != 0:
            raise OSError(result.stderr.decode(errors="replace").strip() or "failed")
        return result.stdout.decode(errors="replace")

    async def run(self, fetcher: Fetcher) -> None:
        while True:
            try:
                counters = ena.parse_ethtool(await self.read())
            except OSError as e:
                self.errors += 1
                if self.errors == 1:
                    log.warning("cannot read ENA counters (%s): %s", self.command or self.path, e)
            else:
                self.last = counters
                if self.previous is not None:
                    now = self.clock()
                    for upstream, evidence in ena.evidence(self.previous, counters,
                                                           self.pool.upstreams, now):
                        self.pool.note_external(upstream, evidence, now)
                    fetcher.log_events()
                self.previous = counters
            await trio.sleep(ENA_READ_SECONDS)
