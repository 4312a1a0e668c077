"""The conductor: cache hits from raw bytes, misses into fetches, answers out to waiters.

The daemon drives it (DESIGN.md 3):
    reply = engine.answer(data, now)               # hit path: bytes or None
    actions = engine.on_query(data, client, now)   # slow path: Reply and Fetch actions
    resolution = engine.resolution(now)            # for each Fetch: which upstreams to try
    replies = engine.on_answer(key, scan, now) / engine.on_failure(key, now)

Invariants:
  1. The client is never told NXDOMAIN unless an upstream said so: every failure is SERVFAIL.
  2. Every query that reaches on_query gets exactly one reply or is deliberately dropped (QR=1,
     runts); every waiter of a fetch is answered exactly once, by on_answer or on_failure.
  3. Replies carry the client's ID and question bytes (its letter case), and OPT exactly when
     the query had a well-formed one (a FORMERR for an unparseable query is header-only).
  4. Serve-stale (RFC 8767): when upstreams fail, run out of budget, or have not answered
     within stale_answer_timeout, a client whose answer expired less than stale_max ago gets
     it with TTL stale_ttl; a failure is never turned into NXDOMAIN, but a stale NXDOMAIN may
     be served.
  5. Prefetch: an entry hit at least prefetch_min_hits times is refreshed once, in the
     background, when less than prefetch_fraction of its TTL is left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resolver.core import wire
from resolver.core.budget import Priority
from resolver.core.cache import Cache, Entry
from resolver.core.coalesce import InFlight
from resolver.core.model import Fetch, Reply, Waiter
from resolver.core.pool import Pool, Resolution, Timing
from resolver.errors import MalformedQuery

# A query the hit path can serve has exactly one question and nothing in answer or authority.
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"
_NO_ADDITIONAL = b"\x00\x00"
_ONE_ADDITIONAL = b"\x00\x01"
_OPT_TYPE = b"\x00\x29"
_FLAG_BYTES = [bytes((i,)) for i in range(4)]
# Distinct query shapes remembered by the hit path; a mail host asks a few thousand hot names,
# and clearing the memo when full costs one re-parse per shape.
MAX_SHAPES = 16384
# Longer queries (large EDNS options) are served but not memoised, which bounds the memo's
# memory at about MAX_SHAPES x 512 bytes.
MAX_SHAPE_QUERY_BYTES = 512


class Engine:
    def __init__(self, cache: Cache, pool: Pool, timing: Timing,
                 inflight: InFlight | None = None, prefetch_min_hits: int = 3,
                 on_prefetch: Callable[[Fetch], None] | None = None) -> None:
        self.cache = cache
        self.pool = pool
        self.timing = timing
        self.inflight = inflight if inflight is not None else InFlight()
        self.prefetch_min_hits = prefetch_min_hits
        # Called (rarely, from the hit path) when an entry is due a refresh; the daemon sets it.
        self.on_prefetch = on_prefetch
        self._shapes: dict[bytes, tuple[bytes, bytes, bytes, int, int] | None] = {}
        # Forwarded zones: (lower-case wire name, pool), asked before the main pool.
        self.zones: list[tuple[bytes, Pool]] = []
        # Keys whose waiters already had a stale answer while the fetch goes on: later askers
        # get the stale answer at once instead of waiting for it again.
        self._stale_served: set[bytes] = set()
        # Plain integers: metrics export them through a collector, off the hot path.
        self.hits = 0
        self.misses = 0
        self.failures = 0
        self.stale_answers = 0
        self.prefetches = 0

    def answer(self, data: bytes, now: float, tcp: bool = False) -> bytes | None:
        """Serve a cache hit straight from the raw query bytes, or None for the slow path.

        No parse and no objects per hit (DESIGN.md 3.2). Two memos keep most hits to a few
        dict lookups and one concatenation: the query's shape (everything but the ID maps to
        key, question, OPT and size limit), and per entry the reply tail last rendered for a
        shape at the current age. Anything unusual returns None; on_query decides properly.
        """
        shape = self._shapes.get(data[2:])
        if shape is None:
            shape = self._learn_shape(data)
            if shape is None:
                return None
        entries = self.cache.entries
        entry = entries.get(shape[0])
        if entry is None or now >= entry.expires_at:
            return None
        entry.hits += 1
        self.hits += 1
        age = int(now - entry.stored_at)
        if entry.tail_age == age and entry.tail_shape is shape and not tcp:
            # The same second and shape as an earlier hit, which already refreshed the LRU
            # position and looked at prefetch: recency is kept to the second, and this hit is
            # one concatenation.
            return data[:2] + entry.tail
        key, question, opt, limit, rd = shape
        entries.move_to_end(key)
        if now >= entry.prefetch_at:
            self._prefetch(entry)
        if tcp:
            return entry.reply(data[:2], rd, question, opt, wire.MAX_TCP_MESSAGE, now)
        reply = entry.reply(data[:2], rd, question, opt, limit, now)
        entry.tail, entry.tail_shape, entry.tail_age = reply[2:], shape, age
        return reply

    def _prefetch(self, entry: Entry) -> None:
        """Refresh a popular entry before it expires, once, coalesced with any miss for it."""
        if entry.hits < self.prefetch_min_hits or self.on_prefetch is None:
            return
        entry.prefetch_at = float("inf")
        key = entry.key
        if not self.inflight.lead(key):
            return
        self.prefetches += 1
        self.on_prefetch(Fetch(key, key[:-1], bool(key[-1] & wire.KEY_DO),
                               bool(key[-1] & wire.KEY_CD), background=True))

    def _learn_shape(self, data: bytes) -> tuple[bytes, bytes, bytes, int, int] | None:
        """Read a query's key, question, reply OPT and UDP limit from its bytes, once."""
        shape = _shape(data)
        if shape is not None and len(data) <= MAX_SHAPE_QUERY_BYTES:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()  # bounded; the hot shapes come straight back
            self._shapes[data[2:]] = shape
        return shape

    def on_query(self, data: bytes, client: Any, now: float,
                 tcp: bool = False) -> list[Reply | Fetch]:
        """The slow path: parse strictly, answer errors, coalesce misses into fetches."""
        try:
            info = wire.parse_query(data)
        except MalformedQuery as e:
            if e.rcode is None:
                return []
            if e.rcode == wire.RCODE_BADVERS:
                return [Reply(client, wire.badvers_reply(data))]
            return [Reply(client, wire.error_reply(data, e.rcode))]
        if info.qclass != wire.CLASS_IN or info.qtype in (wire.TYPE_AXFR, wire.TYPE_IXFR):
            # A forwarding cache for mail: no CHAOS, no zone transfers.
            return [Reply(client, wire.error_reply(data, wire.RCODE_REFUSED, info))]
        key = info.key
        limit = wire.MAX_TCP_MESSAGE if tcp else info.udp_limit
        waiter = Waiter(client, info.qid, info.rd, info.question, info.edns, info.payload,
                        info.do, info.cd, limit)
        entry = self.cache.get_fresh(key, now)
        if entry is not None:  # a hit the fast path declined (a TSIG record, a long query)
            self.hits += 1
            return [Reply(client, entry.reply_to(waiter, now))]
        self.misses += 1
        if self.cache.failed_recently(key, now) or key in self._stale_served:
            return [Reply(client, self._stale_or_servfail(key, waiter, now))]
        joined = self.inflight.join(key, waiter)
        if joined is None:
            return [Reply(client, self._stale_or_servfail(key, waiter, now))]
        if not joined:
            return []
        upstream_question = info.name_lower + info.question[-4:]
        return [Fetch(key, upstream_question, info.do, info.cd)]

    @property
    def pools(self) -> list[Pool]:
        """The main pool, then one pool per forwarded zone."""
        return [self.pool, *(pool for _, pool in self.zones)]

    def add_zone(self, name_wire: bytes, pool: Pool) -> None:
        """Send names at or under name_wire (lower-case wire form) to their own pool."""
        self.zones.append((name_wire, pool))

    def pool_for(self, name_wire: bytes) -> Pool:
        """The most specific forwarded zone holding this lower-case wire name, or the main
        pool. Walking the labels from the left finds the longest matching zone first."""
        if self.zones:
            i = 0
            while i < len(name_wire):
                for suffix, pool in self.zones:
                    if name_wire[i:] == suffix:
                        return pool
                i += name_wire[i] + 1
        return self.pool

    def resolution(self, now: float, background: bool = False,
                   question: bytes = b"") -> Resolution:
        priority = Priority.BACKGROUND if background else Priority.CLIENT
        pool = self.pool_for(question[:-4]) if question else self.pool
        return Resolution(pool, self.timing, now, priority)

    def on_answer(self, key: bytes, scan: wire.ReplyScan, now: float) -> list[Reply]:
        """An upstream answered: cache what policy allows, answer every waiter from it."""
        self._stale_served.discard(key)
        entry = self.cache.store(key, scan, now)
        return [Reply(w.client, entry.reply_to(w, now)) for w in self.inflight.finish(key)]

    def on_failure(self, key: bytes, now: float, background: bool = False,
                   remember: bool = True) -> list[Reply]:
        """No upstream answered: stale data if we have it, else SERVFAIL, never NXDOMAIN.

        The failure is remembered for failure_ttl (RFC 9520 3.2), so retries in that time are
        answered here, stale or SERVFAIL, without another upstream packet. A prefetch that
        nobody joined and that found no spare tokens fails quietly: the entry just ages out.
        remember=False (our own budget said no, the name did nothing wrong) caches nothing.
        """
        self._stale_served.discard(key)
        waiters = self.inflight.finish(key)
        if background and not waiters:
            return []
        self.failures += 1
        if remember:
            self.cache.note_failure(key, now)
        return [Reply(w.client, self._stale_or_servfail(key, w, now)) for w in waiters]

    def on_stale_timeout(self, key: bytes, now: float) -> list[Reply]:
        """The fetch is slow (stale_answer_timeout passed): answer the waiters from stale data
        now, if there is any, and let the fetch go on to refresh the cache (RFC 8767 5)."""
        entry = self.cache.get_stale(key, now)
        if entry is None:
            return []
        self._stale_served.add(key)
        waiters = self.inflight.take(key)
        self.stale_answers += len(waiters)
        return [Reply(w.client, entry.reply_to(w, now, self.cache.policy.stale_ttl))
                for w in waiters]

    def _stale_or_servfail(self, key: bytes, waiter: Waiter, now: float) -> bytes:
        entry = self.cache.get_stale(key, now)
        if entry is None:
            return _servfail(waiter)
        self.stale_answers += 1
        return entry.reply_to(waiter, now, self.cache.policy.stale_ttl)


def _shape(data: bytes) -> tuple[bytes, bytes, bytes, int, int] | None:
    """The hit path's view of a query: (key, question, reply OPT, UDP limit, RD bit).

    None for anything that is not a plain one-question query with at most a version-0 OPT.
    """
    try:
        if data[2] & 0xF8 or data[4:10] != _ONE_QUESTION:
            return None  # a response, another opcode, or odd counts
        i = 12
        n = data[12]
        while n:
            if n > 63:
                return None
            i += n + 1
            n = data[i]
        qend = i + 5
        flags = wire.KEY_CD if data[3] & wire.FLAG3_CD else 0
        additional = data[10:12]
        if additional == _NO_ADDITIONAL:
            if len(data) != qend:
                return None
            opt = b""
            limit = wire.MIN_UDP_PAYLOAD
        elif additional == _ONE_ADDITIONAL:
            if data[qend] or data[qend + 1:qend + 3] != _OPT_TYPE or data[qend + 6]:
                return None  # not a version-0 OPT at the root
            rdata = qend + 11
            if rdata + (data[qend + 9] << 8 | data[qend + 10]) != len(data):
                return None
            while rdata < len(data):  # options must tile the RDATA (RFC 6891 6.1.2)
                rdata += 4 + (data[rdata + 2] << 8 | data[rdata + 3])
            if rdata != len(data):
                return None
            payload = data[qend + 3] << 8 | data[qend + 4]
            do = data[qend + 7] & 0x80
            if do:
                flags |= wire.KEY_DO
            opt = wire.reply_opt(payload, bool(do))
            limit = max(payload, wire.MIN_UDP_PAYLOAD)
        else:
            return None
    except IndexError:
        return None
    key = data[12:i].lower() + data[i:qend] + _FLAG_BYTES[flags]
    return key, data[12:qend], opt, limit, data[2] & wire.FLAG2_RD


def _servfail(waiter: Waiter) -> bytes:
    opt = wire.reply_opt(waiter.payload, waiter.do) if waiter.edns else b""
    return wire.rcode_reply(waiter.qid, waiter.rd, waiter.cd, waiter.question,
                            wire.RCODE_SERVFAIL, opt)
