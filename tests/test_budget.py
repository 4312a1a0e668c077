"""Token buckets: the grant bound (property-tested), the reserve, TCP's packet cost."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.core.budget import Priority, TokenBucket, default_burst, tcp_packets

# (time offset, packets asked, background?) sequences over a few seconds.
requests = st.lists(
    st.tuples(st.floats(0, 0.2), st.integers(1, 7), st.booleans()),
    min_size=1, max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(1, 2000), burst=st.floats(1, 500), steps=requests)
def test_grants_never_exceed_rate_times_t_plus_burst(rate: float, burst: float,
                                                     steps: list) -> None:
    bucket = TokenBucket(rate, burst, 0.0)
    now = 0.0
    granted: list[tuple[float, int]] = []
    for dt, packets, background in steps:
        now += dt
        priority = Priority.BACKGROUND if background else Priority.CLIENT
        if bucket.try_spend(packets, now, priority):
            granted.append((now, packets))
    # Every interval between two grant times: packets <= burst + rate x length.
    for i, (start, _) in enumerate(granted):
        total = 0
        for end, packets in granted[i:]:
            total += packets
            assert total <= burst + rate * (end - start) + 1e-6


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(1, 5000), steps=st.lists(st.floats(0, 0.05), min_size=1, max_size=400))
def test_any_one_second_window_gets_at_most_pps_plus_burst(rate: float, steps: list) -> None:
    burst = default_burst(rate)
    bucket = TokenBucket(rate, burst, 0.0)
    now, sent = 0.0, []
    for dt in steps:
        now += dt
        while bucket.try_spend(1, now):
            sent.append(now)
    for i, start in enumerate(sent):
        in_window = sum(1 for t in sent[i:] if t < start + 1.0)
        assert in_window <= rate + burst + 1e-6


def test_background_stops_at_the_reserve_clients_do_not() -> None:
    bucket = TokenBucket(100, 10, 0.0, reserve_fraction=0.2)
    background = sum(bucket.try_spend(1, 0.0, Priority.BACKGROUND) for _ in range(20))
    clients = sum(bucket.try_spend(1, 0.0, Priority.CLIENT) for _ in range(20))
    assert (background, clients) == (8, 2)


# (time, packets, granted?) for a 10 pps bucket with a burst of 2.
REFILL = [(0.0, 1, True), (0.0, 1, True), (0.0, 1, False), (0.05, 1, False), (0.1, 1, True),
          (0.1, 1, False), (0.5, 3, False), (0.5, 2, True)]


def test_refill_as_a_time_table() -> None:
    bucket = TokenBucket(10, 2, 0.0)
    for now, packets, expected in REFILL:
        assert bucket.try_spend(packets, now) is expected, (now, packets)


def test_next_grant_time() -> None:
    bucket = TokenBucket(10, 1, 0.0)
    assert bucket.next_grant_at(1, 0.0) == 0.0
    bucket.try_spend(1, 0.0)
    assert abs(bucket.next_grant_at(1, 0.0) - 0.1) < 1e-9


def test_debt_delays_later_grants() -> None:
    bucket = TokenBucket(10, 2, 0.0)
    bucket.charge(5, 0.0)  # three tokens of debt
    assert not bucket.try_spend(1, 0.35)
    assert bucket.try_spend(1, 0.4)


def test_rate_changes_apply_from_now_and_never_exceed_the_budget() -> None:
    bucket = TokenBucket(100, 10, 0.0)
    bucket.set_rate(1000, 0.0)
    assert bucket.rate == 100
    bucket.set_rate(10, 0.0)
    for _ in range(10):
        bucket.try_spend(1, 0.0)
    assert not bucket.try_spend(1, 0.05) and bucket.try_spend(1, 0.1)


def test_unbudgeted_upstreams_get_a_bucket_when_throttled() -> None:
    bucket = TokenBucket(None, None, 0.0)
    assert all(bucket.try_spend(1, 0.0) for _ in range(10_000))
    bucket.set_rate(50, 1.0)
    granted = sum(bucket.try_spend(1, 1.0) for _ in range(100))
    assert granted == default_burst(50)


def test_tcp_packet_cost_is_counted() -> None:
    # SYN, ACK, query, one ACK per two reply segments (at least one), FIN, ACK of FIN.
    assert tcp_packets(100) == 6
    assert tcp_packets(1460 * 4) == 8  # 5 segments (with the length prefix) -> 3 ACKs
    assert tcp_packets(65535) == 5 + 23
