"""The upstream pool: budgets, health, the repoint state machine, and the tries of one miss.

Routing (DESIGN.md 4): a client miss goes to the first primary that is not DOWN and has a
token, then to the other primaries, then to the fallbacks; with no token anywhere it waits in
a short bounded queue for the next one. Primaries that are THROTTLED keep a reduced, learned
rate, so the overflow spills to the fallbacks by budget alone.

The pool is in PRIMARY or REPOINTED mode. It repoints when a primary is THROTTLED or DOWN, or
when the primaries' budgets cannot carry the offered load (client misses found no primary
token); it returns once none of that has been true for the hold time. Every transition is
logged once with its evidence. An operator override (primary / fallback / auto) pins routing.

Invariants:
  1. No packet is sent without a token from that upstream's bucket (see budget.py).
  2. A resolution makes at most max(max_tries, number of upstreams) tries and starts none after
     its deadline; each try's timeout ends no later than the deadline.
  3. Only an answer (OK, NXDOMAIN, NODATA) ends a resolution early.
  4. With override FALLBACK no client query goes to a primary, and with PRIMARY none to a
     fallback.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from dataclasses import dataclass, field

from resolver.core.budget import Priority, TokenBucket
from resolver.core.health import Health, State, Transition
from resolver.core.model import Endpoint, Outcome

# Hedging: a try to a THROTTLED upstream that has not answered after this many smoothed RTTs
# (and at least HEDGE_MIN_SECONDS) lets the next upstream be asked too; the first try keeps
# waiting, so a late answer still counts as an answer, not a loss.
HEDGE_RTT_FACTOR = 4.0
HEDGE_MIN_SECONDS = 0.02
# Probes to a DOWN upstream: exponential back-off between these bounds.
PROBE_FIRST_SECONDS = 0.5
# Capped low: a recovered primary must be noticed well within hold time + 5 s.
PROBE_MAX_SECONDS = 4.0
# Overflow: at least OVERFLOW_MIN_DENIALS client misses found no primary token within one
# OVERFLOW_WINDOW_SECONDS. A few denials in a burst are what the burst allowance is for; a
# steady stream of them means the primaries' budgets cannot carry the load.
OVERFLOW_WINDOW_SECONDS = 1.0
OVERFLOW_MIN_DENIALS = 10
# Recent transitions kept for `resolver upstreams` and logs.
EVENT_HISTORY = 50
# The learned rate is logged when it moved by at least this share since it was last logged.
RATE_LOG_CHANGE = 0.1


class Mode(enum.Enum):
    PRIMARY = "primary"
    REPOINTED = "repointed"


class Override(enum.Enum):
    AUTO = "auto"
    PRIMARY = "primary"
    FALLBACK = "fallback"


class Role(enum.Enum):
    PRIMARY = "primary"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One upstream as configured: address, role and packet budget."""

    endpoint: Endpoint
    role: Role = Role.PRIMARY
    pps: float | None = None
    burst: float | None = None


@dataclass(frozen=True, slots=True)
class Timing:
    """Per-try timeout, overall deadline, try count and token queue, from the configuration."""

    try_timeout: float = 1.0
    deadline: float = 4.0
    max_tries: int = 4
    queue_wait: float = 0.05
    queue_max: int = 1000


@dataclass(slots=True)
class UpstreamStats:
    """Plain counters per upstream, exported by metrics and shown by the CLI."""

    sent: int = 0
    outcomes: dict[Outcome, int] = field(default_factory=dict)
    rtt_total: float = 0.0
    answered: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """Something worth one log line: a state change or a mode change, with its evidence."""

    at: float
    subject: str
    old: str
    new: str
    evidence: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.old} -> {self.new} ({self.evidence})"


class Upstream:
    def __init__(self, spec: UpstreamSpec, now: float, reserve_fraction: float,
                 hold_seconds: float) -> None:
        self.spec = spec
        self.endpoint = spec.endpoint
        self.role = spec.role
        self.bucket = TokenBucket(spec.pps, spec.burst, now, reserve_fraction)
        self.health = Health(spec.pps, now, hold_seconds)
        self.stats = UpstreamStats()
        self.srtt: float | None = None
        self.next_probe_at = now
        self.probe_interval = PROBE_FIRST_SECONDS
        self.link_local = _link_local(spec.endpoint.host)
        self.pool: Pool | None = None  # the pool it belongs to (set by Pool)
        self.logged_rate: float | None = spec.pps

    @property
    def state(self) -> State:
        return self.health.state

    def hedge_after(self, try_timeout: float) -> float:
        """How long a try waits before the next upstream may be asked alongside it."""
        if self.state is State.HEALTHY or self.srtt is None:
            return try_timeout
        return min(try_timeout, max(HEDGE_MIN_SECONDS, HEDGE_RTT_FACTOR * self.srtt))


def _link_local(host: str) -> bool:
    """The VPC resolver lives at 169.254.169.253 (and fd00:ec2::253): link-local traffic is
    what ENA's linklocal_allowance_exceeded counts."""
    address = ipaddress.ip_address(host)
    return address.is_link_local or host.lower() == "fd00:ec2::253"


class Pool:
    def __init__(self, specs: list[UpstreamSpec], now: float = 0.0,
                 reserve_fraction: float = 0.2, hold_seconds: float = 30.0) -> None:
        if not specs:
            raise ValueError("a pool needs at least one upstream")
        self.upstreams = [Upstream(s, now, reserve_fraction, hold_seconds) for s in specs]
        for upstream in self.upstreams:
            upstream.pool = self
        self.zone: str | None = None  # set for a per-zone pool (config [[zone]])
        self.by_endpoint = {u.endpoint: u for u in self.upstreams}
        self.primaries = [u for u in self.upstreams if u.role is Role.PRIMARY]
        self.fallbacks = [u for u in self.upstreams if u.role is Role.FALLBACK]
        self.hold_seconds = hold_seconds
        self.mode = Mode.PRIMARY
        self.override = Override.AUTO
        self.mode_changed_at = now
        self.last_overflow_at: float | None = None
        self._denials = 0
        self._denials_since = now
        self.events: deque[Event] = deque(maxlen=EVENT_HISTORY)
        self.pending_events: list[Event] = []
        self.transitions = 0
        self.waiting_for_tokens = 0
        # The question last answered by any upstream: what probes ask a DOWN upstream.
        self.last_good_question: tuple[bytes, bool, bool] | None = None

    @property
    def stats(self) -> dict[Endpoint, UpstreamStats]:
        return {u.endpoint: u.stats for u in self.upstreams}

    # -- routing ----------------------------------------------------------------------------
    def candidates(self) -> list[Upstream]:
        """Upstreams a client miss may use, in order of preference."""
        if self.override is Override.FALLBACK:
            groups = [self.fallbacks]
        elif self.override is Override.PRIMARY:
            groups = [self.primaries]
        else:
            groups = [self.primaries, self.fallbacks]
        return [u for group in groups for u in group if u.state is not State.DOWN]

    def acquire(self, now: float, priority: Priority, exclude: set[Endpoint]) -> Upstream | None:
        """The first candidate not excluded with a token to spend; the token is spent."""
        primary_denied = False
        for upstream in self.candidates():
            if upstream.endpoint in exclude:
                continue
            if upstream.bucket.try_spend(1, now, priority):
                if primary_denied and upstream.role is Role.FALLBACK:
                    self._overflow(now)
                return upstream
            if upstream.role is Role.PRIMARY and priority is Priority.CLIENT:
                primary_denied = True
        if primary_denied:
            self._overflow(now)
        return None

    def next_grant_at(self, now: float, priority: Priority, exclude: set[Endpoint]) -> float:
        times = [u.bucket.next_grant_at(1, now, priority) for u in self.candidates()
                 if u.endpoint not in exclude]
        return min(times) if times else float("inf")

    # -- what happened ------------------------------------------------------------------------
    def on_sent(self, upstream: Upstream, now: float) -> None:
        upstream.stats.sent += 1
        upstream.health.on_sent(now)

    def charge(self, upstream: Upstream, packets: int, now: float) -> None:
        """Packets beyond the first (TCP), sent already: they count against the budget too."""
        upstream.bucket.charge(packets, now)
        upstream.stats.sent += packets

    def report(self, upstream: Upstream, outcome: Outcome, rtt: float, now: float,
               question: tuple[bytes, bool, bool] | None = None) -> None:
        stats = upstream.stats
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        if outcome is not Outcome.TIMEOUT:
            stats.answered += 1
            stats.rtt_total += rtt
        if outcome.is_answer:
            upstream.srtt = rtt if upstream.srtt is None else 0.875 * upstream.srtt + 0.125 * rtt
            if question is not None:
                self.last_good_question = question
            upstream.probe_interval = PROBE_FIRST_SECONDS
        self._after(upstream, upstream.health.on_outcome(outcome, rtt, now), now)

    def note_external(self, upstream: Upstream, evidence: str, now: float) -> None:
        self._after(upstream, upstream.health.on_external(evidence, now), now)

    def tick(self, now: float) -> list[Upstream]:
        """Time-driven changes; returns the DOWN upstreams due a probe (tokens not spent)."""
        due = []
        for upstream in self.upstreams:
            self._after(upstream, upstream.health.evaluate(now), now)
            if upstream.state is State.DOWN and now >= upstream.next_probe_at:
                upstream.next_probe_at = now + upstream.probe_interval
                upstream.probe_interval = min(PROBE_MAX_SECONDS, upstream.probe_interval * 2)
                due.append(upstream)
        self._update_mode(now)
        return due

    def _after(self, upstream: Upstream, transition: Transition | None, now: float) -> None:
        if transition is not None:
            if transition.new is State.DOWN:
                upstream.next_probe_at = now + PROBE_FIRST_SECONDS
                upstream.probe_interval = PROBE_FIRST_SECONDS
            self._event(now, str(upstream.endpoint), transition.old.value,
                        transition.new.value, transition.evidence)
            self._update_mode(now)
        # The learned rate moves on evidence and on clean steps, not only on transitions.
        learned = upstream.health.learned_rate
        if learned != upstream.bucket.rate and not (learned is None and
                                                    upstream.bucket.rate == upstream.spec.pps):
            upstream.bucket.set_rate(learned if learned is not None else upstream.spec.pps, now)
            self._note_rate(upstream, now)

    def _note_rate(self, upstream: Upstream, now: float) -> None:
        """Log the learned rate when it has moved by RATE_LOG_CHANGE since last logged."""
        rate = upstream.bucket.rate
        logged = upstream.logged_rate
        if rate is None or logged is None or abs(rate - logged) >= RATE_LOG_CHANGE * logged:
            upstream.logged_rate = rate
            budget = f"{upstream.spec.pps:g}" if upstream.spec.pps else "none"
            self._event(now, str(upstream.endpoint), "rate",
                        "unlimited" if rate is None else f"{rate:.0f} packets/s",
                        f"learned rate; budget {budget}", transition=False)

    def _overflow(self, now: float) -> None:
        if now - self._denials_since >= OVERFLOW_WINDOW_SECONDS:
            self._denials_since, self._denials = now, 0
        self._denials += 1
        if self._denials >= OVERFLOW_MIN_DENIALS:
            self.last_overflow_at = now
            self._update_mode(now)

    # -- the repoint state machine ------------------------------------------------------------
    def _repoint_reason(self, now: float) -> str:
        if not self.fallbacks:
            return ""
        for upstream in self.primaries:
            if upstream.state is not State.HEALTHY:
                return (f"primary {upstream.endpoint} is {upstream.state.value}: "
                        f"{upstream.health.last_evidence}")
        if (self.last_overflow_at is not None
                and now - self.last_overflow_at < OVERFLOW_WINDOW_SECONDS):
            return "the primaries' budgets cannot carry the offered load"
        return ""

    def _update_mode(self, now: float) -> None:
        # The hold for a throttled primary is counted by its health (HEALTHY again only after
        # hold_seconds without evidence); the hold for overflow is counted here.
        reason = self._repoint_reason(now)
        if self.mode is Mode.PRIMARY and reason:
            self._set_mode(Mode.REPOINTED, now, reason)
        elif (self.mode is Mode.REPOINTED and not reason
              and (self.last_overflow_at is None
                   or now - self.last_overflow_at >= self.hold_seconds)):
            self._set_mode(Mode.PRIMARY, now,
                           f"primaries healthy and within budget for {self.hold_seconds:g} s")

    def _set_mode(self, mode: Mode, now: float, evidence: str) -> None:
        self._event(now, "pool", self.mode.value, mode.value, evidence)
        self.mode = mode
        self.mode_changed_at = now

    def set_override(self, override: Override, now: float) -> None:
        if override is not self.override:
            self._event(now, "override", self.override.value, override.value, "operator")
            self.override = override

    def _event(self, now: float, subject: str, old: str, new: str, evidence: str,
               transition: bool = True) -> None:
        event = Event(now, subject, old, new, evidence)
        self.events.append(event)
        self.pending_events.append(event)
        if transition:
            self.transitions += 1

    def drain_events(self) -> list[Event]:
        """Events not yet logged: the daemon logs each exactly once."""
        events, self.pending_events = self.pending_events, []
        return events


# -- one miss's tries ---------------------------------------------------------------------------
@dataclass(slots=True)  # not frozen: made per query, and frozen init is slow
class Try:
    upstream: Upstream
    timeout: float
    number: int  # 1 for the first try
    started: float


@dataclass(slots=True)  # not frozen: made per query, and frozen init is slow
class Wait:
    """Nothing to start now: wait for an outcome, or until `until`, then ask again."""

    until: float


@dataclass(slots=True)  # not frozen: made per query, and frozen init is slow
class Done:
    answered: bool


class Resolution:
    """The tries for one miss, in the style of dnspython's _Resolution. The daemon loops:

        while not isinstance(step := resolution.next_step(now), Done):
            if Try: start the exchange as a task (its outcome comes back via record)
            if Wait: wait for an outcome or until step.until
    """

    def __init__(self, pool: Pool, timing: Timing, now: float,
                 priority: Priority = Priority.CLIENT) -> None:
        self.pool = pool
        self.timing = timing
        self.priority = priority
        self.started = now
        self.deadline = now + timing.deadline
        self.queue_until = now  # set when a wait for tokens begins (clients only)
        self.max_tries = max(timing.max_tries, len(pool.upstreams))
        self.tries = 0
        self.running: dict[Endpoint, Try] = {}
        self.failed: set[Endpoint] = set()
        self.answered = False
        self.last_outcome: Outcome | None = None
        self.queued = False
        self.denied = False  # ended for want of tokens, not for want of answers

    def next_step(self, now: float) -> Try | Wait | Done:
        if self.answered:
            return self._done(True)
        if now >= self.deadline:
            return self._done(False)
        newest = max(self.running.values(), key=lambda t: t.started, default=None)
        hedge_at = (newest.started + newest.upstream.hedge_after(self.timing.try_timeout)
                    if newest is not None else now)
        if now >= hedge_at and self.tries < self.max_tries:
            exclude = self.failed | set(self.running)
            upstream = self.pool.acquire(now, self.priority, exclude)
            if upstream is not None:
                self._leave_queue()
                self.tries += 1
                attempt = Try(upstream, min(self.timing.try_timeout, self.deadline - now),
                              self.tries, now)
                self.running[upstream.endpoint] = attempt
                return attempt
            if not self.running:
                return self._no_token(now, exclude)
        if not self.running:
            return self._done(False)
        # Running tries always report (each exchange enforces its own timeout), so the only
        # times to wake up for are the next hedge and the deadline.
        if now < hedge_at and self.tries < self.max_tries:
            return Wait(min(hedge_at, self.deadline))
        return Wait(self.deadline)

    def _no_token(self, now: float, exclude: set[Endpoint]) -> Wait | Done:
        """No try running and no token: queue briefly (first tries of clients), else give up.

        Retries queue the same way, from the moment they need a token: a retry is made only
        when the budget grants it within that short wait, never beyond (a retry storm is how
        throttling turns into an outage).
        """
        if not self.queued and self.priority is Priority.CLIENT:
            self.queue_until = min(now + self.timing.queue_wait, self.deadline)
        if now < self.queue_until:
            if not self.queued:
                if self.pool.waiting_for_tokens >= self.timing.queue_max:
                    self.denied = True
                    return self._done(False)
                self.queued = True
                self.pool.waiting_for_tokens += 1
            grant = self.pool.next_grant_at(now, self.priority, exclude)
            return Wait(min(grant, self.queue_until, self.deadline))
        self.denied = True
        return self._done(False)

    def record(self, attempt: Try, outcome: Outcome, now: float) -> None:
        """How a try ended (its health report goes to the pool separately)."""
        self.running.pop(attempt.upstream.endpoint, None)
        self.last_outcome = outcome
        if outcome.is_answer:
            self.answered = True
        else:
            self.failed.add(attempt.upstream.endpoint)
            if len(self.failed) >= len(self.pool.candidates()):
                # Everyone has failed once: a second round may start (bounded by max_tries).
                self.failed = set()

    def _leave_queue(self) -> None:
        if self.queued:
            self.queued = False
            self.pool.waiting_for_tokens -= 1

    def _done(self, answered: bool) -> Done:
        self._leave_queue()
        return Done(answered)
