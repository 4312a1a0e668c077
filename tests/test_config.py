"""Configuration: parsing, one-line refusals, flag overrides, resolv.conf and loop detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver import config as cfg
from resolver.core.model import Endpoint
from resolver.errors import ConfigError


def test_defaults_are_sane() -> None:
    c = cfg.Config()
    assert c.failure_ttl_seconds == 5.0
    assert c.allow == ("127.0.0.0/8", "::1/128")
    assert c.upstream_timeout_seconds < c.query_deadline_seconds < 5.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", Endpoint("127.0.0.1", 53)),
        ("127.0.0.1:5353", Endpoint("127.0.0.1", 5353)),
        ("::1", Endpoint("::1", 53)),
        ("[::1]:5353", Endpoint("::1", 5353)),
    ],
)
def test_endpoints(text: str, expected: Endpoint) -> None:
    assert cfg.parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"upstrem": ["127.0.0.1"]}, "upstrem"),
        ({"max_ttl_seconds": "a day"}, "max_ttl_seconds"),
        ({"max_ttl_seconds": 1.5}, "max_ttl_seconds"),
        ({"failure_ttl_seconds": 0.5}, "failure_ttl_seconds"),  # RFC 9520: at least 1 s
        ({"failure_ttl_seconds": 301}, "failure_ttl_seconds"),  # ... at most 5 minutes
        ({"upstream": ["resolver.example"]}, "upstream"),
        ({"listen": ["127.0.0.1:99999"]}, "listen"),
        ({"allow": ["not-a-net"]}, "allow"),
        ({"log_level": "loud"}, "log_level"),
        ({"min_ttl_seconds": 600, "max_ttl_seconds": 60}, "min_ttl_seconds"),
        ({"upstream": [{"address": "127.0.0.1", "role": "backup"}]}, "upstream"),
        ({"cache_max_entries": True}, "cache_max_entries"),
    ],
)
def test_bad_values_are_refused_in_one_line_naming_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg.parse(data)
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message


def test_toml_file_and_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "resolver.toml"
    path.write_text(
        'upstream = ["127.0.0.1:5300"]\nmax_ttl_seconds = 600\nfallback = ["127.0.0.2:53"]\n'
    )
    loaded = cfg.load(path)
    assert loaded.upstream == (Endpoint("127.0.0.1", 5300),)
    assert loaded.fallback == (Endpoint("127.0.0.2", 53),)
    merged = cfg.with_overrides(
        loaded, {"upstream": ["127.0.0.9:53"], "listen": [], "metrics": None}
    )
    assert merged.upstream == (Endpoint("127.0.0.9", 53),)
    assert merged.max_ttl_seconds == 600 and merged.fallback == loaded.fallback


def test_upstream_tables_with_roles() -> None:
    c = cfg.parse(
        {
            "upstream": [
                {"address": "127.0.0.1:53", "role": "primary", "pps": 900},
                {"address": "169.254.169.253", "role": "fallback"},
            ]
        }
    )
    assert c.upstream == (Endpoint("127.0.0.1", 53),)
    assert c.fallback == (Endpoint("169.254.169.253", 53),)


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("upstream = [\n")
    with pytest.raises(ConfigError, match=r"^config: .* is not valid TOML"):
        cfg.load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.load(tmp_path / "nope.toml")


RESOLV = """# generated
search example.internal
nameserver 10.0.0.2
nameserver fe80::1%eth0
options edns0 trust-ad
nameserver 2001:db8::53 ; trailing comment
"""


def test_resolv_conf_nameservers() -> None:
    assert cfg.resolv_conf_nameservers(RESOLV) == (
        Endpoint("10.0.0.2", 53),
        Endpoint("2001:db8::53", 53),
    )


def test_finalize_takes_resolv_conf_and_default_listen() -> None:
    c = cfg.finalize(cfg.Config(), RESOLV, ipv6_loopback=True)
    assert c.listen == (Endpoint("127.0.0.1", 53), Endpoint("::1", 53))
    assert c.upstream[0] == Endpoint("10.0.0.2", 53)
    assert cfg.finalize(cfg.Config(), RESOLV, ipv6_loopback=False).listen == (
        Endpoint("127.0.0.1", 53),
    )


@pytest.mark.parametrize(
    ("listen", "resolv"),
    [
        ((), "nameserver 127.0.0.1\n"),  # resolv.conf points at us: the classic sidecar loop
        ((Endpoint("0.0.0.0", 53),), "nameserver 127.0.0.53\n"),  # wildcard catches loopback
    ],
)
def test_forwarding_loops_are_refused(listen: tuple, resolv: str) -> None:
    with pytest.raises(ConfigError, match="forwarding loop"):
        cfg.finalize(cfg.Config(listen=listen), resolv, ipv6_loopback=False)


def test_a_different_port_is_not_a_loop() -> None:
    c = cfg.finalize(
        cfg.Config(listen=(Endpoint("127.0.0.1", 5353),)),
        "nameserver 127.0.0.1",
        ipv6_loopback=False,
    )
    assert c.upstream == (Endpoint("127.0.0.1", 53),)


def test_no_upstream_anywhere() -> None:
    with pytest.raises(ConfigError, match=r"^upstream: none given"):
        cfg.finalize(cfg.Config(), "", ipv6_loopback=False)


def test_limits_are_printed_as_plain_numbers() -> None:
    with pytest.raises(ConfigError) as err:
        cfg.parse({"cache_max_entries": 0})
    assert "from 1 to 100000000" in str(err.value)


@pytest.mark.parametrize(
    "table",
    [{"address": "127.0.0.1", "ppps": 900}, {"role": "primary"}],
)
def test_upstream_tables_refuse_unknown_or_missing_keys(table: dict) -> None:
    with pytest.raises(ConfigError, match=r"^upstream: "):
        cfg.parse({"upstream": [table]})


def test_a_single_string_upstream_is_accepted() -> None:
    assert cfg.parse({"upstream": "10.0.0.2"}).upstream == (Endpoint("10.0.0.2", 53),)


def test_budget_precedence() -> None:
    vpc = Endpoint("169.254.169.253", 53)
    cluster = Endpoint("10.0.0.2", 53)
    c = cfg.parse({"upstream": [{"address": "10.0.0.2", "pps": 500, "burst": 40},
                                {"address": "169.254.169.253", "role": "fallback",
                                 "burst": 50}]})
    assert cfg.budget_for(c, cluster) == (500, 40)
    assert cfg.budget_for(c, vpc) == (cfg.AWS_RESOLVER_PPS, 50)  # the AWS default stays
    flags = cfg.parse({"upstream": ["10.0.0.9"], "upstream_pps": 300})
    assert cfg.budget_for(flags, Endpoint("10.0.0.9", 53)) == (300, None)
    assert cfg.budget_for(cfg.parse({}), cluster) == (None, None)


def test_a_budget_table_without_address() -> None:
    with pytest.raises(ConfigError, match="needs address"):
        cfg.parse({"upstream": [{"pps": 100}]})
