"""Packet budgets: a token bucket per upstream, with a reserve for background work.

Every packet we send an upstream spends a token: first tries, retries, prefetches, probes, and
TCP exchanges at their real packet cost (see `tcp_packets`). The AWS VPC resolver drops,
silently, whatever exceeds 1024 packets/s per network interface; a bucket that never overdraws
is how we stay under such a limit instead of discovering it.

Invariants (property-tested in tests/test_budget.py):
  1. Over any interval of length t, the tokens granted are at most burst + rate_max × t, where
     rate_max is the largest rate in force during the interval; in any one-second window an
     upstream receives at most pps + burst packets from us.
  2. Background spending (prefetch, probes) never takes the bucket below the reserve
     (reserve_fraction × burst), so client misses always find the reserve.
  3. `charge` (packets already sent whose number could not be known before, the extra ACKs
     of a TCP reply longer than TCP_RESERVE_BYTES) may put the bucket in debt; debt delays
     later grants, so the overshoot is bounded by that charge and repaid at once.
"""

from __future__ import annotations

import enum
import math

# The rate never goes below this while adapting: an upstream that answers nothing is DOWN and
# gets probes, not a trickle of client traffic.
MIN_RATE_PPS = 1.0


class Priority(enum.IntEnum):
    CLIENT = 0  # a client is waiting: may spend the whole bucket
    BACKGROUND = 1  # prefetch and probes: only what is above the reserve


def default_burst(pps: float) -> float:
    """A tenth of a second's worth, at least one packet: small enough that pps + burst stays
    under a hard limit when pps is set a little below it (900 + 90 < 1024)."""
    return max(1.0, math.floor(pps / 10))


# A TCP exchange reserves the packets of a reply this long before it starts (DKIM and SPF
# answers that overflow UDP mostly fit), so only longer replies are charged after the fact.
TCP_RESERVE_BYTES = 4096


def tcp_packets(reply_bytes: int, mss: int = 1460) -> int:
    """Packets we send for one DNS-over-TCP exchange, counted rather than guessed.

    SYN, the ACK completing the handshake, the query segment (queries fit one segment), one
    ACK per two reply segments (delayed ACK, RFC 1122 4.2.3.2) and at least one, FIN and the
    ACK of the server's FIN.
    """
    segments = max(1, math.ceil((reply_bytes + 2) / mss))
    return 3 + max(1, math.ceil(segments / 2)) + 2


class TokenBucket:
    """Tokens refill at `rate` per second up to `burst`; `rate` None means no budget."""

    def __init__(self, rate: float | None, burst: float | None, now: float,
                 reserve_fraction: float = 0.2) -> None:
        self.configured_rate = rate
        self.rate = rate
        self.burst = burst if burst is not None else (default_burst(rate) if rate else 0.0)
        self.reserve_fraction = reserve_fraction
        self.reserve = reserve_fraction * self.burst
        self.tokens = self.burst
        self.updated = now
        self.granted = 0
        self.denied = 0

    @property
    def limited(self) -> bool:
        return self.rate is not None

    def _refill(self, now: float) -> None:
        if now > self.updated:
            if self.rate is not None:
                self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self.tokens if self.rate is not None else math.inf

    def try_spend(self, packets: int, now: float, priority: Priority = Priority.CLIENT) -> bool:
        """Take `packets` tokens if the bucket (above the reserve, for background) has them."""
        if self.rate is None:
            self.granted += packets
            return True
        self._refill(now)
        floor = self.reserve if priority is Priority.BACKGROUND else 0.0
        if self.tokens - packets >= floor - 1e-9:
            self.tokens -= packets
            self.granted += packets
            return True
        self.denied += 1
        return False

    def charge(self, packets: int, now: float) -> None:
        """Account for packets already sent (may leave the bucket in debt)."""
        self.granted += packets
        if self.rate is not None:
            self._refill(now)
            self.tokens -= packets

    def next_grant_at(self, packets: int, now: float,
                      priority: Priority = Priority.CLIENT) -> float:
        """The earliest time `packets` tokens will be there (now if they already are)."""
        if self.rate is None:
            return now
        self._refill(now)
        floor = self.reserve if priority is Priority.BACKGROUND else 0.0
        missing = packets + floor - self.tokens
        return now if missing <= 0 else now + missing / self.rate

    def set_rate(self, rate: float | None, now: float) -> None:
        """Change the refill rate from now on (adaptive rate); tokens so far are kept."""
        self._refill(now)
        if rate is not None and self.configured_rate is not None:
            rate = min(rate, self.configured_rate)
        if rate is not None and not self.burst:
            # An unbudgeted upstream being throttled needs a bucket of its own now.
            self.burst = default_burst(rate)
            self.reserve = self.reserve_fraction * self.burst
            self.tokens = min(self.tokens, self.burst) if self.rate is not None else self.burst
        self.rate = rate
