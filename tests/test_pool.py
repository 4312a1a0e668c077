"""The pool and one miss's tries: routing, budgets, hedging, repointing, as time-travel tables."""

from __future__ import annotations

from resolver.core.budget import Priority
from resolver.core.health import State
from resolver.core.model import Endpoint, Outcome
from resolver.core.pool import (
    Done,
    Mode,
    Override,
    Pool,
    Resolution,
    Role,
    Timing,
    Try,
    UpstreamSpec,
    Wait,
)

P1, P2, F1 = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.2", 1), Endpoint("127.0.0.3", 1)


def pool_of(*specs: UpstreamSpec, hold: float = 30.0) -> Pool:
    return Pool(list(specs), 0.0, 0.2, hold)


def primary(endpoint: Endpoint, pps: float | None = None, burst: float | None = None):
    return UpstreamSpec(endpoint, Role.PRIMARY, pps, burst)


def fallback(endpoint: Endpoint, pps: float | None = None, burst: float | None = None):
    return UpstreamSpec(endpoint, Role.FALLBACK, pps, burst)


def run(res: Resolution, outcomes: dict[Endpoint, Outcome], now: float = 0.0,
        step_seconds: float = 0.01) -> list[Endpoint]:
    """Drive a resolution to Done; each try ends with its upstream's outcome at once."""
    asked = []
    for _ in range(100):
        step = res.next_step(now)
        if isinstance(step, Done):
            return asked
        if isinstance(step, Try):
            asked.append(step.upstream.endpoint)
            res.record(step, outcomes[step.upstream.endpoint], now)
        else:
            now = max(now + step_seconds, step.until)
    raise AssertionError("resolution did not end")


def test_primaries_first_then_fallbacks() -> None:
    pool = pool_of(primary(P1), primary(P2), fallback(F1))
    res = Resolution(pool, Timing(), 0.0)
    asked = run(res, {P1: Outcome.TIMEOUT, P2: Outcome.SERVFAIL, F1: Outcome.NXDOMAIN})
    assert asked == [P1, P2, F1] and res.answered


def test_an_answer_ends_the_resolution() -> None:
    pool = pool_of(primary(P1), fallback(F1))
    res = Resolution(pool, Timing(), 0.0)
    assert run(res, {P1: Outcome.OK, F1: Outcome.OK}) == [P1]


def test_max_tries_bounds_fast_failures() -> None:
    pool = pool_of(primary(P1), primary(P2))
    res = Resolution(pool, Timing(max_tries=3), 0.0)
    assert run(res, {P1: Outcome.REFUSED, P2: Outcome.REFUSED}) == [P1, P2, P1]


def test_fallback_is_reached_even_with_more_primaries_than_tries() -> None:
    primaries = [Endpoint(f"127.0.0.{i}", 53) for i in range(1, 6)]
    pool = pool_of(*(primary(p) for p in primaries), fallback(F1))
    res = Resolution(pool, Timing(max_tries=4), 0.0)
    outcomes = dict.fromkeys([*primaries, F1], Outcome.TIMEOUT)
    assert run(res, outcomes) == [*primaries, F1]


def test_deadline_shortens_the_last_try() -> None:
    pool = pool_of(primary(P1))
    res = Resolution(pool, Timing(try_timeout=1.0, deadline=2.5, max_tries=10), 0.0)
    timeouts = []
    now = 0.0
    while isinstance(step := res.next_step(now), Try | Wait):
        if isinstance(step, Try):
            timeouts.append(step.timeout)
            now += step.timeout
            res.record(step, Outcome.TIMEOUT, now)
    assert timeouts == [1.0, 1.0, 0.5]


def test_no_token_overflows_to_the_fallback() -> None:
    pool = pool_of(primary(P1, pps=10, burst=2), fallback(F1, pps=100, burst=10))
    asked = [pool.acquire(0.0, Priority.CLIENT, set()).endpoint for _ in range(4)]
    assert asked == [P1, P1, F1, F1]
    assert pool.mode is Mode.PRIMARY  # two misses past a burst: what bursts are for
    for _ in range(10):
        pool.acquire(0.1, Priority.CLIENT, set())
    assert pool.mode is Mode.REPOINTED  # a steady stream: the budget cannot carry the load


def test_first_try_waits_briefly_for_a_token_then_gives_up() -> None:
    pool = pool_of(primary(P1, pps=10, burst=1))
    assert pool.acquire(0.0, Priority.CLIENT, set()) is not None
    res = Resolution(pool, Timing(queue_wait=0.05), 0.0)
    # (now, expected step): the next token is 0.1 s away, past the 50 ms queue.
    step = res.next_step(0.0)
    assert step == Wait(0.05) and pool.waiting_for_tokens == 1
    assert res.next_step(0.05) == Done(False) and res.denied
    assert pool.waiting_for_tokens == 0


def test_a_queued_miss_gets_the_next_token() -> None:
    pool = pool_of(primary(P1, pps=100, burst=1))
    pool.acquire(0.0, Priority.CLIENT, set())
    res = Resolution(pool, Timing(queue_wait=0.05), 0.0)
    step = res.next_step(0.0)
    assert isinstance(step, Wait) and abs(step.until - 0.01) < 1e-9
    assert isinstance(res.next_step(0.01), Try)


def test_queue_has_a_hard_cap() -> None:
    pool = pool_of(primary(P1, pps=10, burst=1))
    pool.acquire(0.0, Priority.CLIENT, set())
    first = Resolution(pool, Timing(queue_max=1), 0.0)
    second = Resolution(pool, Timing(queue_max=1), 0.0)
    assert isinstance(first.next_step(0.0), Wait)
    assert second.next_step(0.0) == Done(False)


def test_no_retry_when_the_budget_says_no() -> None:
    pool = pool_of(primary(P1, pps=10, burst=1))
    res = Resolution(pool, Timing(queue_wait=0.05), 0.0)
    step = res.next_step(0.0)
    res.record(step, Outcome.TIMEOUT, 0.01)
    # The retry waits as briefly as a first try would; the next token is at 0.1 s: no retry.
    assert res.next_step(0.01) == Wait(0.060000000000000005)
    assert res.next_step(0.061) == Done(False) and res.denied


def test_a_retry_gets_a_token_that_comes_within_the_wait() -> None:
    pool = pool_of(primary(P1, pps=100, burst=1))
    res = Resolution(pool, Timing(queue_wait=0.05), 0.0)
    step = res.next_step(0.0)
    res.record(step, Outcome.SERVFAIL, 0.001)
    assert isinstance(res.next_step(0.001), Wait)
    assert isinstance(res.next_step(0.01), Try)


def test_background_work_leaves_the_reserve_to_clients() -> None:
    pool = pool_of(primary(P1, pps=10, burst=10))  # reserve: 2 tokens
    grants = sum(pool.acquire(0.0, Priority.BACKGROUND, set()) is not None for _ in range(20))
    assert grants == 8
    assert pool.acquire(0.0, Priority.CLIENT, set()) is not None


def test_hedging_asks_the_next_upstream_while_a_throttled_one_is_slow() -> None:
    pool = pool_of(primary(P1), fallback(F1))
    p1 = pool.by_endpoint[P1]
    p1.health.state = State.THROTTLED
    p1.srtt = 0.01
    res = Resolution(pool, Timing(try_timeout=1.0), 0.0)
    first = res.next_step(0.0)
    assert isinstance(first, Try) and first.upstream.endpoint == P1
    assert res.next_step(0.0) == Wait(0.04)  # 4 x srtt
    second = res.next_step(0.04)
    assert isinstance(second, Try) and second.upstream.endpoint == F1
    res.record(second, Outcome.OK, 0.05)
    assert res.next_step(0.05) == Done(True)


def test_a_healthy_upstream_is_not_hedged() -> None:
    pool = pool_of(primary(P1), fallback(F1))
    res = Resolution(pool, Timing(try_timeout=1.0), 0.0)
    res.next_step(0.0)
    assert res.next_step(0.5) == Wait(1.0)


def test_down_upstreams_get_no_client_traffic() -> None:
    pool = pool_of(primary(P1), fallback(F1))
    pool.by_endpoint[P1].health.state = State.DOWN
    assert [u.endpoint for u in pool.candidates()] == [F1]


def test_overrides_pin_routing() -> None:
    pool = pool_of(primary(P1), fallback(F1))
    pool.set_override(Override.FALLBACK, 0.0)
    assert [u.endpoint for u in pool.candidates()] == [F1]
    pool.set_override(Override.PRIMARY, 0.0)
    assert [u.endpoint for u in pool.candidates()] == [P1]
    assert [str(e) for e in pool.drain_events()] == [
        "override: auto -> fallback (operator)", "override: fallback -> primary (operator)"]


def test_repoint_on_throttling_and_return_after_hold() -> None:
    pool = pool_of(primary(P1, pps=100), fallback(F1), hold=30.0)
    p1 = pool.by_endpoint[P1]
    # (time, outcome at P1): answers, then silent loss.
    for i in range(10):
        pool.report(p1, Outcome.OK, 0.001, 0.1 * i)
    for i in range(3):
        pool.report(p1, Outcome.TIMEOUT, 1.0, 1.1 + 0.01 * i)
    assert p1.state is State.THROTTLED and pool.mode is Mode.REPOINTED
    assert p1.bucket.rate < 100  # the learned rate took over
    # Clean answers for the hold time: back to HEALTHY and PRIMARY together. The timeouts stay
    # evidence while they are in the 2 s window, so the hold runs from the last report that
    # still saw them (t=2.7).
    now = 1.2
    while now < 32.5:
        pool.report(p1, Outcome.OK, 0.001, now)
        pool.tick(now)
        now += 0.5
    assert (p1.state, pool.mode) == (State.THROTTLED, Mode.REPOINTED)
    while now < 33.5:
        pool.report(p1, Outcome.OK, 0.001, now)
        pool.tick(now)
        now += 0.5
    assert (p1.state, pool.mode) == (State.HEALTHY, Mode.PRIMARY)
    assert p1.bucket.rate == 100
    events = [str(e) for e in pool.drain_events()]
    assert events[0].startswith("127.0.0.1:1: healthy -> throttled (silent loss: 3 of")
    assert events[1].startswith("pool: primary -> repointed (primary 127.0.0.1:1 is throttled")
    assert events[2] == "127.0.0.1:1: rate -> 70 packets/s (learned rate; budget 100)"
    assert events[-1].startswith("pool: repointed -> primary")
    assert pool.transitions == 4  # rate notes are not transitions


def test_no_repoint_without_fallbacks() -> None:
    pool = pool_of(primary(P1))
    for i in range(3):
        pool.report(pool.by_endpoint[P1], Outcome.OK, 0.001, 0.01 * i)
    for i in range(5):
        pool.report(pool.by_endpoint[P1], Outcome.TIMEOUT, 1.0, 1.0 + 0.01 * i)
    assert pool.mode is Mode.PRIMARY


def test_down_upstream_is_probed_with_back_off() -> None:
    pool = pool_of(primary(P1), fallback(F1))
    p1 = pool.by_endpoint[P1]
    for i in range(4):
        pool.report(p1, Outcome.TIMEOUT, 1.0, 1.0 + 0.01 * i)
    assert p1.state is State.DOWN
    # Probe times on a 50 ms tick: intervals 0.5, 1, 2, 4, then capped at 4.
    due_times = [t / 100 for t in range(100, 1800, 5) if pool.tick(t / 100)]
    assert due_times == [1.55, 2.05, 3.05, 5.05, 9.05, 13.05, 17.05]


def test_report_counts_outcomes() -> None:
    pool = pool_of(primary(P1))
    p1 = pool.by_endpoint[P1]
    pool.on_sent(p1, 0.0)
    pool.report(p1, Outcome.OK, 0.01, 0.0)
    pool.on_sent(p1, 1.0)
    pool.report(p1, Outcome.TIMEOUT, 1.0, 1.0)
    stats = p1.stats
    assert stats.sent == 2 and stats.answered == 1 and stats.outcomes[Outcome.TIMEOUT] == 1
