"""`resolver bench capacity`: the plan, the knee, the outputs, the guard, and a real ramp.

The ramp runs against ``RateLimitedUpstream`` on loopback (it answers ``pps`` queries per
one-second window and drops the rest), so the knee it must find is known in advance. Everything
else is pure: synthetic steps in, decisions out.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

import resolver.bench
from resolver.bench import capacity as cap
from resolver.cli import main

from fakeupstream import FakeUpstream, RateLimitedUpstream

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def step(target: float, loss: float = 0.0, p99_ms: float | None = 2.0,
         ena: dict[str, int | None] | None = None) -> cap.Step:
    sent = int(target)
    answered = round(sent * (1 - loss))
    return cap.Step(target, target, float(answered), loss, 1.0 if p99_ms else None, p99_ms,
                    sent, answered, sent - answered, 0.5, ena or {})


@pytest.mark.parametrize(
    ("steps", "loss_threshold", "p99_bound_ms", "knee"),
    [
        ([step(100), step(200), step(300)], 0.01, 100.0, None),
        ([step(100), step(200, loss=0.02), step(300, loss=0.3)], 0.01, 100.0, 1),
        ([step(100), step(200, loss=0.01)], 0.01, 100.0, None),  # at the threshold: not above
        ([step(100), step(200, p99_ms=150.0), step(300, loss=0.5)], 0.01, 100.0, 1),
        ([step(100, p99_ms=None), step(200, p99_ms=100.0)], 0.01, 100.0, None),
        ([step(100, loss=1.0, p99_ms=None)], 0.01, 100.0, 0),  # nothing answered at all
        ([step(100), step(200, loss=0.04), step(300, loss=0.2)], 0.05, 100.0, 2),
        ([step(100, p99_ms=30.0), step(200, p99_ms=60.0)], 0.01, 50.0, 1),
        ([], 0.01, 100.0, None),
    ],
)
def test_knee_detection(steps: list[cap.Step], loss_threshold: float, p99_bound_ms: float,
                        knee: int | None) -> None:
    assert cap.find_knee(steps, loss_threshold, p99_bound_ms) == knee


@pytest.mark.parametrize(
    ("config", "rates", "cut", "budget"),
    [
        (cap.RampConfig(), [100.0 * k for k in range(1, 21)], 0, 42_000),
        (cap.RampConfig(100, 100, 350, 1.0), [100.0, 200.0, 300.0], 0, 600),
        (cap.RampConfig(100, 100, 2000, 2.0, max_seconds=10.0), [100.0, 200.0, 300.0], 17, 1200),
        (cap.RampConfig(500, 50, 500, 0.5), [500.0], 0, 250),
    ],
)
def test_plan_and_budget(config: cap.RampConfig, rates: list[float], cut: int,
                         budget: int) -> None:
    plan = cap.plan_steps(config)
    assert plan.rates_pps == rates
    assert plan.cut_by_time == cut
    assert plan.budget_packets == budget
    assert plan.worst_case_seconds <= config.max_seconds
    assert f"budget {budget} queries" in cap.describe_plan(plan, config)


def test_ramp_stops_one_step_after_the_knee_unless_full() -> None:
    for full, expected_steps in ((False, 3), (True, 5)):
        ramp = cap.Ramp(cap.RampConfig(100, 100, 500, 1.0, full=full))
        losses = iter([0.0, 0.2, 0.4, 0.6, 0.8])
        while (rate := ramp.next_rate(elapsed_s=0.0)) is not None:
            ramp.record(step(rate, loss=next(losses)))
        assert len(ramp.steps) == expected_steps
        assert ramp.knee_pps == 200.0
        report = ramp.report("127.0.0.1:53")
        assert report["last_good_pps"] == 100.0
        assert report["sent_packets"] <= report["budget_packets"]


def test_ramp_respects_max_seconds() -> None:
    ramp = cap.Ramp(cap.RampConfig(100, 100, 2000, 2.0, max_seconds=60.0))
    assert ramp.next_rate(elapsed_s=0.0) == 100.0
    ramp.record(step(100))
    assert ramp.next_rate(elapsed_s=58.0) is None
    assert ramp.stop_reason == "max_seconds reached"


def test_ena_deltas_and_sources(tmp_path: Path) -> None:
    before = {"linklocal_allowance_exceeded": 5, "pps_allowance_exceeded": 7}
    after = {"linklocal_allowance_exceeded": 12, "pps_allowance_exceeded": 3}  # pps: reset
    assert cap.ena_deltas(before, after) == {
        "linklocal_allowance_exceeded": 7, "pps_allowance_exceeded": None}
    assert cap.ena_deltas(None, after) == {}
    path = tmp_path / "ethtool.txt"
    path.write_text("NIC statistics:\n     linklocal_allowance_exceeded: 42\n")
    assert cap.EnaSource(path=path).read() == {"linklocal_allowance_exceeded": 42}
    command = cap.EnaSource(command=f"cat {path}")
    assert command.read() == {"linklocal_allowance_exceeded": 42}
    with pytest.raises(ValueError):
        cap.EnaSource()


def test_outputs_csv_json_png(tmp_path: Path) -> None:
    ramp = cap.Ramp(cap.RampConfig(100, 100, 300, 1.0))
    ena = {"linklocal_allowance_exceeded": 0, "pps_allowance_exceeded": 3}
    for rate, loss in ((100, 0.0), (200, 0.0), (300, 0.25)):
        ramp.record(step(rate, loss=loss, ena=ena))
    report = ramp.report("127.0.0.1:5300")
    written = cap.write_outputs(tmp_path, ramp, report, say=lambda line: None)
    rows = list(csv.DictReader((tmp_path / "capacity.csv").open()))
    assert [float(row["target_pps"]) for row in rows] == [100.0, 200.0, 300.0]
    assert rows[2]["loss"] == "0.25" and rows[2]["answered_pps"] == "225.0"
    assert rows[0]["pps_allowance_exceeded_delta"] == "3"
    data = json.loads((tmp_path / "capacity.json").read_text())
    assert data["knee_pps"] == 300.0
    assert data["last_good_pps"] == 200.0
    assert data["budget_packets"] == 600
    first = data["steps"][0]
    for key in ("offered_pps", "answered_pps", "loss", "p50_ms", "p99_ms",
                "linklocal_allowance_exceeded_delta", "pps_allowance_exceeded_delta"):
        assert key in first
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert written == [tmp_path / "capacity.csv", tmp_path / "capacity.json"]
        pytest.skip("matplotlib is not installed: no PNG to check")
    assert (tmp_path / "capacity.png").read_bytes()[:8] == PNG_MAGIC


def test_no_knee_is_null(tmp_path: Path) -> None:
    ramp = cap.Ramp(cap.RampConfig(100, 100, 200, 1.0))
    ramp.record(step(100))
    cap.write_outputs(tmp_path, ramp, ramp.report("127.0.0.1:53"), say=lambda line: None)
    data = json.loads((tmp_path / "capacity.json").read_text())
    assert data["knee_pps"] is None and data["last_good_pps"] == 100.0


@pytest.mark.parametrize("target", ["10.0.0.1:53", "192.0.2.1:53", "[2001:db8::1]:53"])
def test_non_loopback_target_is_refused_in_one_line(target: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "capacity", "--target", target,
                                       "--out", str(tmp_path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--i-own-this-target" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing was sent, nothing written


def test_guard_accepts_loopback_and_owned_targets() -> None:
    assert cap.parse_target("127.0.0.1:5353", False) == ("127.0.0.1", 5353)
    assert cap.parse_target("[::1]:53", False) == ("::1", 53)
    assert cap.parse_target("10.0.0.1:53", True) == ("10.0.0.1", 53)
    for bad in ("localhost:53", "127.0.0.1", "127.0.0.1:0"):
        with pytest.raises(ValueError):
            cap.parse_target(bad, False)


def test_names_file(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("# mail\nexample.test MX\n\nmx1.example.test.\n")
    assert cap.read_names(path) == [("example.test.", "MX"), ("mx1.example.test.", "A")]


LIMIT_PPS = 250


def test_ramp_finds_the_rate_limit_within_one_step(
    fake_upstream: Callable[..., FakeUpstream], tmp_path: Path,
) -> None:
    upstream = fake_upstream(RateLimitedUpstream, pps=LIMIT_PPS)
    result = CliRunner().invoke(main, [
        "bench", "capacity", "--target", f"127.0.0.1:{upstream.port}", "--start", "100",
        "--step", "100", "--max", "600", "--step-seconds", "1", "--max-seconds", "30",
        "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "budget 2100 queries at most" in result.output.splitlines()[0]
    data = json.loads((tmp_path / "capacity.json").read_text())
    assert data["knee_pps"] is not None
    assert abs(data["knee_pps"] - LIMIT_PPS) <= 100
    # One step past the knee, then stop: no step beyond knee + 100.
    assert max(s["target_pps"] for s in data["steps"]) <= data["knee_pps"] + 100
    assert data["sent_packets"] <= data["budget_packets"]
    saturated = [s for s in data["steps"] if s["target_pps"] > LIMIT_PPS]
    assert all(s["answered_pps"] <= LIMIT_PPS * 1.1 for s in saturated)
    assert upstream.dropped > 0  # type: ignore[attr-defined]


def test_without_matplotlib_one_line_and_still_csv_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "resolver.bench.capacity_plot", None)  # import fails
    monkeypatch.delattr(resolver.bench, "capacity_plot", raising=False)  # as never imported
    ramp = cap.Ramp(cap.RampConfig(100, 100, 200, 1.0))
    ramp.record(step(100))
    said: list[str] = []
    written = cap.write_outputs(tmp_path, ramp, ramp.report("127.0.0.1:53"), say=said.append)
    assert written == [tmp_path / "capacity.csv", tmp_path / "capacity.json"]
    assert len(said) == 1 and "matplotlib" in said[0]
    assert not (tmp_path / "capacity.png").exists()


def test_ena_file_deltas_reach_the_json(
    fake_upstream: Callable[..., FakeUpstream], tmp_path: Path,
) -> None:
    upstream = fake_upstream("answer")
    ena_file = tmp_path / "ethtool.txt"
    ena_file.write_text("NIC statistics:\n     linklocal_allowance_exceeded: 0\n"
                        "     pps_allowance_exceeded: 0\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "bench", "capacity", "--target", f"127.0.0.1:{upstream.port}", "--start", "50",
        "--max", "50", "--step-seconds", "0.5", "--ena-file", str(ena_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "capacity.json").read_text())
    [only] = data["steps"]
    assert only["linklocal_allowance_exceeded_delta"] == 0
    assert only["pps_allowance_exceeded_delta"] == 0
    assert only["loss"] == 0 and data["knee_pps"] is None
