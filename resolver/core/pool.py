"""Which upstream to ask, and when to give up: the forwarding policy, without I/O.

The core policy (issue "Core"): primaries in their configured order, then fallbacks, only after
every primary failed; a bounded number of tries inside an overall deadline. The upstream-
protection work replaces `Pool.order` with budgets, health and repointing.

Invariants:
  1. A resolution never makes more than max(max_tries, number of upstreams) tries, so every
     fallback gets its chance however many primaries there are, and never starts one after
     its deadline; each try's timeout ends no later than the deadline.
  2. Only an answer (OK, NXDOMAIN, NODATA) ends a resolution early; every other outcome moves
     on to the next upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from resolver.core.model import Endpoint, Outcome


@dataclass(frozen=True, slots=True)
class Timing:
    """Per-try timeout, overall deadline and try count, from the configuration (seconds)."""

    try_timeout: float = 1.0
    deadline: float = 4.0
    max_tries: int = 4


@dataclass(frozen=True, slots=True)
class Try:
    upstream: Endpoint
    timeout: float
    number: int  # 1 for the first try


@dataclass(slots=True)
class UpstreamStats:
    """Plain counters per upstream, read by metrics and the CLI later."""

    sent: int = 0
    outcomes: dict[Outcome, int] = field(default_factory=dict)
    rtt_total: float = 0.0
    answered: int = 0


class Pool:
    def __init__(self, primaries: tuple[Endpoint, ...], fallbacks: tuple[Endpoint, ...]) -> None:
        if not primaries and not fallbacks:
            raise ValueError("a pool needs at least one upstream")
        self.primaries = primaries
        self.fallbacks = fallbacks
        self.stats = {u: UpstreamStats() for u in primaries + fallbacks}

    def order(self, now: float) -> tuple[Endpoint, ...]:
        """The upstreams in the order a miss should try them."""
        return self.primaries + self.fallbacks

    def report(self, upstream: Endpoint, outcome: Outcome, rtt: float, now: float) -> None:
        stats = self.stats[upstream]
        stats.sent += 1
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        if outcome is not Outcome.TIMEOUT:
            stats.answered += 1
            stats.rtt_total += rtt


class Resolution:
    """The tries for one miss, in the style of dnspython's _Resolution: the caller loops

        while (attempt := resolution.next_try(now)) is not None:
            outcome = <exchange with attempt.upstream within attempt.timeout>
            if resolution.record(attempt, outcome, now): break
    """

    def __init__(self, order: tuple[Endpoint, ...], timing: Timing, now: float) -> None:
        self.order = order
        self.timing = timing
        self.deadline = now + timing.deadline
        self.tries = 0
        self.max_tries = max(timing.max_tries, len(order))
        self.last_outcome: Outcome | None = None

    def next_try(self, now: float) -> Try | None:
        remaining = self.deadline - now
        if self.tries >= self.max_tries or remaining <= 0 or not self.order:
            return None
        upstream = self.order[self.tries % len(self.order)]
        self.tries += 1
        return Try(upstream, min(self.timing.try_timeout, remaining), self.tries)

    def record(self, attempt: Try, outcome: Outcome, now: float) -> bool:
        """Note how a try ended; True when the resolution is over with an answer."""
        self.last_outcome = outcome
        return outcome.is_answer
