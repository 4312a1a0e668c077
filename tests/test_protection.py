"""Upstream protection over loopback, against fake upstreams that throttle the way AWS does.

The fakes are for faults a real server cannot produce on demand: silent drops above a rate,
random loss, going dark. The resolver runs in-process on real sockets; its cache and health
clock is a MovableClock, so TTL-driven behaviour (prefetch, stale) needs no waiting.
"""

from __future__ import annotations

import random
from pathlib import Path

import dns.rcode
import trio

from resolver.core.health import State
from resolver.core.model import Endpoint
from resolver.core.pool import Mode

from dnsmsg import parse, query
from fakeupstream import FakeUpstream, RateLimitedUpstream, Request, Response
from loopback import MovableClock, addr_of, ask_udp, running


class LossyUpstream(FakeUpstream):
    """Drops a fixed share of queries at random (seeded): an ordinary bad network day."""

    def __init__(self, loss: float, seed: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.loss = loss
        self.rng = random.Random(seed)

    def handle(self, request: Request) -> Response:
        return None if self.rng.random() < self.loss else self.answer(request)


class SwitchableUpstream(FakeUpstream):
    """Answers until `dark` is set, then answers nothing."""

    dark = False

    def handle(self, request: Request) -> Response:
        return None if self.dark else self.answer(request)


async def offer(server: tuple[str, int], names: list[str], rate: float,
                results: dict[str, int]) -> None:
    """Ask each name once, open-loop at `rate` per second; rcode (or -1: no answer) per name."""

    async def one(name: str) -> None:
        try:
            results[name] = parse(await ask_udp(server, query(name, "A"), timeout=6.0)).rcode()
        except trio.TooSlowError:
            results[name] = -1

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
            await trio.sleep(1 / rate)  # the offered load's schedule, not synchronisation


def max_per_second(arrivals: list[float]) -> int:
    """The most queries inside any one-second window."""
    arrivals = sorted(arrivals)
    best, j = 0, 0
    for i, start in enumerate(arrivals):
        while j < len(arrivals) and arrivals[j] < start + 1.0:
            j += 1
        best = max(best, j - i)
    return best


def events(service: object, subject: str = "") -> list[str]:
    return [str(e) for e in service.engine.pool.events if str(e).startswith(subject)]


async def test_budget_is_never_exceeded_and_the_overflow_is_answered_by_the_fallback() -> None:
    with FakeUpstream() as primary, FakeUpstream() as fallback:
        # A budget on the primary only: the fallback has room for the overflow.
        limits = ((Endpoint(*primary.addr), 20, 2),)
        async with running([primary], [fallback], upstream_limits=limits) as svc:
            results: dict[str, int] = {}
            await offer(addr_of(svc), [f"m{i}.test." for i in range(150)], 100, results)
            mode = svc.engine.pool.mode
    # Counted where it matters, at the upstream: never more than pps + burst in any second.
    assert max_per_second([q.arrival for q in primary.queries]) <= 22
    assert len(primary.queries) >= 20
    # Every client answered correctly (these names do not exist: NXDOMAIN, never SERVFAIL).
    assert set(results.values()) == {dns.rcode.NXDOMAIN}
    assert len(primary.queries) + len(fallback.queries) == 150
    assert mode is Mode.REPOINTED


async def test_silent_throttling_is_detected_within_two_seconds_and_recovered_from() -> None:
    with RateLimitedUpstream(pps=10) as primary, FakeUpstream() as fallback:
        async with running([primary], [fallback], upstream_timeout_seconds=0.4,
                           repoint_hold_seconds=1) as svc:
            started = trio.current_time()
            results: dict[str, int] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(offer, addr_of(svc), [f"t{i}.test." for i in range(120)], 40,
                                   results)
                with trio.fail_after(2.0):
                    while svc.engine.pool.mode is not Mode.REPOINTED:
                        await trio.sleep(0.02)  # polling a state, bounded by fail_after
                detected = trio.current_time() - started
            p1 = svc.engine.pool.upstreams[0]
            assert p1.state is State.THROTTLED
            assert "silent loss" in events(svc, "127.0.0.1")[0]
            # Lift the throttle; traffic goes back to the primary after the hold time.
            primary.pps = 1_000_000
            before = len(primary.queries)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(offer, addr_of(svc), [f"r{i}.test." for i in range(400)], 40,
                                   results)
                with trio.fail_after(9.0):
                    while svc.engine.pool.mode is not Mode.PRIMARY:
                        await trio.sleep(0.05)
            back = events(svc, "pool")[-1]
    assert detected <= 2.0
    assert back.startswith("pool: repointed -> primary")
    assert len(primary.queries) - before > 100  # the primary carries the load again
    # Every client query was answered correctly while the fallback had room.
    assert set(results.values()) == {dns.rcode.NXDOMAIN}


async def test_one_percent_random_loss_does_not_flap() -> None:
    with LossyUpstream(0.01) as primary, FakeUpstream() as fallback:
        async with running([primary], [fallback], upstream_timeout_seconds=0.3) as svc:
            results: dict[str, int] = {}
            await offer(addr_of(svc), [f"l{i}.test." for i in range(400)], 100, results)
            assert svc.engine.pool.events == type(svc.engine.pool.events)(maxlen=50)
    assert primary.udp_count >= 400
    assert set(results.values()) == {dns.rcode.NXDOMAIN}


async def test_prefetch_hides_the_expiry_of_a_popular_name() -> None:
    clock = MovableClock()
    with FakeUpstream(ttl=100) as upstream:
        async with running([upstream], clock=clock) as svc:
            server = addr_of(svc)
            for _ in range(3):
                await ask_udp(server, query("example.test.", "A"))
            assert upstream.udp_count == 1
            # (seconds into the TTL, what happens): at 91 s less than 10% is left.
            clock.advance(91)
            reply = parse(await ask_udp(server, query("example.test.", "A")))
            assert reply.answer[0].ttl == 9  # still served from cache at once
            with trio.fail_after(5):
                while upstream.udp_count < 2:
                    await trio.sleep(0.01)  # the background refresh reaching the upstream
                while svc.fetcher.running:
                    await trio.sleep(0.01)
            clock.advance(20)  # past the old entry's expiry
            misses = svc.engine.misses
            reply = parse(await ask_udp(server, query("example.test.", "A")))
    assert svc.engine.misses == misses  # a hit: nobody waited at expiry
    assert reply.answer[0].ttl == 80  # the refreshed entry, 20 s old
    assert upstream.udp_count == 2 and svc.engine.prefetches == 1


async def test_stale_answers_when_every_upstream_is_dark() -> None:
    clock = MovableClock()
    with SwitchableUpstream(ttl=60) as upstream:
        async with running([upstream], clock=clock, upstream_timeout_seconds=0.2,
                           stale_answer_timeout_seconds=0.3) as svc:
            server = addr_of(svc)
            await ask_udp(server, query("example.test.", "MX"))
            upstream.dark = True
            clock.advance(3600)  # long expired, well inside the 1-day stale window
            reply = parse(await ask_udp(server, query("example.test.", "MX")))
            assert reply.rcode() == dns.rcode.NOERROR
            assert {rrset.ttl for rrset in reply.answer} == {30}  # RFC 8767 4
            # Asked again while the refresh is still failing: stale at once.
            reply = parse(await ask_udp(server, query("example.test.", "MX", qid=77)))
            assert reply.id == 77 and reply.answer[0].ttl == 30
            # A name we never had: SERVFAIL, never NXDOMAIN.
            reply = parse(await ask_udp(server, query("other.test.", "A")))
            assert reply.rcode() == dns.rcode.SERVFAIL
    assert svc.engine.stale_answers >= 2


async def test_ena_counters_from_a_file_are_evidence(tmp_path: Path) -> None:
    counters = tmp_path / "ethtool.txt"
    counters.write_text("NIC statistics:\n     pps_allowance_exceeded: 10\n")
    with FakeUpstream() as upstream:
        async with running([upstream], ena_counters_file=str(counters)) as svc:
            server = addr_of(svc)
            for i in range(5):
                await ask_udp(server, query(f"e{i}.test.", "A"))
            with trio.fail_after(3):
                while svc.ena is None or svc.ena.previous is None:
                    await trio.sleep(0.05)  # the reader's first sample
            counters.write_text("NIC statistics:\n     pps_allowance_exceeded: 25\n")
            with trio.fail_after(3):
                while svc.engine.pool.upstreams[0].state is State.HEALTHY:
                    await ask_udp(server, query("example.test.", "A"))
                    await trio.sleep(0.1)
            found = events(svc)
    assert "pps_allowance_exceeded rose by 15" in found[0]
