"""Per-zone forwarding: a zone (a DNSBL, say) goes to its own upstreams with its own budget."""

from __future__ import annotations

import dns.rcode
import pytest
import trio

from resolver import config as cfg
from resolver.core.cache import Cache, TtlPolicy
from resolver.core.engine import Engine
from resolver.core.model import Endpoint
from resolver.core.pool import Pool, Timing, UpstreamSpec
from resolver.daemon.service import zone_wire
from resolver.errors import ConfigError

from dnsmsg import parse, query
from fakeupstream import FakeUpstream
from loopback import addr_of, ask_udp, running


def test_zone_tables_parse() -> None:
    c = cfg.parse({"zone": [{"name": "Zen.Spamhaus.org", "upstream": "127.0.0.9:53", "pps": 50},
                            {"name": "dbl.example.", "upstream": ["127.0.0.8", "127.0.0.7"]}]})
    assert [z.name for z in c.zone] == ["zen.spamhaus.org.", "dbl.example."]
    assert c.zone[0].upstream == (Endpoint("127.0.0.9", 53),) and c.zone[0].pps == 50
    assert len(c.zone[1].upstream) == 2 and c.zone[1].pps is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "zen.spamhaus.org"}, "needs upstream"),
        ({"name": "zen.spamhaus.org", "upstream": [], "pps": 5}, "at least one upstream"),
        ({"name": "a..b", "upstream": ["127.0.0.1"]}, "not a valid domain name"),
        ({"name": "zen.spamhaus.org", "upstream": ["127.0.0.1"], "ppps": 5}, "unknown key"),
        ({"upstream": ["127.0.0.1"]}, "must be a domain name"),
    ],
)
def test_bad_zone_tables_are_one_line(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        cfg.parse({"zone": [table]})
    assert str(err.value).startswith("zone: ") and "\n" not in str(err.value)


def test_a_zone_listed_twice_is_refused() -> None:
    table = {"name": "zen.spamhaus.org", "upstream": ["127.0.0.9"]}
    with pytest.raises(ConfigError, match="listed twice"):
        cfg.parse({"zone": [table, dict(table, name="ZEN.spamhaus.org.")]})


def test_a_zone_forwarding_to_ourselves_is_a_loop() -> None:
    c = cfg.parse({"listen": ["127.0.0.1:53"], "upstream": ["127.0.0.2"],
                   "zone": [{"name": "zen.spamhaus.org", "upstream": ["127.0.0.1:53"]}]})
    with pytest.raises(ConfigError, match="forwarding loop"):
        cfg.finalize(c, None, ipv6_loopback=False)


def wire_name(text: str) -> bytes:
    return zone_wire(text)


def test_the_most_specific_zone_wins_at_label_boundaries() -> None:
    main = Pool([UpstreamSpec(Endpoint("127.0.0.1", 53))])
    dnsbl = Pool([UpstreamSpec(Endpoint("127.0.0.2", 53))])
    inner = Pool([UpstreamSpec(Endpoint("127.0.0.3", 53))])
    engine = Engine(Cache(10, 1 << 20, TtlPolicy()), main, Timing())
    engine.add_zone(wire_name("spamhaus.org."), dnsbl)
    engine.add_zone(wire_name("zen.spamhaus.org."), inner)
    # (name asked, pool expected)
    table = [
        ("2.0.0.127.zen.spamhaus.org.", inner),
        ("zen.spamhaus.org.", inner),
        ("dbl.spamhaus.org.", dnsbl),
        ("spamhaus.org.", dnsbl),
        ("xspamhaus.org.", main),  # not a label boundary
        ("example.org.", main),
        (".", main),
    ]
    for name, expected in table:
        assert engine.pool_for(wire_name(name) if name != "." else b"\x00") is expected, name
    assert engine.pools == [main, dnsbl, inner]


async def test_a_zone_goes_to_its_own_upstream_with_its_own_budget() -> None:
    with FakeUpstream() as main, FakeUpstream() as blocklist:
        zones = (cfg.ZoneForward("spamhaus.test.", (Endpoint(*blocklist.addr),), 5, 1),)
        async with running([main], zone=zones) as svc:
            server = addr_of(svc)
            reply = parse(await ask_udp(server, query("example.test.", "A")))
            assert reply.rcode() == dns.rcode.NOERROR
            results = []

            async def ask(i: int) -> None:
                results.append(parse(await ask_udp(server, query(
                    f"{i}.0.0.127.zen.spamhaus.test.", "A"), timeout=6)).rcode())

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(ask, i)
            zone_pool = svc.engine.pools[1]
    assert zone_pool.zone == "spamhaus.test."
    assert main.udp_count == 1  # none of the blocklist names went to the main upstream
    # The zone's own budget (5/s + 1): most of the burst is refused, never sent.
    assert 1 <= blocklist.udp_count <= 6
    assert results.count(dns.rcode.NXDOMAIN) == blocklist.udp_count
    assert set(results) <= {dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL}
