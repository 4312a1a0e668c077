"""`resolver bench capacity`: ramp the offered packet rate toward a nameserver until it breaks.

The tool an SRE hands the cloud provider: offered rate in steps, and per step what came back.

- The plan (``plan_steps``) is ``start, start + step, ..., max`` queries per second, cut to the
  steps whose worst-case time (``step_seconds + query_timeout_s`` each) fits in
  ``max_seconds``. Its packet budget (``sum(rate) * step_seconds`` queries) is stated before
  the first packet goes out, and the run never sends more.
- Each step is one open-loop ``loadgen.run_load`` at that rate for ``step_seconds`` (open loop:
  the offered rate does not drop when the server does, so loss and latency under overload are
  honest). When an ENA counter source is given (``ethtool -S IFACE`` output from a command or a
  file), it is read before and after each step and the deltas of
  ``linklocal_allowance_exceeded`` and ``pps_allowance_exceeded`` are recorded.
- The knee (``find_knee``) is the first step whose loss is above ``loss_threshold`` or whose
  p99 latency is above ``p99_bound_ms``; ``knee_pps`` is that step's target rate. The last
  step before it is the highest rate the target carried within those bounds.
- After the knee the ramp runs one more step (to show the knee is not a one-step blip) and
  stops, unless ``full`` asks for the whole plan.

Invariants: steps run in plan order and never past it; the packets sent never exceed the
stated budget; ``knee_pps`` is None exactly when no recorded step crosses a bound.

``Ramp`` holds every decision and takes the clock as an argument; ``run_ramp`` is the I/O loop
that drives it. Traffic goes to loopback only, unless the caller states it owns the target.
"""

from __future__ import annotations

import csv
import dataclasses
import ipaddress
import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from resolver.bench import loadgen, workload
from resolver.core.ena import LINKLOCAL, PPS, parse_ethtool

DEFAULT_LOSS_THRESHOLD = 0.01  # 1 %: a mail server retries, but a steady 1 % is already pain
DEFAULT_P99_BOUND_MS = 100.0  # a resolver answering slower than this delays every SMTP session
DEFAULT_QUERY_TIMEOUT_S = 1.0  # a reply later than this is a loss for the knee anyway
DEFAULT_MAX_SECONDS = 120.0
WORKLOAD_LOOKUPS = 20_000  # the mail workload is generated once at this length and cycled
ENA_COMMAND_TIMEOUT_S = 5.0  # `ethtool -S` answers in milliseconds; a hang must not stall us
ENA_COUNTERS = (LINKLOCAL, PPS)
TICK_S = 0.25  # the progress line is redrawn this often while a step runs
PROGRESS_WIDTH = 20
CSV_FIELDS = (
    "target_pps", "offered_pps", "answered_pps", "loss", "p50_ms", "p99_ms", "sent",
    "answered", "timeouts", "schedule_lag_ms", *(f"{name}_delta" for name in ENA_COUNTERS),
)


class TargetRefused(ValueError):
    """The target is not loopback and the caller did not say it owns it."""


@dataclass(frozen=True)
class RampConfig:
    """One capacity run. Rates are queries (= packets out) per second."""

    start_pps: float = 100.0
    """The first step's rate."""
    step_pps: float = 100.0
    """How much each step adds."""
    max_pps: float = 2000.0
    """No step goes above this rate."""
    step_seconds: float = 2.0
    """How long each step sends."""
    loss_threshold: float = DEFAULT_LOSS_THRESHOLD
    """A step losing more than this share of its queries is the knee."""
    p99_bound_ms: float = DEFAULT_P99_BOUND_MS
    """A step whose p99 latency is above this is the knee."""
    max_seconds: float = DEFAULT_MAX_SECONDS
    """The whole run's time bound: the plan is cut to the steps that fit in it."""
    query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S
    """A query unanswered this long after it was sent is lost; each step waits this at most."""
    full: bool = False
    """Run the whole plan instead of stopping one step after the knee."""

    def __post_init__(self) -> None:
        positive = ("start_pps", "step_pps", "max_pps", "step_seconds", "max_seconds",
                    "query_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        if self.max_pps < self.start_pps:
            raise ValueError(f"max_pps ({self.max_pps:g}) is below start_pps ({self.start_pps:g})")
        if not 0 <= self.loss_threshold < 1:
            raise ValueError(f"loss_threshold must be in [0, 1), not {self.loss_threshold!r}")
        if self.step_seconds + self.query_timeout_s > self.max_seconds:
            raise ValueError("max_seconds is shorter than one step (step_seconds + timeout)")


@dataclass(frozen=True)
class Plan:
    rates_pps: list[float]
    """The steps that will run at most, in order."""
    cut_by_time: int
    """Steps of start..max left out because they would not fit in max_seconds."""
    budget_packets: int
    """Queries the plan sends at most: sum of rate x step_seconds (each may get one reply)."""
    worst_case_seconds: float


def plan_steps(config: RampConfig) -> Plan:
    rates: list[float] = []
    index = 0
    while (rate := config.start_pps + index * config.step_pps) <= config.max_pps + 1e-9:
        rates.append(rate)
        index += 1
    per_step_s = config.step_seconds + config.query_timeout_s
    fitting = int(config.max_seconds // per_step_s)
    kept = rates[:fitting]
    budget = sum(loadgen.scheduled_count(rate, config.step_seconds) for rate in kept)
    return Plan(kept, len(rates) - len(kept), budget, len(kept) * per_step_s)


def describe_plan(plan: Plan, config: RampConfig) -> str:
    text = (f"plan: {len(plan.rates_pps)} steps {plan.rates_pps[0]:g}..{plan.rates_pps[-1]:g} "
            f"pps, {config.step_seconds:g} s each: budget {plan.budget_packets} queries at most, "
            f"{plan.worst_case_seconds:g} s at most")
    if plan.cut_by_time:
        text += f" ({plan.cut_by_time} higher steps left out by --max-seconds)"
    return text


@dataclass(frozen=True)
class Step:
    """What one step offered and what came back."""

    target_pps: float
    offered_pps: float  # queries actually sent per second of the step
    answered_pps: float
    loss: float  # share of the sent queries without a reply within the timeout
    p50_ms: float | None
    p99_ms: float | None
    sent: int
    answered: int
    timeouts: int
    schedule_lag_ms: float  # how far the sender fell behind; large means the client was the limit
    ena_deltas: dict[str, int | None] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in CSV_FIELDS if hasattr(self, name)}
        for name in ENA_COUNTERS:
            row[f"{name}_delta"] = self.ena_deltas.get(name)
        return row


def step_from_result(result: loadgen.LoadResult, ena_deltas: dict[str, int | None]) -> Step:
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 3)

    sent = result.sent
    return Step(
        target_pps=result.target_rate_qps,
        offered_pps=round(sent / result.duration_s, 1),
        answered_pps=round(result.answered / result.duration_s, 1),
        loss=round(result.timeouts / sent, 5) if sent else 1.0,
        p50_ms=ms(result.latency_p50_s),
        p99_ms=ms(result.latency_p99_s),
        sent=sent,
        answered=result.answered,
        timeouts=result.timeouts,
        schedule_lag_ms=round(result.max_schedule_lag_s * 1000, 1),
        ena_deltas=ena_deltas,
    )


def crosses_bound(step: Step, loss_threshold: float, p99_bound_ms: float) -> bool:
    if step.loss > loss_threshold:
        return True
    return step.p99_ms is not None and step.p99_ms > p99_bound_ms


def find_knee(steps: Sequence[Step], loss_threshold: float = DEFAULT_LOSS_THRESHOLD,
              p99_bound_ms: float = DEFAULT_P99_BOUND_MS) -> int | None:
    """Index of the first step with loss above the threshold or p99 above the bound."""
    for index, step in enumerate(steps):
        if crosses_bound(step, loss_threshold, p99_bound_ms):
            return index
    return None


class Ramp:
    """The run's decisions: which rate next, when to stop, where the knee is."""

    def __init__(self, config: RampConfig) -> None:
        self.config = config
        self.plan = plan_steps(config)
        self.steps: list[Step] = []
        self.stop_reason = "plan done"

    @property
    def knee_index(self) -> int | None:
        return find_knee(self.steps, self.config.loss_threshold, self.config.p99_bound_ms)

    @property
    def knee_pps(self) -> float | None:
        index = self.knee_index
        return None if index is None else self.steps[index].target_pps

    def next_rate(self, elapsed_s: float) -> float | None:
        """The next step's rate, or None when the run is over (and why, in stop_reason)."""
        done = len(self.steps)
        if done >= len(self.plan.rates_pps):
            return None
        knee = self.knee_index
        if knee is not None and not self.config.full and done >= knee + 2:
            self.stop_reason = "knee found, one step past it run"
            return None
        if elapsed_s + self.config.step_seconds + self.config.query_timeout_s > \
                self.config.max_seconds:
            self.stop_reason = "max_seconds reached"
            return None
        return self.plan.rates_pps[done]

    def record(self, step: Step) -> None:
        self.steps.append(step)

    def report(self, target: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        knee = self.knee_index
        carried = self.steps if knee is None else self.steps[:knee]
        last_good = carried[-1] if carried else None  # the highest rate within the bounds
        return {
            "target": target,
            "config": dataclasses.asdict(self.config),
            "budget_packets": self.plan.budget_packets,
            "sent_packets": sum(step.sent for step in self.steps),
            "stop_reason": self.stop_reason,
            "knee_pps": self.knee_pps,
            "last_good_pps": None if last_good is None else last_good.target_pps,
            "max_answered_pps": max((s.answered_pps for s in self.steps), default=None),
            "steps": [step.row() for step in self.steps],
            **(extra or {}),
        }


# --- inputs -----------------------------------------------------------------------------


def parse_target(text: str, i_own_this_target: bool) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` with an IP address; loopback unless the caller owns it."""
    host, separator, port_text = text.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ValueError(f"--target: expected HOST:PORT, not {text!r}")
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--target: {host!r} is not an IP address") from None
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"--target: bad port {port}")
    if not address.is_loopback and not i_own_this_target:
        raise TargetRefused(f"refusing to load non-loopback target {text}: pass "
                            "--i-own-this-target only if you own it and may overload it")
    return str(address), port


def read_names(path: str | Path) -> list[tuple[str, str]]:
    """A dnsperf-style file: ``name [TYPE]`` per line (A when absent); blanks and # skipped."""
    lookups: list[tuple[str, str]] = []
    for line in Path(path).read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            name = fields[0] if fields[0].endswith(".") else fields[0] + "."
            lookups.append((name, fields[1].upper() if len(fields) > 1 else "A"))
    if not lookups:
        raise ValueError(f"--names: no names in {path}")
    return lookups


def default_queries(seed: int) -> list[tuple[str, str]]:
    return workload.queries(workload.MailMix(), seed, WORKLOAD_LOOKUPS)


class EnaSource:
    """ENA counters from ``ethtool -S IFACE`` output: a command run, or a file read, per call."""

    def __init__(self, command: str | None = None, path: str | Path | None = None) -> None:
        if (command is None) == (path is None):
            raise ValueError("give exactly one of an ENA command or an ENA file")
        self.command = shlex.split(command) if command else None
        self.path = Path(path) if path else None

    def read(self) -> dict[str, int]:
        if self.command is not None:
            done = subprocess.run(self.command, capture_output=True, text=True, check=True,
                                  timeout=ENA_COMMAND_TIMEOUT_S)
            return parse_ethtool(done.stdout)
        assert self.path is not None
        return parse_ethtool(self.path.read_text())


def ena_deltas(before: dict[str, int] | None, after: dict[str, int] | None
               ) -> dict[str, int | None]:
    """Per counter, after - before; None when unknown or when it went down (driver reset)."""
    if before is None or after is None:
        return {}
    deltas: dict[str, int | None] = {}
    for name in ENA_COUNTERS:
        if name in before and name in after and after[name] >= before[name]:
            deltas[name] = after[name] - before[name]
        else:
            deltas[name] = None
    return deltas


# --- outputs ----------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


TABLE_COLUMNS = (("target_pps", 8), ("offered_pps", 9), ("answered_pps", 9), ("loss", 8),
                 ("p50_ms", 8), ("p99_ms", 8), ("schedule_lag_ms", 8))
TABLE_HEADERS = ("target", "offered", "answered", "loss", "p50 ms", "p99 ms", "lag ms")


def table_header(with_ena: bool) -> str:
    cells = [f"{title:>{width}}" for title, (_, width) in zip(TABLE_HEADERS, TABLE_COLUMNS,
                                                                strict=True)]
    if with_ena:
        cells += ["linklocal+", "pps+"]
    return " ".join(cells)


def table_row(step: Step, is_knee: bool, with_ena: bool) -> str:
    row = step.row()
    cells = [f"{_cell(row[name]):>{width}}" for name, width in TABLE_COLUMNS]
    if with_ena:
        cells += [f"{_cell(step.ena_deltas.get(LINKLOCAL)):>10}",
                  f"{_cell(step.ena_deltas.get(PPS)):>4}"]
    return " ".join(cells) + ("  <- knee" if is_knee else "")


def write_csv(path: Path, steps: Sequence[Step]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for step in steps:
            writer.writerow({k: ("" if v is None else v) for k, v in step.row().items()})


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


class Progress:
    """A one-line ticker on a terminal (nothing when the stream is not a terminal)."""

    def __init__(self, stream: TextIO, total_steps: int) -> None:
        self.stream = stream
        self.total_steps = total_steps
        self.enabled = stream.isatty()

    def draw(self, step_number: int, rate: float, step_elapsed_s: float,
             step_seconds: float) -> None:
        if not self.enabled:
            return
        fraction = (step_number - 1 + min(1.0, step_elapsed_s / step_seconds)) / self.total_steps
        filled = round(fraction * PROGRESS_WIDTH)
        bar = "#" * filled + "-" * (PROGRESS_WIDTH - filled)
        self.stream.write(f"\r[{bar}] step {step_number}/{self.total_steps} at {rate:g} pps "
                          f"{min(step_elapsed_s, step_seconds):.1f}/{step_seconds:g} s")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 72 + "\r")
            self.stream.flush()


# --- the I/O loop -----------------------------------------------------------------------


async def _tick(progress: Progress, step_number: int, rate: float, step_seconds: float) -> None:
    started = trio.current_time()
    while True:
        progress.draw(step_number, rate, trio.current_time() - started, step_seconds)
        await trio.sleep(TICK_S)


async def run_ramp(
    ramp: Ramp,
    target: tuple[str, int],
    queries: Sequence[tuple[str, str]],
    *,
    ena: EnaSource | None = None,
    on_step: Callable[[Step, bool], None] | None = None,
    progress: Progress | None = None,
    allow_non_loopback: bool = False,
    seed: int = 1,
) -> Ramp:
    """Run the ramp's steps against ``target``; ``on_step(step, is_knee)`` after each."""
    started = trio.current_time()
    while (rate := ramp.next_rate(trio.current_time() - started)) is not None:
        before = await trio.to_thread.run_sync(ena.read) if ena else None
        async with trio.open_nursery() as nursery:
            if progress is not None:
                nursery.start_soon(_tick, progress, len(ramp.steps) + 1, rate,
                                   ramp.config.step_seconds)
            result = await loadgen.run_load(
                target, queries, rate, ramp.config.step_seconds,
                timeout_s=ramp.config.query_timeout_s,
                allow_non_loopback=allow_non_loopback, seed=seed + len(ramp.steps))
            nursery.cancel_scope.cancel()
        if progress is not None:
            progress.clear()
        after = await trio.to_thread.run_sync(ena.read) if ena else None
        ramp.record(step_from_result(result, ena_deltas(before, after)))
        if on_step is not None:
            on_step(ramp.steps[-1], ramp.knee_index == len(ramp.steps) - 1)
    return ramp


def write_outputs(out: Path, ramp: Ramp, report: dict[str, Any],
                  say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
                  ) -> list[Path]:
    """capacity.csv, capacity.json and, when matplotlib is installed, capacity.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "capacity.csv", out / "capacity.json"]
    write_csv(written[0], ramp.steps)
    write_json(written[1], report)
    try:
        from resolver.bench import capacity_plot
    except ImportError:
        say("matplotlib is not installed (pip install 'resolver[plot]'): no capacity.png")
        return written
    capacity_plot.plot(out / "capacity.png", report)
    written.append(out / "capacity.png")
    return written
