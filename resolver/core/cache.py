"""The answer cache: wire-format entries, TTL policy, LRU bounds, failure cache.

Invariants:
  1. An entry is served only while `now < expires_at`; its TTLs are aged by the whole seconds
     it has been cached, never below zero (RFC 1035 3.2.1, RFC 2181 8).
  2. Negative entries follow RFC 2308 5: TTL = min(SOA TTL, SOA MINIMUM, max_negative_ttl);
     a negative answer without an SOA is not cached.
  3. Never cached: TC=1, FORMERR, REFUSED, NOTIMP, anything unmatched or malformed.
  4. The cache never holds more than max_entries entries or max_bytes accounted bytes; the
     least recently used go first.
"""

from __future__ import annotations

import itertools
import struct
from collections import OrderedDict
from dataclasses import dataclass

from resolver.core import wire
from resolver.core.model import Waiter

# Per-entry bookkeeping beyond the body bytes: the Entry object, its key, header variants and
# the dict slot. Measured with tracemalloc at about 600 bytes; used only for the byte bound.
ENTRY_OVERHEAD_BYTES = 600


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    """The TTL clamps of the configuration, in seconds."""

    min_ttl: int = 0
    max_ttl: int = 86400
    max_negative_ttl: int = 3600
    failure_ttl: float = 5.0
    stale_max: float = 86400.0  # RFC 8767 4: how long expired answers are kept for emergencies
    stale_ttl: int = 30  # RFC 8767 4: the TTL a stale answer is served with
    prefetch_fraction: float = 0.1  # refresh once this share of the TTL is left


class Kind:
    """What an entry holds; plain strings keep logs and dumps readable."""

    POSITIVE = "positive"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"


def cache_ttl(scan: wire.ReplyScan, policy: TtlPolicy) -> tuple[str, int] | None:
    """How long a reply may be cached, and as what; None when it must not be cached."""
    if scan.truncated:
        return None
    if scan.rcode == wire.RCODE_NOERROR and scan.counts[0] and scan.answer_min_ttl is not None:
        ttl = min(max(scan.answer_min_ttl, policy.min_ttl), policy.max_ttl)
        return Kind.POSITIVE, ttl
    if scan.rcode in (wire.RCODE_NXDOMAIN, wire.RCODE_NOERROR):
        if scan.soa_ttl is None or scan.soa_minimum is None:
            return None  # RFC 2308 5: without the SOA we cannot know how long it holds
        ttl = min(scan.soa_ttl, scan.soa_minimum, policy.max_negative_ttl)
        return (Kind.NXDOMAIN if scan.rcode == wire.RCODE_NXDOMAIN else Kind.NODATA), ttl
    return None


def kind_of(scan: wire.ReplyScan) -> str:
    if scan.rcode == wire.RCODE_NXDOMAIN:
        return Kind.NXDOMAIN
    return Kind.POSITIVE if scan.counts[0] else Kind.NODATA


class Entry:
    """One cached answer in wire form, ready to splice.

    `body` holds every section after the question; the question itself and the ID come from
    the client at serve time. `rendered` is the body aged for `rendered_age`, so hits within
    the same second are a join of ready slices.
    """

    __slots__ = (
        "body",
        "expires_at",
        "header",
        "header_edns",
        "hits",
        "key",
        "kind",
        "prefetch_at",
        "rendered",
        "rendered_age",
        "stored_at",
        "tail",
        "tail_age",
        "tail_shape",
        "ttl",
        "ttl_offsets",
        "ttls",
    )

    def __init__(self, key: bytes, scan: wire.ReplyScan, kind: str, ttl: int, now: float,
                 policy: TtlPolicy) -> None:
        self.key = key
        self.kind = kind
        self.ttl = ttl
        self.stored_at = now
        self.expires_at = now + ttl
        self.hits = 0
        # The hit path compares against this one number; inf once a prefetch was started, so
        # an entry is prefetched at most once.
        self.prefetch_at = now + ttl * (1.0 - policy.prefetch_fraction)
        # Records never promise more than the entry lives: negative answers are capped at the
        # negative TTL (RFC 2308 5), positive ones at max_ttl, and none go below min_ttl.
        cap = policy.max_ttl if kind == Kind.POSITIVE else ttl
        floor = policy.min_ttl if kind == Kind.POSITIVE else 0
        self.ttls = tuple(max(min(t, cap), floor) for t in scan.ttls)
        self.ttl_offsets = scan.ttl_offsets
        self.body = wire.patch_ttls(scan.body, scan.ttl_offsets, self.ttls, 0)
        self.rendered = self.body
        self.rendered_age = 0
        # The reply minus its ID, last rendered by the hit path for one query shape and age.
        self.tail = b""
        self.tail_shape: object = None
        self.tail_age = -1
        # AD only survives for clients that asked with DO (RFC 6840 5.8): the key carries DO.
        flags3 = scan.flags3 & (wire.FLAG3_RA | wire.FLAG3_AD | wire.FLAG3_CD | wire.FLAG3_RCODE)
        if not key[-1] & wire.KEY_DO:
            flags3 &= ~wire.FLAG3_AD
        flags3 |= wire.FLAG3_RA
        an, ns, ar = scan.counts
        # Bytes 2..11 of the reply header for RD=1 clients, without and with our OPT record.
        self.header = struct.pack("!BBHHHH", wire.FLAG2_QR | wire.FLAG2_RD, flags3, 1, an, ns, ar)
        self.header_edns = struct.pack("!BBHHHH", wire.FLAG2_QR | wire.FLAG2_RD, flags3, 1, an,
                                       ns, ar + 1)

    @property
    def size(self) -> int:
        # Up to three copies of the body live on: stored, rendered for this second, reply tail.
        return len(self.body) * 3 + len(self.key) + ENTRY_OVERHEAD_BYTES

    def render_body(self, now: float) -> bytes:
        """The body aged to now, re-rendered at most once per second of age."""
        age = int(now - self.stored_at)
        if age != self.rendered_age:
            self.rendered = wire.patch_ttls(self.body, self.ttl_offsets, self.ttls, age)
            self.rendered_age = age
        return self.rendered

    def reply(self, qid: bytes, rd: int, question: bytes, opt: bytes, limit: int,
              now: float, body: bytes | None = None) -> bytes:
        """The whole reply for one client; TC=1 with the question only when it would not fit."""
        if body is None:
            body = self.render_body(now)
        header = self.header_edns if opt else self.header
        if not rd:
            header = bytes((header[0] & ~wire.FLAG2_RD,)) + header[1:]
        if 12 + len(question) + len(body) + len(opt) > limit:
            return truncated_reply(qid, header, question, opt)
        return b"".join((qid, header, question, body, opt))

    def reply_to(self, waiter: Waiter, now: float, stale_ttl: int | None = None) -> bytes:
        """The reply for a waiter; with stale_ttl, every TTL says that (RFC 8767 4)."""
        opt = wire.reply_opt(waiter.payload, waiter.do) if waiter.edns else b""
        body = None
        if stale_ttl is not None:
            body = wire.patch_ttls(self.body, self.ttl_offsets,
                                   (stale_ttl,) * len(self.ttls), 0)
        return self.reply(waiter.qid, waiter.rd, waiter.question, opt, waiter.limit, now, body)


def truncated_reply(qid: bytes, header: bytes, question: bytes, opt: bytes) -> bytes:
    """RFC 2181 9 / RFC 1035 4.2.1: TC=1 and no partial RRsets; the client retries over TCP."""
    flags2 = header[0] | wire.FLAG2_TC
    counts = struct.pack("!HHHH", 1, 0, 0, 1 if opt else 0)
    return b"".join((qid, bytes((flags2, header[1])), counts, question, opt))


class Cache:
    """LRU-bounded map from cache key to Entry, plus a short-lived failure map (RFC 9520).

    An OrderedDict rather than cachetools.LRUCache: the hit path needs C-speed get and
    move_to_end, and we bound by two measures (entries and bytes) at once.
    """

    def __init__(self, max_entries: int, max_bytes: int, policy: TtlPolicy) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.policy = policy
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self._failures: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get_stale(self, key: bytes, now: float) -> Entry | None:
        """An expired entry still inside the stale window (RFC 8767), for when upstreams fail."""
        entry = self.entries.get(key)
        if entry is None or now < entry.expires_at or now >= entry.expires_at + \
                self.policy.stale_max:
            return None
        return entry

    def get_fresh(self, key: bytes, now: float) -> Entry | None:
        entry = self.entries.get(key)
        if entry is None or now >= entry.expires_at:
            return None
        self.entries.move_to_end(key)
        return entry

    def store(self, key: bytes, scan: wire.ReplyScan, now: float) -> Entry:
        """Cache a reply if policy allows; returns the entry (cached or not) to answer from."""
        verdict = cache_ttl(scan, self.policy)
        kind, ttl = verdict if verdict is not None else (kind_of(scan), 0)
        entry = Entry(key, scan, kind, ttl, now, self.policy)
        if ttl <= 0:
            return entry  # answer the waiters, keep nothing (RFC 1035: TTL 0 is "do not cache")
        self._failures.pop(key, None)
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self.entries[key] = entry
        self.bytes += entry.size
        self._evict()
        return entry

    def _evict(self) -> None:
        while len(self.entries) > self.max_entries or (self.bytes > self.max_bytes
                                                       and self.entries):
            _, victim = self.entries.popitem(last=False)
            self.bytes -= victim.size
            self.evictions += 1

    def remove(self, key: bytes) -> Entry | None:
        """Drop one entry and any remembered failure for it (the operator's flush)."""
        self._failures.pop(key, None)
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry

    def note_failure(self, key: bytes, now: float) -> None:
        """RFC 9520 3.2: remember a resolution failure briefly so retries do not go upstream."""
        if len(self._failures) >= self.max_entries:
            self._failures.clear()  # a flood of distinct failing names: start over, stay bounded
        self._failures[key] = now + self.policy.failure_ttl

    def failed_recently(self, key: bytes, now: float) -> bool:
        until = self._failures.get(key)
        if until is None:
            return False
        if now >= until:
            del self._failures[key]
            return False
        return True

    def purge_expired(self, now: float, keep_seconds: float = 0.0,
                      scan_limit: int | None = None) -> int:
        """Drop entries expired for longer than keep_seconds (the stale window); returns count.

        With scan_limit, only that many entries from the least recently used end are looked
        at: a sweep of a full cache would stall serving (0.2-0.5 s at 200k entries), while
        entries nobody asks for drift to that end by themselves.
        """
        candidates = self.entries.items()
        if scan_limit is not None:
            candidates = itertools.islice(candidates, scan_limit)
        dead = [k for k, e in candidates if e.expires_at + keep_seconds <= now]
        for k in dead:
            self.bytes -= self.entries.pop(k).size
        for k in [k for k, until in self._failures.items() if until <= now]:
            del self._failures[k]
        return len(dead)
