"""The forwarding policy: order, tries and deadline, as time-travel tables."""

from __future__ import annotations

from resolver.core.model import Endpoint, Outcome
from resolver.core.pool import Pool, Resolution, Timing

P1, P2, F1 = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.2", 1), Endpoint("127.0.0.3", 1)


def test_primaries_first_then_fallbacks() -> None:
    assert Pool((P1, P2), (F1,)).order(0.0) == (P1, P2, F1)


def test_tries_walk_the_order_and_stop_at_an_answer() -> None:
    res = Resolution((P1, P2, F1), Timing(try_timeout=1.0, deadline=4.0, max_tries=4), 0.0)
    # (now, outcome of this try, expected upstream, expected timeout, resolution over?)
    table = [
        (0.0, Outcome.TIMEOUT, P1, 1.0, False),
        (1.0, Outcome.SERVFAIL, P2, 1.0, False),
        (1.1, Outcome.NXDOMAIN, F1, 1.0, True),
    ]
    for now, outcome, upstream, timeout, over in table:
        attempt = res.next_try(now)
        assert attempt is not None
        assert (attempt.upstream, attempt.timeout) == (upstream, timeout)
        assert res.record(attempt, outcome, now) is over


def test_deadline_shortens_the_last_try_and_ends_the_resolution() -> None:
    res = Resolution((P1,), Timing(try_timeout=1.0, deadline=2.5, max_tries=10), 0.0)
    timeouts = []
    now = 0.0
    while (attempt := res.next_try(now)) is not None:
        timeouts.append(attempt.timeout)
        res.record(attempt, Outcome.TIMEOUT, now)
        now += attempt.timeout
    assert timeouts == [1.0, 1.0, 0.5]


def test_max_tries_bounds_fast_failures() -> None:
    res = Resolution((P1, P2), Timing(try_timeout=1.0, deadline=60.0, max_tries=3), 0.0)
    seen = []
    while (attempt := res.next_try(0.0)) is not None:
        seen.append(attempt.upstream)
        res.record(attempt, Outcome.REFUSED, 0.0)
    assert seen == [P1, P2, P1]


def test_report_counts_outcomes() -> None:
    pool = Pool((P1,), ())
    pool.report(P1, Outcome.OK, 0.01, 0.0)
    pool.report(P1, Outcome.TIMEOUT, 1.0, 1.0)
    stats = pool.stats[P1]
    assert stats.sent == 2 and stats.answered == 1 and stats.outcomes[Outcome.TIMEOUT] == 1


def test_fallback_is_reached_even_with_more_primaries_than_tries() -> None:
    primaries = tuple(Endpoint(f"127.0.0.{i}", 53) for i in range(1, 6))
    res = Resolution((*primaries, F1), Timing(try_timeout=0.1, deadline=60.0, max_tries=4),
                     0.0)
    seen = []
    while (attempt := res.next_try(0.0)) is not None:
        seen.append(attempt.upstream)
        res.record(attempt, Outcome.TIMEOUT, 0.0)
    assert seen == [*primaries, F1]
