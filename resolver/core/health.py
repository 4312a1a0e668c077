"""Upstream health: outcomes and RTTs over a sliding window → HEALTHY / THROTTLED / DOWN.

Throttling on AWS is silent loss: packets above the allowance vanish, the upstream answers
everyone else, and nothing in any answer says why (DESIGN.md 4). The evidence we use:
  - silent loss: timeouts while the same upstream answers other queries in the same window;
  - RTT inflation against the upstream's own healthy baseline;
  - REFUSED/SERVFAIL bursts (an overloaded cluster sheds load that way);
  - external evidence: ENA counters that rose while we sent to this upstream.

Invariants:
  1. HEALTHY → THROTTLED or DOWN on evidence inside one window (WINDOW_SECONDS), so throttling
     is seen within about a window of the first loss being known.
  2. THROTTLED → HEALTHY only after the hold time (HOLD_SECONDS) without evidence and
     CLEAN_RUN answers in a row: mild random loss (below LOSS_RATIO) is never evidence, so it
     cannot cause flapping.
  3. DOWN → THROTTLED only on answers (from probes): it comes back at a low rate and climbs.
  4. While THROTTLED the learned rate falls on new losses (to just under what was delivered,
     or multiplicatively when too few answers say what that is; at most once per
     RATE_STEP_SECONDS) and rises additively each clean step, never above the configured
     budget (an unbudgeted upstream: never above the rate it had when throttling began); the
     learned rate is cleared on the return to HEALTHY.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from resolver.core.budget import MIN_RATE_PPS
from resolver.core.model import Outcome

WINDOW_SECONDS = 2.0
BUCKET_SECONDS = 0.25
_BUCKETS = int(WINDOW_SECONDS / BUCKET_SECONDS)

# Silent loss: at least this many timeouts, and this share of the window's outcomes. 5% keeps
# 1% random loss (an ordinary bad day) from ever counting, even on a busy window.
LOSS_MIN_TIMEOUTS = 3
LOSS_RATIO = 0.05
# No answer at all to this many queries in a window: DOWN.
DOWN_MIN_FAILURES = 4
# REFUSED/SERVFAIL burst.
ERROR_MIN = 5
ERROR_RATIO = 0.3
# RTT inflation: the window's mean RTT over max(factor x baseline, baseline + floor).
RTT_MIN_SAMPLES = 10
RTT_INFLATION_FACTOR = 4.0
RTT_INFLATION_FLOOR_SECONDS = 0.05
# The healthy baseline follows faster RTTs quickly and slower ones very slowly, so inflation
# cannot become the new normal before it is noticed.
BASELINE_ALPHA_DOWN = 0.2
BASELINE_ALPHA_UP = 0.005
# Return: this long without evidence, and this many clean answers in a row.
HOLD_SECONDS = 30.0
CLEAN_RUN = 5
DOWN_RECOVERY_RUN = 1
# A DOWN upstream comes back at this share of its reference rate and climbs from there.
RECOVERY_RATE_FRACTION = 0.1
UNBUDGETED_REFERENCE_PPS = 100.0
# Adaptive rate (AIMD, as TCP finds a path's capacity).
RATE_STEP_SECONDS = 1.0
RATE_DECREASE = 0.7
# On loss with enough answers in the window, the rate goes to this share of what was delivered
# (the throttle's real limit, less a margin), not a blind 0.7 that would undershoot it.
DELIVERED_MARGIN = 0.95
RATE_INCREASE_FRACTION = 0.05  # of the reference rate, per clean step


class State(enum.Enum):
    HEALTHY = "healthy"
    THROTTLED = "throttled"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    at: float
    evidence: str


@dataclass(slots=True)
class Totals:
    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    errors: int = 0  # SERVFAIL, REFUSED, malformed, unreachable
    rtt_sum: float = 0.0


_ERRORS = frozenset({Outcome.SERVFAIL, Outcome.REFUSED, Outcome.MALFORMED, Outcome.MISMATCHED})


class Window:
    """Counters in BUCKET_SECONDS buckets covering the last WINDOW_SECONDS."""

    def __init__(self) -> None:
        self.buckets = [Totals() for _ in range(_BUCKETS)]
        self.current = 0  # absolute bucket number of the newest bucket

    def _bucket(self, now: float) -> Totals:
        number = int(now / BUCKET_SECONDS)
        if number != self.current:
            for n in range(max(self.current + 1, number - _BUCKETS + 1), number + 1):
                self.buckets[n % _BUCKETS] = Totals()
            self.current = max(self.current, number)
        return self.buckets[number % _BUCKETS]

    def sent(self, now: float) -> None:
        self._bucket(now).sent += 1

    def outcome(self, outcome: Outcome, rtt: float, now: float) -> None:
        bucket = self._bucket(now)
        if outcome is Outcome.TIMEOUT:
            bucket.timeouts += 1
        elif outcome in _ERRORS:
            bucket.errors += 1
        else:
            bucket.answered += 1
            bucket.rtt_sum += rtt

    def totals(self, now: float) -> Totals:
        self._bucket(now)
        total = Totals()
        for b in self.buckets:
            total.sent += b.sent
            total.answered += b.answered
            total.timeouts += b.timeouts
            total.errors += b.errors
            total.rtt_sum += b.rtt_sum
        return total


class Health:
    """One upstream's state machine; every method takes `now` and returns any transition."""

    def __init__(self, configured_rate: float | None, now: float,
                 hold_seconds: float = HOLD_SECONDS) -> None:
        self.hold_seconds = hold_seconds
        self.state = State.HEALTHY
        self.window = Window()
        self.configured_rate = configured_rate
        self.learned_rate: float | None = None
        self.reference_rate: float | None = configured_rate
        self.baseline_rtt: float | None = None
        self.last_evidence_at: float | None = None
        self.last_evidence = ""
        self.last_rate_step = now
        self.clean_run = 0
        self.failures_total = 0  # timeouts and errors ever seen (for the rate step)
        self.failures_at_step = 0
        self.changed_at = now
        self.last_transition: Transition | None = None

    # -- inputs -----------------------------------------------------------------------
    def on_sent(self, now: float) -> None:
        self.window.sent(now)

    def on_outcome(self, outcome: Outcome, rtt: float, now: float) -> Transition | None:
        self.window.outcome(outcome, rtt, now)
        if outcome is Outcome.TIMEOUT or outcome in _ERRORS:
            self.clean_run = 0
            self.failures_total += 1
            if self.state is State.DOWN:
                # A failed probe is fresh evidence: the hold before return starts again.
                self.last_evidence_at = now
        else:
            self.clean_run += 1
            if self.state is State.HEALTHY:
                if self.baseline_rtt is None:
                    self.baseline_rtt = rtt
                else:
                    alpha = BASELINE_ALPHA_DOWN if rtt < self.baseline_rtt else BASELINE_ALPHA_UP
                    self.baseline_rtt += alpha * (rtt - self.baseline_rtt)
                # An answer to a healthy upstream can only be evidence through RTT inflation,
                # which the pool's tick looks at: the common case stays cheap.
                return None
        return self.evaluate(now)

    def on_external(self, evidence: str, now: float) -> Transition | None:
        """Evidence from outside the exchanges (ENA counters): throttled, whatever the window."""
        return self._evidence(evidence, now, down=False)

    # -- the state machine -----------------------------------------------------------------
    def evaluate(self, now: float) -> Transition | None:
        totals = self.window.totals(now)
        evidence, down = self._judge(totals)
        if evidence:
            return self._evidence(evidence, now, down)
        self._rate_step_clean(now, totals)
        if self.state is State.DOWN and self.clean_run >= DOWN_RECOVERY_RUN:
            # An unbudgeted upstream that went straight to DOWN has no known rate: climb
            # towards UNBUDGETED_REFERENCE_PPS until the hold returns it to unlimited.
            reference = self.configured_rate or self.reference_rate or UNBUDGETED_REFERENCE_PPS
            self.reference_rate = reference
            self.learned_rate = max(MIN_RATE_PPS, RECOVERY_RATE_FRACTION * reference)
            self.last_rate_step = now
            return self._move(State.THROTTLED, now,
                              f"answers again ({self.clean_run} in a row after being down)")
        if (self.state is State.THROTTLED and self.clean_run >= CLEAN_RUN
                and self.last_evidence_at is not None
                and now - self.last_evidence_at >= self.hold_seconds):
            self.learned_rate = None
            return self._move(State.HEALTHY, now,
                              f"{self.hold_seconds:g} s without evidence, {self.clean_run} clean "
                              "answers in a row")
        return None

    def _judge(self, t: Totals) -> tuple[str, bool]:
        failures = t.timeouts + t.errors
        if t.answered == 0 and failures >= DOWN_MIN_FAILURES:
            return f"no answer to {failures} queries in {WINDOW_SECONDS:g} s", True
        outcomes = t.answered + failures
        if (t.timeouts >= LOSS_MIN_TIMEOUTS and t.answered >= 1
                and t.timeouts >= LOSS_RATIO * outcomes):
            return (f"silent loss: {t.timeouts} of {outcomes} queries timed out in "
                    f"{WINDOW_SECONDS:g} s while {t.answered} were answered"), False
        if t.errors >= ERROR_MIN and t.errors >= ERROR_RATIO * outcomes:
            return f"error burst: {t.errors} of {outcomes} REFUSED/SERVFAIL/bad", False
        if t.answered >= RTT_MIN_SAMPLES and self.baseline_rtt is not None:
            mean = t.rtt_sum / t.answered
            bound = max(RTT_INFLATION_FACTOR * self.baseline_rtt,
                        self.baseline_rtt + RTT_INFLATION_FLOOR_SECONDS)
            if mean > bound:
                return (f"RTT inflation: mean {mean * 1000:.1f} ms against a baseline of "
                        f"{self.baseline_rtt * 1000:.1f} ms"), False
        return "", False

    def _evidence(self, evidence: str, now: float, down: bool) -> Transition | None:
        if self.state is State.DOWN and not down:
            # Failures still in the window next to fresh probe answers are the outage's tail,
            # not new throttling: let the answers count towards recovery.
            return None
        self.last_evidence_at = now
        self.last_evidence = evidence
        self.clean_run = 0
        target = State.DOWN if down else State.THROTTLED
        if self.state is target:
            if target is State.THROTTLED:
                self._rate_step_down(now)
            return None
        if target is State.THROTTLED:
            self._rate_step_down(now, force=True)
        return self._move(target, now, evidence)

    def _move(self, new: State, now: float, evidence: str) -> Transition:
        transition = Transition(self.state, new, now, evidence)
        self.state = new
        self.changed_at = now
        self.last_transition = transition
        return transition

    # -- adaptive rate -------------------------------------------------------------------
    def delivered_rate(self, now: float) -> float:
        return self.window.totals(now).answered / WINDOW_SECONDS

    def sent_rate(self, now: float) -> float:
        return self.window.totals(now).sent / WINDOW_SECONDS

    def _rate_step_down(self, now: float, force: bool = False) -> None:
        if not force and now - self.last_rate_step < RATE_STEP_SECONDS:
            return
        if not force and self.failures_total == self.failures_at_step:
            # The evidence is losses already acted on, still inside the window: cutting again
            # for them would ratchet the rate far below what the upstream delivers.
            return
        self.last_rate_step = now
        self.failures_at_step = self.failures_total
        current = self.learned_rate
        if current is None:
            current = self.configured_rate or max(self.sent_rate(now), MIN_RATE_PPS)
            self.reference_rate = self.configured_rate or current
        target = current * RATE_DECREASE
        totals = self.window.totals(now)
        if totals.answered >= RTT_MIN_SAMPLES and totals.sent:
            # Enough answers to know what gets through: go to just under that. With fewer,
            # "delivered" is mostly noise, and the multiplicative step alone applies.
            delivered = totals.answered / WINDOW_SECONDS
            if delivered < current:
                target = DELIVERED_MARGIN * delivered
        self.learned_rate = max(MIN_RATE_PPS, min(target, current))

    def _rate_step_clean(self, now: float, totals: Totals) -> None:
        if self.learned_rate is None or now - self.last_rate_step < RATE_STEP_SECONDS:
            return
        self.last_rate_step = now
        if totals.timeouts or totals.errors or not totals.answered:
            return
        reference = self.reference_rate or self.learned_rate
        self.learned_rate = min(self.learned_rate + max(1.0, RATE_INCREASE_FRACTION * reference),
                                self.configured_rate or reference)
