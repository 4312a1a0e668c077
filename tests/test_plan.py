"""The fleet model (resolver/bench/plan.py): its formula's properties, limits and CLI output."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.bench import plan, workload
from resolver.cli import main

rates = st.floats(min_value=1e-4, max_value=1e4)
ttls = st.floats(min_value=0.0, max_value=1e5)


@given(rates, ttls, ttls)
def test_steady_miss_rate_bounded_and_falls_with_ttl(rate: float, ttl_a: float,
                                                    ttl_b: float) -> None:
    short, long = sorted((ttl_a, ttl_b))
    assert plan.steady_miss_rate(rate, long) <= plan.steady_miss_rate(rate, short) <= rate
    if long > 0:
        assert plan.steady_miss_rate(rate, long) <= 1.0 / long  # at most one miss per TTL


@given(rates, rates, st.floats(min_value=0.1, max_value=1e4))
def test_steady_miss_rate_rises_with_rate(rate_a: float, rate_b: float, ttl: float) -> None:
    low, high = sorted((rate_a, rate_b))
    assert plan.steady_miss_rate(low, ttl) <= plan.steady_miss_rate(high, ttl)


def test_steady_limits() -> None:
    assert plan.steady_miss_rate(7.0, 0.0) == 7.0  # nothing cached: every query misses
    assert plan.steady_miss_rate(1e9, 300.0) == pytest.approx(1 / 300, rel=1e-6)  # hot key
    assert plan.steady_miss_rate(1e-6, 300.0) == pytest.approx(1e-6, rel=1e-3)  # cold key


@pytest.mark.parametrize("rate", [0.001, 0.05, 1.0, 20.0])
def test_cold_start_first_window_is_the_chance_of_being_asked(rate: float) -> None:
    assert plan.expected_misses(rate, 300.0, 60.0) == pytest.approx(-math.expm1(-rate * 60))


@settings(max_examples=50)
@given(st.floats(min_value=0.01, max_value=10), st.floats(min_value=1, max_value=100),
       st.floats(min_value=0.1, max_value=2000), st.floats(min_value=0.1, max_value=2000))
def test_cold_start_grows_with_time_and_tends_to_steady_state(
        rate: float, ttl: float, t_a: float, t_b: float) -> None:
    early, late = sorted((t_a, t_b))
    assert plan.expected_misses(rate, ttl, early) <= plan.expected_misses(rate, ttl, late) + 1e-6
    # The long-run mean rate is the steady-state rate (renewal theorem).
    horizon = 1000 * (ttl + 1 / rate)
    mean = plan.expected_misses(rate, ttl, horizon) / horizon
    assert mean == pytest.approx(plan.steady_miss_rate(rate, ttl), rel=0.01)


def test_exact_sum_and_asymptote_agree_where_they_meet() -> None:
    rate, ttl = 0.5, 10.0
    boundary = plan.MAX_EXACT_RENEWALS * ttl
    exact = plan.expected_misses(rate, ttl, boundary - 1e-6)
    asymptote = plan.expected_misses(rate, ttl, boundary + 1e-6)
    assert asymptote == pytest.approx(exact, rel=0.02)


def test_queries_per_message_matches_the_generator() -> None:
    mix = workload.MailMix(n_domains=2000)
    model = plan.build_workload(2000, mix.zipf_exponent, None, None, mix)
    messages = list(itertools.islice(workload.messages(mix, 3), 40_000))
    empirical = sum(map(len, messages)) / len(messages)
    assert model.queries_per_message == pytest.approx(empirical, rel=0.01)


def test_cold_start_prediction_matches_the_traces_distinct_keys() -> None:
    """Over a run shorter than every TTL, an ideal cache misses each key once: the model's
    cold-start term must predict the number of distinct keys of the seeded trace."""
    mix = workload.MailMix(n_domains=5000)
    model = plan.build_workload(5000, mix.zipf_exponent, None, None, mix)
    rate_qps, seconds = 500.0, 60.0
    trace = workload.queries(mix, 7, int(rate_qps * seconds))
    misses = model.misses_per_second(rate_qps / model.queries_per_message, seconds)
    predicted = sum(misses.values()) * seconds
    assert predicted == pytest.approx(len(set(trace)), rel=0.03)


def _misses(n_domains: int = 2000, ttl: float | None = None, messages: float = 50.0,
            zipf: float = 1.1) -> float:
    model = plan.build_workload(n_domains, zipf, None, ttl)
    return sum(model.misses_per_second(messages).values())


def test_misses_fall_with_ttl_rise_with_rate_and_domains() -> None:
    assert _misses(ttl=60) > _misses(ttl=300) > _misses(ttl=3600)
    assert _misses(messages=10) < _misses(messages=100) < _misses(messages=1000)
    assert _misses(n_domains=100) < _misses(n_domains=1000) < _misses(n_domains=10000)
    assert _misses(zipf=1.4) < _misses(zipf=1.1) < _misses(zipf=0.5)  # skew helps the cache


def test_model_limit_cases() -> None:
    model = plan.build_workload(1000, 1.1, None, 0.0)
    client = 50.0 * model.queries_per_message
    assert sum(model.misses_per_second(50.0).values()) == pytest.approx(client)  # TTL 0
    one = plan.build_workload(1, 0.0, 3.0, 300.0)  # one domain, three keys, all hot
    assert sum(one.misses_per_second(1e6).values()) == pytest.approx(3 / 300, rel=1e-3)


def test_given_hit_ratio_is_linear_and_sizes_interfaces_and_hosts() -> None:
    model = plan.build_workload(1000, 1.1, 4.0, 300.0)
    inputs = plan.PlanInput(2000.0, model, hit_ratio=0.9, overhead_factor=1.05,
                            allowance_pps=1024, margin=0.25)
    p = plan.predict(inputs)
    assert p.client_queries_per_second == pytest.approx(8000)
    assert p.upstream_packets_per_second == pytest.approx(840)
    assert p.upstream_packets_per_1000_queries == pytest.approx(105)
    assert p.interfaces_needed == 2 and p.hosts_needed == 2  # 840 > 768 usable, 420 fits


@pytest.mark.parametrize("messages", [500.0, 5000.0, 50000.0])
def test_hosts_needed_is_the_least_that_fits(messages: float) -> None:
    model = plan.build_workload(20000, 1.1, None, None)
    inputs = plan.PlanInput(messages, model, allowance_pps=200.0, margin=0.25)
    hosts = plan.hosts_needed(inputs)
    assert plan.upstream_packets_per_second(inputs, messages / hosts) <= inputs.usable_pps
    if hosts > 1:
        assert plan.upstream_packets_per_second(inputs, messages / (hosts - 1)) > inputs.usable_pps
    # Caches are per host: splitting the volume raises the fleet's total upstream rate.
    total = plan.upstream_packets_per_second(inputs, messages)
    assert hosts * plan.upstream_packets_per_second(inputs, messages / hosts) >= total - 1e-9


def test_inputs_are_validated() -> None:
    model = plan.build_workload(10, 1.1, None, None)
    for bad in ({"hit_ratio": 1.5}, {"overhead_factor": 0.9}, {"margin": 1.0},
                {"horizon_seconds": 0.0}):
        with pytest.raises(ValueError):
            plan.PlanInput(10.0, model, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one key, one TTL"):
        plan.Workload(10, 1.1, (plan.LookupKind("x", 1, 1), plan.LookupKind("x", 1, 2)))


def test_cli_text_output() -> None:
    result = CliRunner().invoke(main, ["bench", "plan", "--messages-per-second", "2000",
                                       "--hit-ratio", "0.9", "--queries-per-message", "4"])
    assert result.exit_code == 0, result.output
    assert "client queries/s:            8000.0" in result.output
    assert "upstream packets/s:          840.0" in result.output
    assert "interfaces needed (1 host):  2" in result.output
    assert "hosts needed (1 iface each): 2" in result.output


def test_cli_json_output_mail_mix() -> None:
    result = CliRunner().invoke(main, ["bench", "plan", "--messages-per-second", "200",
                                       "--domains", "5000", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["hit_ratio_source"] == "zipf model"
    assert 0 < data["hit_ratio"] < 1
    assert data["queries_per_message"] == pytest.approx(4.1, abs=0.1)
    assert set(data["misses_by_key"]) >= {"MX d", "A mx1", "PTR unknown"}


def test_cli_bad_input_is_one_line() -> None:
    result = CliRunner().invoke(main, ["bench", "plan", "--messages-per-second", "10",
                                       "--hit-ratio", "2"])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.strip()] == [
        "Error: hit_ratio must be in [0, 1]"]
