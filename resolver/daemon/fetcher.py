"""Upstream traffic: drive each miss's Resolution, hedge, probe DOWN upstreams, read ENA counters.

All decisions are the pool's and the resolution's (resolver/core/pool.py); this module only
performs them: it starts exchanges as tasks, waits for outcomes or the next deadline, answers
waiters through the engine, and logs every pool event exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import trio

from resolver.core import ena
from resolver.core.budget import Priority
from resolver.core.engine import Engine
from resolver.core.model import Fetch, Outcome, Reply
from resolver.core.pool import Done, Pool, Try, Upstream
from resolver.daemon import upstream as upstream_io

log = logging.getLogger("resolver.upstream")

TICK_SECONDS = 0.25
MIN_WAIT_SECONDS = 0.0005
ENA_READ_SECONDS = 1.0
# `. NS` is what probes ask when no upstream has answered anything yet.
ROOT_NS_QUESTION = (b"\x00\x00\x02\x00\x01", False, False)


class _Budget:
    """An upstream's bucket as the exchange's TCP budget (counted in the pool's stats)."""

    def __init__(self, pool: Pool, upstream: Upstream, priority: Priority,
                 clock: Callable[[], float]) -> None:
        self.pool, self.upstream, self.priority = pool, upstream, priority
        self.clock = clock

    def try_spend(self, packets: int) -> bool:
        if self.upstream.bucket.try_spend(packets, self.clock(), self.priority):
            self.upstream.stats.sent += packets
            return True
        return False

    def charge(self, packets: int) -> None:
        if packets > 0:
            self.pool.charge(self.upstream, packets, self.clock())


class Fetcher:
    def __init__(self, engine: Engine, nursery: trio.Nursery, deliver: Callable[[Reply], None],
                 stale_answer_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        # The cache's and the pool's clock; tests move it forward instead of waiting.
        self.clock = clock
        self.engine = engine
        self.pool = engine.pool
        self.nursery = nursery
        self.deliver = deliver
        self.stale_answer_timeout = stale_answer_timeout
        self.running = 0

    def start(self, job: Fetch) -> None:
        self.nursery.start_soon(self.fetch, job)

    async def fetch(self, job: Fetch) -> None:
        """Resolve one key: tries (with hedging), stale answers when slow, replies at the end."""
        engine = self.engine
        self.running += 1
        answer = None
        now = self.clock()
        resolution = engine.resolution(now, background=job.background)
        stale_at = math.inf if job.background else now + self.stale_answer_timeout
        channel: tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel] | None = None
        try:
            while True:
                now = self.clock()
                if now >= stale_at:
                    stale_at = math.inf
                    for reply in engine.on_stale_timeout(job.key, now):
                        self.deliver(reply)
                step = resolution.next_step(now)
                if isinstance(step, Done):
                    break
                if isinstance(step, Try):
                    self.pool.on_sent(step.upstream, now)
                    if (len(resolution.running) == 1 and step.upstream.hedge_after(
                            step.timeout) >= step.timeout):
                        # Nothing can start beside this try (its upstream is healthy): run it
                        # here, without a task and a channel; most misses take this path.
                        result = await self._exchange(step, job)
                        resolution.record(step, result.outcome, self.clock())
                        if result.outcome.is_answer:
                            answer = result.scan
                        continue
                    if channel is None:
                        channel = trio.open_memory_channel[tuple[Try, Any]](math.inf)
                    self.nursery.start_soon(self._try, step, job, channel[0])
                    continue
                if channel is None:  # waiting for tokens, with no try running
                    await trio.sleep(max(MIN_WAIT_SECONDS, min(step.until, stale_at) - now))
                    continue
                # Deadlines are our clock's values; trio's clock has its own offset. The floor
                # makes every pass a real wait, so this loop can never starve other tasks.
                with trio.move_on_after(max(MIN_WAIT_SECONDS, min(step.until, stale_at) - now)):
                    attempt, result = await channel[1].receive()
                    resolution.record(attempt, result.outcome, self.clock())
                    if result.outcome.is_answer:
                        answer = result.scan
        except Exception:
            # A bug on one miss must not take the resolver down or leave clients hanging:
            # log it loudly and answer from stale data or SERVFAIL.
            log.exception("fetch failed unexpectedly")
            answer = None
        finally:
            if channel is not None:
                channel[1].close()
            self.running -= 1
            now = self.clock()
            replies = (engine.on_answer(job.key, answer, now) if answer is not None
                       else engine.on_failure(job.key, now, background=job.background))
            for reply in replies:
                self.deliver(reply)
            if self.pool.pending_events:
                self.log_events()

    async def _exchange(self, attempt: Try, job: Fetch) -> upstream_io.Exchange:
        """One exchange; its outcome goes to the pool (health) before anyone else sees it."""
        priority = Priority.BACKGROUND if job.background else Priority.CLIENT
        upstream = attempt.upstream
        result = await upstream_io.exchange(upstream.endpoint, job.question, job.do, job.cd,
                                            attempt.timeout,
                                            _Budget(self.pool, upstream, priority, self.clock))
        if result.spoofed:
            log.warning("ignored %d unmatched replies from %s (RFC 5452)", result.spoofed,
                        upstream.endpoint)
        self.pool.report(upstream, result.outcome, result.rtt, self.clock(),
                         (job.question, job.do, job.cd))
        if self.pool.pending_events:
            self.log_events()
        return result

    async def _try(self, attempt: Try, job: Fetch, outcomes: trio.MemorySendChannel) -> None:
        """An exchange run beside others (hedging): the outcome goes back by channel."""
        result = await self._exchange(attempt, job)
        # The resolution may be over (a hedge won): then nobody reads this, which is fine.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            outcomes.send_nowait((attempt, result))

    async def probe(self, upstream: Upstream) -> None:
        """Ask a DOWN upstream one question it should know, from spare tokens only."""
        question, do, cd = self.pool.last_good_question or ROOT_NS_QUESTION
        now = self.clock()
        if not upstream.bucket.try_spend(1, now, Priority.BACKGROUND):
            return
        self.pool.on_sent(upstream, now)
        result = await upstream_io.exchange(upstream.endpoint, question, do, cd,
                                            self.engine.timing.try_timeout)
        # REFUSED to `. NS` from an authoritative-only upstream still proves it is alive.
        outcome = result.outcome
        if outcome is Outcome.REFUSED and question == ROOT_NS_QUESTION[0] and result.rtt > 0:
            outcome = Outcome.NODATA
        self.pool.report(upstream, outcome, result.rtt, self.clock())
        self.log_events()

    async def ticker(self) -> None:
        """Time-driven health changes and probes."""
        while True:
            await trio.sleep(TICK_SECONDS)
            for upstream in self.pool.tick(self.clock()):
                self.nursery.start_soon(self.probe, upstream)
            self.log_events()

    def log_events(self) -> None:
        for event in self.pool.drain_events():
            log.warning("%s", event)


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
