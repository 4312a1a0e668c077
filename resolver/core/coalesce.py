"""The in-flight table: identical concurrent misses share one upstream query.

Invariants:
  1. At most one Fetch per key is outstanding: the first asker is the leader, later askers
     are appended as waiters.
  2. Every waiter that joined is handed back exactly once, by `finish(key)`.
  3. The table is bounded: a join beyond the caps is refused (the caller answers SERVFAIL at
     once rather than dropping the query silently).
"""

from __future__ import annotations

from resolver.core.model import Waiter

# A key this popular while its answer is still in flight is either a flood or a stuck fetch;
# either way, queueing more only grows memory.
MAX_WAITERS_PER_KEY = 1000
MAX_KEYS_IN_FLIGHT = 10000


class InFlight:
    def __init__(self, max_keys: int = MAX_KEYS_IN_FLIGHT,
                 max_waiters: int = MAX_WAITERS_PER_KEY) -> None:
        self._waiting: dict[bytes, list[Waiter]] = {}
        self.max_keys = max_keys
        self.max_waiters = max_waiters
        self.coalesced = 0  # waiters that joined an existing fetch (a plain counter for metrics)

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, key: bytes) -> bool:
        return key in self._waiting

    def join(self, key: bytes, waiter: Waiter) -> bool | None:
        """True: the caller leads and must fetch. False: joined a fetch. None: over capacity."""
        waiters = self._waiting.get(key)
        if waiters is None:
            if len(self._waiting) >= self.max_keys:
                return None
            self._waiting[key] = [waiter]
            return True
        if len(waiters) >= self.max_waiters:
            return None
        waiters.append(waiter)
        self.coalesced += 1
        return False

    def lead(self, key: bytes) -> bool:
        """Start a fetch nobody waits for yet (a prefetch); False if one is already running."""
        if key in self._waiting or len(self._waiting) >= self.max_keys:
            return False
        self._waiting[key] = []
        return True

    def take(self, key: bytes) -> list[Waiter]:
        """Hand back the current waiters but keep the fetch in flight (stale answers given)."""
        waiters = self._waiting.get(key)
        if not waiters:
            return []
        self._waiting[key] = []
        return waiters

    def finish(self, key: bytes) -> list[Waiter]:
        """Everyone waiting for key; the key is free for a new fetch afterwards."""
        return self._waiting.pop(key, [])
