"""Cache policy as time-travel tables: TTL aging, negative TTLs (RFC 2308), failures (RFC 9520)."""

from __future__ import annotations

import dns.rcode
import pytest

from resolver.core import wire
from resolver.core.cache import Cache, Kind, TtlPolicy, cache_ttl

from dnsmsg import parse, query, response, soa

T0 = 1000.0


def scan_of(
    name: str,
    rdtype: str,
    answers=(),
    authority=(),
    rcode=dns.rcode.NOERROR,
    truncated: bool = False,
) -> wire.ReplyScan:
    data = bytearray(response(query(name, rdtype), list(answers), list(authority), rcode))
    if truncated:
        data[2] |= wire.FLAG2_TC
    return wire.scan_reply(bytes(data))


def key_of(name: str, rdtype: str) -> bytes:
    return wire.parse_query(query(name, rdtype)).key


@pytest.mark.parametrize(
    ("case", "scan", "expected"),
    [
        (
            "positive: smallest answer TTL",
            scan_of(
                "a.test.",
                "MX",
                [("a.test.", 300, "MX", "10 mx.a.test."), ("a.test.", 200, "MX", "20 mx2.a.test.")],
            ),
            (Kind.POSITIVE, 200),
        ),
        (
            "positive: clamped to max_ttl",
            scan_of("a.test.", "A", [("a.test.", 999999, "A", "192.0.2.1")]),
            (Kind.POSITIVE, 86400),
        ),
        (
            "nxdomain: min(SOA TTL, MINIMUM)",
            scan_of(
                "nx.test.", "A", authority=[soa(ttl=600, minimum=300)], rcode=dns.rcode.NXDOMAIN
            ),
            (Kind.NXDOMAIN, 300),
        ),
        (
            "nxdomain: SOA TTL smaller than MINIMUM",
            scan_of(
                "nx.test.", "A", authority=[soa(ttl=60, minimum=300)], rcode=dns.rcode.NXDOMAIN
            ),
            (Kind.NXDOMAIN, 60),
        ),
        (
            "nodata: capped by max_negative_ttl",
            scan_of("a.test.", "MX", authority=[soa(ttl=86400, minimum=86400)]),
            (Kind.NODATA, 3600),
        ),
        (
            "nxdomain without SOA: not cached",
            scan_of("nx.test.", "A", rcode=dns.rcode.NXDOMAIN),
            None,
        ),
        ("nodata without SOA: not cached", scan_of("a.test.", "MX"), None),
        (
            "truncated: never cached",
            scan_of("a.test.", "A", [("a.test.", 300, "A", "192.0.2.1")], truncated=True),
            None,
        ),
        ("servfail: not an answer", scan_of("a.test.", "A", rcode=dns.rcode.SERVFAIL), None),
        ("refused: never cached", scan_of("a.test.", "A", rcode=dns.rcode.REFUSED), None),
        ("formerr: never cached", scan_of("a.test.", "A", rcode=dns.rcode.FORMERR), None),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_cache_ttl_policy(case: str, scan: wire.ReplyScan, expected: object) -> None:
    assert cache_ttl(scan, TtlPolicy()) == expected


def test_min_ttl_raises_short_answers() -> None:
    scan = scan_of("a.test.", "A", [("a.test.", 5, "A", "192.0.2.1")])
    assert cache_ttl(scan, TtlPolicy(min_ttl=30)) == (Kind.POSITIVE, 30)


def served_ttls(cache: Cache, key: bytes, name: str, rdtype: str, now: float) -> list[int] | None:
    entry = cache.get_fresh(key, now)
    if entry is None:
        return None
    q = wire.parse_query(query(name, rdtype))
    data = entry.reply(q.qid, True, q.question, wire.reply_opt(1232, False), 1232, now)
    msg = parse(data)
    return [rrset.ttl for section in (msg.answer, msg.authority) for rrset in section]


# (seconds after the store, TTLs served or None when no longer fresh)
AGING = [
    (0.0, [300, 3600]),
    (0.999, [300, 3600]),
    (1.0, [299, 3599]),
    (150.5, [150, 3450]),
    (299.999, [1, 3301]),
    (300.0, None),  # the entry lives for the answer's smallest TTL, no longer
]


def test_ttls_age_by_whole_seconds_in_cache() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy())
    scan = scan_of(
        "a.test.",
        "A",
        [("a.test.", 300, "A", "192.0.2.1")],
        authority=[("test.", 3600, "NS", "ns1.test.")],
    )
    key = key_of("a.test.", "A")
    cache.store(key, scan, T0)
    for after, expected in AGING:
        assert served_ttls(cache, key, "a.test.", "A", T0 + after) == expected, after


def test_negative_answer_soa_ttl_is_capped_at_the_negative_ttl() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy())
    scan = scan_of("nx.test.", "A", authority=[soa(ttl=600, minimum=300)], rcode=dns.rcode.NXDOMAIN)
    key = key_of("nx.test.", "A")
    cache.store(key, scan, T0)
    # RFC 2308 5: the SOA handed out says how long the negative answer may be kept.
    assert served_ttls(cache, key, "nx.test.", "A", T0) == [300]
    assert served_ttls(cache, key, "nx.test.", "A", T0 + 100) == [200]
    assert served_ttls(cache, key, "nx.test.", "A", T0 + 300) is None


def test_ttl_zero_answers_are_given_but_not_kept() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy())
    scan = scan_of("a.test.", "A", [("a.test.", 0, "A", "192.0.2.1")])
    entry = cache.store(key_of("a.test.", "A"), scan, T0)
    assert entry.kind == Kind.POSITIVE
    assert len(cache) == 0


def test_uncacheable_nxdomain_still_answers_waiters() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy())
    scan = scan_of("nx.test.", "A", rcode=dns.rcode.NXDOMAIN)
    entry = cache.store(key_of("nx.test.", "A"), scan, T0)
    assert entry.kind == Kind.NXDOMAIN and len(cache) == 0


# (seconds after the failure, still failed?)
FAILURE = [(0.0, True), (4.999, True), (5.0, False), (6.0, False)]


def test_failures_are_remembered_for_failure_ttl() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy(failure_ttl=5.0))
    key = key_of("a.test.", "A")
    cache.note_failure(key, T0)
    for after, expected in FAILURE:
        assert cache.failed_recently(key, T0 + after) is expected, after


def test_a_fresh_answer_clears_the_failure() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy())
    key = key_of("a.test.", "A")
    cache.note_failure(key, T0)
    cache.store(key, scan_of("a.test.", "A", [("a.test.", 300, "A", "192.0.2.1")]), T0 + 1)
    assert not cache.failed_recently(key, T0 + 2)


def test_lru_eviction_by_entry_count() -> None:
    cache = Cache(3, 1 << 30, TtlPolicy())
    names = [f"n{i}.test." for i in range(4)]
    for i, name in enumerate(names[:3]):
        cache.store(key_of(name, "A"), scan_of(name, "A", [(name, 300, "A", "192.0.2.1")]), T0 + i)
    assert cache.get_fresh(key_of(names[0], "A"), T0 + 5) is not None  # n0 is now recent
    cache.store(
        key_of(names[3], "A"), scan_of(names[3], "A", [(names[3], 300, "A", "192.0.2.9")]), T0 + 6
    )
    assert cache.get_fresh(key_of(names[1], "A"), T0 + 7) is None  # least recently used
    assert cache.get_fresh(key_of(names[0], "A"), T0 + 7) is not None
    assert len(cache) == 3 and cache.evictions == 1


def test_byte_bound_holds_after_every_store() -> None:
    cache = Cache(10_000, 8 * 1024, TtlPolicy())
    for i in range(50):
        name = f"n{i}.test."
        cache.store(
            key_of(name, "TXT"),
            scan_of(name, "TXT", [(name, 300, "TXT", '"' + "x" * 200 + '"')]),
            T0,
        )
        assert cache.bytes <= cache.max_bytes
    assert cache.evictions > 0
    assert cache.bytes == sum(e.size for e in cache.entries.values())


def test_replacing_an_entry_keeps_byte_accounting_exact() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy())
    key = key_of("a.test.", "A")
    for i in range(3):
        cache.store(key, scan_of("a.test.", "A", [("a.test.", 300, "A", f"192.0.2.{i}")]), T0 + i)
    assert len(cache) == 1
    assert cache.bytes == next(iter(cache.entries.values())).size


def test_purge_keeps_entries_inside_the_window() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy())
    cache.store(
        key_of("a.test.", "A"), scan_of("a.test.", "A", [("a.test.", 10, "A", "192.0.2.1")]), T0
    )
    cache.store(
        key_of("b.test.", "A"), scan_of("b.test.", "A", [("b.test.", 100, "A", "192.0.2.2")]), T0
    )
    assert cache.purge_expired(T0 + 50) == 1
    assert len(cache) == 1 and cache.bytes == next(iter(cache.entries.values())).size


def test_dnssec_keys_are_separate() -> None:
    plain = wire.parse_query(query("a.test.", "A")).key
    dnssec = wire.parse_query(query("a.test.", "A", do=True)).key
    upper = wire.parse_query(query("A.TEST.", "A")).key
    assert plain != dnssec and plain == upper


def test_a_limited_purge_looks_only_at_the_least_recently_used_end() -> None:
    cache = Cache(100, 1 << 20, TtlPolicy())
    for i in range(4):
        name = f"n{i}.test."
        cache.store(key_of(name, "A"), scan_of(name, "A", [(name, 10, "A", "192.0.2.1")]), T0)
    assert cache.purge_expired(T0 + 20, scan_limit=3) == 3
    assert cache.purge_expired(T0 + 20, scan_limit=3) == 1
    assert len(cache) == 0 and cache.bytes == 0
