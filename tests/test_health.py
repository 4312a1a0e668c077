"""Upstream health as time-travel tables: detection, hysteresis, adaptive rate."""

from __future__ import annotations

import itertools
import random

from resolver.core.health import (
    HOLD_SECONDS,
    MIN_RATE_PPS,
    WINDOW_SECONDS,
    Health,
    State,
)
from resolver.core.model import Outcome

OK, TIMEOUT, SERVFAIL = Outcome.OK, Outcome.TIMEOUT, Outcome.SERVFAIL


def feed(health: Health, events: list[tuple[float, Outcome, float]],
         tick: bool = False) -> list[tuple[float, str]]:
    """(time, outcome, rtt) events in; (time, new state) transitions out. With tick, the
    pool's periodic evaluation runs after every event too."""
    seen = []
    for now, outcome, rtt in events:
        health.on_sent(now)
        transition = health.on_outcome(outcome, rtt, now)
        if transition is None and tick:
            transition = health.evaluate(now)
        if transition is not None:
            seen.append((now, transition.new.value))
    return seen


def steady(start: float, seconds: float, rate: float, outcome: Outcome = OK,
           rtt: float = 0.002) -> list[tuple[float, Outcome, float]]:
    n = int(seconds * rate)
    return [(start + i / rate, outcome, rtt) for i in range(n)]


def test_silent_loss_is_throttling_and_is_seen_within_the_window() -> None:
    health = Health(500, 0.0)
    events = steady(0.0, 2.0, 100)
    # From t=2 one query in three is dropped: timeouts are known 1 s later (the try timeout).
    for i in range(300):
        now = 2.0 + i / 100
        events.append((now, TIMEOUT if i % 3 == 0 else OK, 0.002))
    transitions = feed(health, events)
    assert transitions[0][1] == "throttled"
    # Decided once the timeouts reach 5% of the window's outcomes, a quarter second in.
    assert transitions[0][0] - 2.0 < 0.5
    assert "silent loss" in health.last_evidence


def test_one_percent_random_loss_never_flaps() -> None:
    rng = random.Random(7)
    health = Health(500, 0.0)
    events = [(i / 200, TIMEOUT if rng.random() < 0.01 else OK, 0.002) for i in range(200 * 120)]
    assert feed(health, events) == []


def test_an_upstream_going_dark_is_throttled_then_down() -> None:
    health = Health(None, 0.0)
    transitions = feed(health, steady(0.0, 1.0, 10) + steady(1.0, 3.0, 10, TIMEOUT))
    # Silent loss while earlier answers are in the window; DOWN once none are left in it.
    assert transitions == [(1.2, "throttled"), (2.8, "down")]


def test_error_burst_is_throttling() -> None:
    health = Health(None, 0.0)
    events = steady(0.0, 1.0, 10) + steady(1.0, 0.6, 10, SERVFAIL)
    assert feed(health, events)[0][1] == "throttled"
    assert health.last_evidence.startswith("error burst")


def test_rtt_inflation_is_throttling() -> None:
    health = Health(None, 0.0)
    events = steady(0.0, 5.0, 20, rtt=0.002) + steady(5.0, 1.0, 20, rtt=0.2)
    # Answers alone never evaluate a healthy upstream (the common case stays cheap); the
    # pool's tick does.
    assert feed(health, events) == []
    health = Health(None, 0.0)
    assert feed(health, events, tick=True)[0][1] == "throttled"
    assert health.last_evidence.startswith("RTT inflation")


def test_return_needs_the_hold_time_and_a_clean_run() -> None:
    health = Health(100, 0.0)
    feed(health, steady(0.0, 1.0, 20) + steady(1.0, 0.2, 20, TIMEOUT))
    assert health.state is State.THROTTLED
    last_timeout = 1.15
    # Clean answers throughout; the timeouts stay evidence while inside the 2 s window, so
    # the hold ends between HOLD and HOLD + window after the last timeout.
    transitions = feed(health, steady(1.25, HOLD_SECONDS + 3.0, 10))
    assert [s for _, s in transitions] == ["healthy"]
    assert HOLD_SECONDS <= transitions[0][0] - last_timeout <= HOLD_SECONDS + WINDOW_SECONDS
    assert health.learned_rate is None


def test_a_down_upstream_comes_back_through_throttled_at_a_low_rate() -> None:
    health = Health(200, 0.0)
    feed(health, steady(0.0, 1.0, 10, TIMEOUT))
    assert health.state is State.DOWN
    transitions = feed(health, [(5.0, OK, 0.002)])
    assert transitions == [(5.0, "throttled")]
    assert health.learned_rate == 20.0  # a tenth of the budget, then it climbs


def test_adaptive_rate_decreases_multiplicatively_and_increases_additively() -> None:
    health = Health(1000, 0.0)
    feed(health, steady(0.0, 2.0, 400))
    # Loss: the learned rate drops to what was delivered (or 0.7 x, whichever is lower).
    feed(health, steady(2.0, 0.5, 400, TIMEOUT))
    assert health.state is State.THROTTLED
    first = health.learned_rate
    assert first is not None and first <= 700
    # (time, learned rate) while clean: +5% of the budget (50 pps) per second.
    rates = []
    for second in range(5, 12):
        feed(health, steady(float(second), 1.0, 50))
        rates.append(health.learned_rate)
    steps = [round(b - a) for a, b in itertools.pairwise(rates)]
    assert all(step == 50 for step in steps), rates
    assert max(rates) <= 1000


def test_learned_rate_never_below_the_minimum() -> None:
    health = Health(100, 0.0)
    feed(health, [(0.0, OK, 0.001), *steady(0.1, 5.0, 5, TIMEOUT)[:3], (0.9, OK, 0.001)])
    assert health.learned_rate is not None and health.learned_rate >= MIN_RATE_PPS


def test_external_evidence_throttles_at_once() -> None:
    health = Health(900, 0.0)
    transition = health.on_external("ENA linklocal_allowance_exceeded rose by 12", 1.0)
    assert transition is not None and transition.new is State.THROTTLED
    assert health.last_evidence.startswith("ENA")
