"""Configuration: one frozen dataclass, one `parse`, TOML keys named like the CLI flags.

Every refusal is one line that names the key and says how to fix it (ConfigError).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from resolver.core.budget import default_burst
from resolver.core.model import Endpoint
from resolver.errors import ConfigError

DNS_PORT = 53
RESOLV_CONF = Path("/etc/resolv.conf")
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class ZoneForward:
    """A zone sent to its own upstreams (e.g. a DNSBL zone to a resolver that may query it)."""

    name: str  # lower case, absolute (trailing dot)
    upstream: tuple[Endpoint, ...]
    pps: int | None = None
    burst: int | None = None


@dataclass(frozen=True)
class Config:
    """The resolver's settings. TOML keys and `resolver serve` flags share these names."""

    listen: tuple[Endpoint, ...] = ()
    """Addresses to answer on, UDP and TCP. Empty: 127.0.0.1:53, plus [::1]:53 when IPv6
    loopback exists."""

    upstream: tuple[Endpoint, ...] = ()
    """Primary upstream servers (your recursive cluster). Empty: the nameservers of
    /etc/resolv.conf."""

    fallback: tuple[Endpoint, ...] = ()
    """Fallback servers (e.g. the VPC resolver): they take the primaries' overflow, and all
    traffic while the primaries are down (see docs/upstream-protection.md)."""

    upstream_pps: int | None = None
    """Packets per second allowed to each upstream that has no `pps` of its own. Unset: no
    budget, except for the AWS VPC resolver addresses (see AWS_RESOLVER_PPS)."""

    upstream_burst: int | None = None
    """Tokens a budget may save up beyond its rate; unset: a tenth of the rate. In any one-second
    window an upstream receives at most pps + burst packets."""

    upstream_limits: tuple[tuple[Endpoint, int | None, int | None], ...] = ()
    """Per-upstream (address, pps, burst) from `[[upstream]]` tables (not a TOML key itself)."""

    zone: tuple[ZoneForward, ...] = ()
    """`[[zone]]` tables: name, upstream (list), pps, burst. Names in a zone go to its own
    upstreams, with their own budget, instead of the primaries and fallbacks."""

    budget_reserve_fraction: float = 0.2
    """Share of each budget's burst kept for client misses: prefetch and probes never use it."""

    queue_wait_seconds: float = 0.05
    """How long a miss may wait for a token when every upstream's budget is spent."""

    queue_max: int = 1000
    """Most misses waiting for tokens at once; past it they get stale data or SERVFAIL at once."""

    repoint_hold_seconds: float = 30.0
    """How long the pool stays repointed after the last evidence before returning to the
    primaries (hysteresis, so mild loss cannot make it flap)."""

    prefetch_min_hits: int = 3
    """An entry asked this many times during its life is refreshed before it expires."""

    prefetch_fraction: float = 0.1
    """The refresh starts when this share of the entry's TTL is left."""

    stale_max_seconds: float = 86400.0
    """Expired answers are kept this long to serve when upstreams cannot answer (RFC 8767)."""

    stale_answer_timeout_seconds: float = 1.8
    """A miss with stale data waits this long for upstreams before the client gets the stale
    answer (RFC 8767 suggests 1.8 s); the refresh goes on in the background."""

    stale_ttl_seconds: int = 30
    """The TTL stale answers are served with (RFC 8767 4)."""

    ena_counters_command: str | None = None
    """A command printing ENA counters once a second, e.g. `ethtool -S eth0`; unset: off."""

    ena_counters_file: str | None = None
    """A file holding `ethtool -S` output, read once a second instead of a command."""

    metrics: Endpoint | None = None
    """HOST:PORT for the Prometheus endpoint (given behaviour by the operations work)."""

    control: str | None = None
    """Path of the control socket (given behaviour by the operations work)."""

    allow: tuple[str, ...] = LOOPBACK_NETWORKS
    """Client networks answered; everyone else gets REFUSED."""

    cache_max_entries: int = 200_000
    """Most answers the cache holds; the least recently used go first."""

    cache_max_bytes: int = 256 * 1024 * 1024
    """Most bytes the cache accounts for (wire bytes plus per-entry overhead)."""

    min_ttl_seconds: int = 0
    """Positive answers are cached at least this long."""

    max_ttl_seconds: int = 86400
    """Positive answers are cached at most this long, and no TTL handed out exceeds it."""

    max_negative_ttl_seconds: int = 3600
    """NXDOMAIN/NODATA are cached at most this long (RFC 2308 5 suggests 1 to 3 hours)."""

    failure_ttl_seconds: float = 5.0
    """How long a failed resolution answers SERVFAIL from cache (RFC 9520: 1 s to 5 min)."""

    upstream_timeout_seconds: float = 1.0
    """How long one try waits for an upstream before asking the next."""

    query_deadline_seconds: float = 4.0
    """How long a miss may take in all before the client gets SERVFAIL; keep it below the
    MTA's own resolver timeout (glibc: 5 s) so the SERVFAIL arrives while someone listens."""

    max_tries: int = 4
    """Most upstream tries per miss, all upstreams together."""

    tcp_idle_timeout_seconds: float = 10.0
    """A client TCP connection with nothing in flight is closed after this (RFC 7766 6.2.3)."""

    tcp_max_connections: int = 256
    """Most client TCP connections at once; past it the oldest idle one is closed."""

    udp_buffer_bytes: int = 4 * 1024 * 1024
    """Socket receive/send buffer asked of the kernel for each UDP listener."""

    log_level: str = "info"
    """debug, info, warning or error."""

    log_format: str = "text"
    """`text` (one readable line per event) or `json` (one JSON object per line)."""

    state_directory: str | None = None
    """Where the cache snapshot is kept for warm restarts. Unset: $STATE_DIRECTORY (systemd's
    StateDirectory=) when set, else no snapshots."""

    snapshot_interval_seconds: float = 300.0
    """How often the cache is written to the state directory (also on shutdown)."""

    workers: int = 1
    """Serving processes sharing the listen addresses (SO_REUSEPORT), 1 to 64. Each has its own
    cache, and a 1/workers share of every upstream budget (docs/operations.md, Workers)."""

    worker_index: int = 0
    """Which worker this process is, 0 to workers - 1 (set by the supervisor; not a TOML key)."""

    source: str = field(default="defaults", compare=False)
    """Where this configuration came from (for messages only; not a TOML key)."""


_NOT_KEYS = {"source", "upstream_limits", "worker_index"}
# The AWS VPC resolver (Route 53 Resolver) drops, silently, what exceeds 1024 packets/s per
# network interface. Unless told otherwise we stay well under that, burst included.
AWS_RESOLVER_ADDRESSES = ("169.254.169.253", "fd00:ec2::253")
AWS_RESOLVER_PPS = 900
_LIMITS: dict[str, tuple[float, float]] = {
    "cache_max_entries": (1, 100_000_000),
    "cache_max_bytes": (64 * 1024, 1 << 40),
    "min_ttl_seconds": (0, 86400),
    "max_ttl_seconds": (1, 7 * 86400),
    "max_negative_ttl_seconds": (0, 86400),
    "failure_ttl_seconds": (1, 300),  # RFC 9520 3.2: at least 1 s, at most 5 min
    "upstream_timeout_seconds": (0.01, 30),
    "query_deadline_seconds": (0.05, 60),
    "max_tries": (1, 20),
    "tcp_idle_timeout_seconds": (0.1, 3600),
    "tcp_max_connections": (1, 100_000),
    "udp_buffer_bytes": (65536, 1 << 30),
    "upstream_pps": (1, 10_000_000),
    "upstream_burst": (1, 10_000_000),
    "budget_reserve_fraction": (0, 0.9),
    "queue_wait_seconds": (0, 5),
    "queue_max": (0, 1_000_000),
    "repoint_hold_seconds": (1, 3600),
    "prefetch_min_hits": (1, 1_000_000),
    "prefetch_fraction": (0.01, 0.5),
    "stale_max_seconds": (0, 7 * 86400),
    "stale_answer_timeout_seconds": (0.05, 30),
    "stale_ttl_seconds": (1, 3600),
    "snapshot_interval_seconds": (10, 86400),
    "workers": (1, 64),
}
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")


def parse_endpoint(text: str, default_port: int = DNS_PORT, key: str = "address") -> Endpoint:
    """`1.2.3.4`, `1.2.3.4:53`, `::1`, `[::1]:53` → Endpoint; refuses host names."""
    text = str(text).strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{key}: '{text}' is not an address: write [V6ADDR]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        # Normalised (e.g. ::0001 → ::1): replies are matched against this exact text.
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"{key}: '{text}' is not an IP address: write HOST:PORT with a "
                          "numeric address such as 127.0.0.1:53 or [::1]:53") from None
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(f"{key}: port in '{text}' must be a number from 0 to 65535")
        port = int(port_text)
    return Endpoint(host, port)


def _plain(number: float) -> str:
    """1e8 as 100000000 and 0.05 as 0.05: limits people can copy into their file."""
    return str(int(number)) if float(number).is_integer() else str(number)


# Keys of an [[upstream]] table; pps and burst are read by upstream protection.
_UPSTREAM_TABLE_KEYS = ("address", "role", "pps", "burst")


def _endpoints(key: str, value: Any) -> tuple[Endpoint, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be a list of \"HOST:PORT\" strings")
    out = []
    for item in value:
        if isinstance(item, Mapping):
            # [[upstream]] tables (address, role, pps, burst): role picks the list here,
            # pps and burst are read by _limits.
            unknown = sorted(set(item) - set(_UPSTREAM_TABLE_KEYS))
            if unknown:
                raise ConfigError(f"{key}: unknown key '{unknown[0]}' in an [[{key}]] table: "
                                  f"use {', '.join(_UPSTREAM_TABLE_KEYS)}")
            if "address" not in item:
                raise ConfigError(f"{key}: an [[{key}]] table needs address = \"HOST:PORT\"")
            item = item["address"]
        out.append(parse_endpoint(item, key=key))
    return tuple(out)


def _number(key: str, value: Any, kind: type) -> float | int:
    low, high = _LIMITS[key]
    ok_type = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int and isinstance(value, float):
        ok_type = False
    if not ok_type or not low <= value <= high:
        unit = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key}: must be {unit} from {_plain(low)} to {_plain(high)} "
                          f"(got {value!r})")
    return kind(value)


def parse(mapping: Mapping[str, Any], source: str = "config") -> Config:
    """Build a Config from TOML-like data; unknown keys and bad values raise ConfigError."""
    known = {f.name: f for f in fields(Config) if f.name not in _NOT_KEYS}
    values: dict[str, Any] = {"source": source}
    mapping = dict(mapping)
    # `[[upstream]]` entries with role = "fallback" belong to the fallback list.
    if isinstance(mapping.get("upstream"), list):
        primaries, fallbacks = [], list(_as_list(mapping.get("fallback", [])))
        for item in mapping["upstream"]:
            role = item.get("role", "primary") if isinstance(item, Mapping) else "primary"
            if role not in ("primary", "fallback"):
                raise ConfigError(f"upstream: role '{role}' must be \"primary\" or \"fallback\"")
            (fallbacks if role == "fallback" else primaries).append(item)
        mapping["upstream"] = primaries
        if fallbacks:
            mapping["fallback"] = fallbacks
    values["upstream_limits"] = _limits(list(_as_list(mapping.get("upstream", []))) +
                                        list(_as_list(mapping.get("fallback", []))))
    for key, value in mapping.items():
        if key not in known:
            close = [k for k in known if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{key}: unknown key in {source}{hint}: remove it or fix its name")
        if key in ("listen", "upstream", "fallback"):
            values[key] = _endpoints(key, value)
        elif key == "metrics":
            values[key] = None if value in (None, "") else parse_endpoint(value, 9153, key)
        elif key in ("control", "ena_counters_command", "ena_counters_file", "state_directory"):
            if not isinstance(value, str):
                raise ConfigError(f"{key}: must be a string")
            values[key] = value or None
        elif key == "zone":
            values[key] = _zones(value)
        elif key == "allow":
            values[key] = _networks(value)
        elif key == "log_level":
            if value not in _LOG_LEVELS:
                raise ConfigError(f"log_level: must be one of {', '.join(_LOG_LEVELS)}")
            values[key] = value
        elif key == "log_format":
            if value not in _LOG_FORMATS:
                raise ConfigError(f"log_format: must be one of {', '.join(_LOG_FORMATS)}")
            values[key] = value
        else:
            kind = int if "int" in str(known[key].type) else float
            values[key] = _number(key, value, kind)
    config = Config(**values)
    _check_consistency(config)
    return config


def _limits(items: list[Any]) -> tuple[tuple[Endpoint, int | None, int | None], ...]:
    """(address, pps, burst) of every [[upstream]] table that sets a budget."""
    out = []
    for item in items:
        if not isinstance(item, Mapping) or not ({"pps", "burst"} & set(item)):
            continue
        if "address" not in item:
            raise ConfigError('upstream: an [[upstream]] table needs address = "HOST:PORT"')
        endpoint = parse_endpoint(item["address"], key="upstream")
        pps = _number("upstream_pps", item["pps"], int) if "pps" in item else None
        burst = _number("upstream_burst", item["burst"], int) if "burst" in item else None
        out.append((endpoint, pps, burst))
    return tuple(out)


def budget_for(config: Config, endpoint: Endpoint) -> tuple[int | None, int | None]:
    """(pps, burst) for an upstream: its own table, else the global flags, else the AWS
    resolver default for its well-known addresses, else no budget."""
    pps, burst = None, None
    for limited, table_pps, table_burst in config.upstream_limits:
        if limited == endpoint:
            pps, burst = table_pps, table_burst
    if pps is None:
        pps = config.upstream_pps
    if pps is None and endpoint.host.lower() in AWS_RESOLVER_ADDRESSES:
        pps = AWS_RESOLVER_PPS
    burst = burst if burst is not None else config.upstream_burst
    return _worker_budget(config, pps, burst)


def zone_budget(config: Config, zone: ZoneForward,
                endpoint: Endpoint) -> tuple[int | None, int | None]:
    """(pps, burst) for one upstream of a forwarded zone: the zone's own, else the AWS
    resolver default for its addresses, else none (the global flags are for the main pool)."""
    pps = zone.pps
    if pps is None and endpoint.host.lower() in AWS_RESOLVER_ADDRESSES:
        pps = AWS_RESOLVER_PPS
    return _worker_budget(config, pps, zone.burst)


def _worker_budget(config: Config, pps: int | None,
                   burst: int | None) -> tuple[int | None, int | None]:
    if pps is None or config.workers == 1:
        return pps, burst
    # Several workers: each gets its share of the rate and of the burst (the default burst made
    # explicit first), so the host's total stays within the configured pps + burst.
    total_burst = burst if burst is not None else int(default_burst(pps))
    return (worker_share(pps, config.workers, config.worker_index),
            worker_share(total_burst, config.workers, config.worker_index))


def worker_share(total: int, workers: int, index: int) -> int:
    """Worker `index`'s part of `total` split between `workers`: total // workers, plus one
    for the first total % workers workers. The parts add up to exactly `total`; each is at
    least 1 when total >= workers (finalize refuses budgets smaller than that)."""
    if not 0 <= index < workers:
        raise ValueError(f"worker index {index} out of range for {workers} workers")
    return total // workers + (1 if index < total % workers else 0)


def for_worker(config: Config, index: int, default_control: str | None = None) -> Config:
    """The config of worker `index`: its budget share (via worker_index), metrics port + index,
    control path + ".index" (worker 0 keeps the path itself). `default_control` is the control
    path used when none is configured; None there means no control socket for the workers."""
    if config.workers == 1:
        return config
    if not 0 <= index < config.workers:
        raise ConfigError(f"worker index {index}: must be from 0 to {config.workers - 1}")
    metrics = config.metrics
    if metrics is not None and metrics.port != 0:
        metrics = Endpoint(metrics.host, metrics.port + index)
    control = config.control or default_control
    if control is not None and index > 0:
        control = f"{control}.{index}"
    return dataclasses.replace(config, worker_index=index, metrics=metrics, control=control)


_ZONE_KEYS = ("name", "upstream", "pps", "burst")


def zone_name(text: Any) -> str:
    """`Zen.Spamhaus.org` → `zen.spamhaus.org.`; refuses what cannot be a domain name."""
    if not isinstance(text, str) or not text.strip(". "):
        raise ConfigError('zone: name must be a domain name such as "zen.spamhaus.org"')
    name = text.strip().lower().rstrip(".") + "."
    labels = name[:-1].split(".")
    if len(name) > 254 or any(not 0 < len(label) <= 63 for label in labels):
        raise ConfigError(f"zone: '{text}' is not a valid domain name")
    return name


def _zones(value: Any) -> tuple[ZoneForward, ...]:
    out: list[ZoneForward] = []
    for item in _as_list(value):
        if not isinstance(item, Mapping):
            raise ConfigError('zone: write [[zone]] tables with name = "..." and upstream = [...]')
        unknown = sorted(set(item) - set(_ZONE_KEYS))
        if unknown:
            raise ConfigError(f"zone: unknown key '{unknown[0]}' in a [[zone]] table: use "
                              f"{', '.join(_ZONE_KEYS)}")
        if "upstream" not in item:
            raise ConfigError('zone: a [[zone]] table needs upstream = ["HOST:PORT", ...]')
        name = zone_name(item.get("name"))
        if any(z.name == name for z in out):
            raise ConfigError(f"zone: {name} is listed twice")
        upstreams = _endpoints("zone", item["upstream"])
        if not upstreams:
            raise ConfigError(f"zone: {name} needs at least one upstream")
        pps = _number("upstream_pps", item["pps"], int) if "pps" in item else None
        burst = _number("upstream_burst", item["burst"], int) if "burst" in item else None
        out.append(ZoneForward(name, upstreams, pps, burst))
    return tuple(out)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _networks(value: Any) -> tuple[str, ...]:
    out = []
    for item in _as_list(value):
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise ConfigError(f"allow: '{item}' is not a network: write CIDRs such as "
                              "127.0.0.0/8 or ::1/128") from None
    return tuple(out)


def _check_consistency(config: Config) -> None:
    if config.ena_counters_command and config.ena_counters_file:
        raise ConfigError("ena_counters_command: set either it or ena_counters_file, not both")
    if config.min_ttl_seconds > config.max_ttl_seconds:
        raise ConfigError("min_ttl_seconds: must not exceed max_ttl_seconds")
    if config.upstream_timeout_seconds > config.query_deadline_seconds:
        raise ConfigError("upstream_timeout_seconds: must not exceed query_deadline_seconds")


def load(path: str | Path) -> Config:
    """Read and parse a TOML file; every problem becomes one ConfigError line."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    return parse(data, source=str(path))


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """Flags override the file: only values actually given (not None, not empty) apply."""
    given = {k: v for k, v in overrides.items() if v not in (None, (), [])}
    if not given:
        return config
    merged = {f.name: getattr(config, f.name) for f in fields(Config) if f.name not in _NOT_KEYS}
    parsed = parse({k: v for k, v in given.items()}, source="command line")
    for key in given:
        merged[key] = getattr(parsed, key)
    result = dataclasses.replace(config, **{k: merged[k] for k in given})
    _check_consistency(result)
    return result


def resolv_conf_nameservers(text: str) -> tuple[Endpoint, ...]:
    """The `nameserver` lines of a resolv.conf, in order (port 53).

    Scoped link-local IPv6 (fe80::1%eth0) is skipped: our endpoints carry no scope.
    """
    out = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver" and "%" not in parts[1]:
            try:
                out.append(Endpoint(str(ipaddress.ip_address(parts[1])), DNS_PORT))
            except ValueError:
                continue  # not an address; resolv(5) ignores such lines too
    return tuple(out)


def default_listen(ipv6_loopback: bool) -> tuple[Endpoint, ...]:
    base = (Endpoint("127.0.0.1", DNS_PORT),)
    return base + ((Endpoint("::1", DNS_PORT),) if ipv6_loopback else ())


def finalize(config: Config, resolv_conf_text: str | None, ipv6_loopback: bool,
             state_directory_env: str | None = None) -> Config:
    """Fill the defaults that depend on the host, and refuse a forwarding loop.

    `state_directory_env` is $STATE_DIRECTORY: systemd sets it from StateDirectory= (a
    colon-separated list when there are several; the first is ours)."""
    listen = config.listen or default_listen(ipv6_loopback)
    state_directory = config.state_directory
    if state_directory is None and state_directory_env:
        state_directory = state_directory_env.split(":")[0] or None
    upstream = config.upstream
    if not upstream and not config.fallback:
        upstream = resolv_conf_nameservers(resolv_conf_text or "")
        if not upstream:
            raise ConfigError("upstream: none given and /etc/resolv.conf has no nameserver: "
                              "pass --upstream HOST:PORT or set upstream in the config file")
    zoned = tuple(e for zone in config.zone for e in zone.upstream)
    for server in upstream + config.fallback + zoned:
        if any(_same_socket(server, own) for own in listen):
            raise ConfigError(
                f"upstream: {server} is this resolver's own listen address (a forwarding loop); "
                "pass --upstream with your recursive servers (if /etc/resolv.conf points here, "
                "it cannot also be the upstream)")
    if config.workers > 1:
        _check_workers(config, listen, upstream + config.fallback)
    return dataclasses.replace(config, listen=listen, upstream=upstream,
                               state_directory=state_directory)


def _check_workers(config: Config, listen: tuple[Endpoint, ...],
                   upstreams: tuple[Endpoint, ...]) -> None:
    """Workers share ports and budgets: refuse what cannot be shared."""
    for own in listen:
        if own.port == 0:
            raise ConfigError(f"workers: listen {own} has port 0, which each worker would pick "
                              "on its own: give a fixed port")
    for server in upstreams:
        pps, burst = budget_for(dataclasses.replace(config, workers=1), server)
        if pps is None:
            continue
        total_burst = burst if burst is not None else int(default_burst(pps))
        if min(pps, total_burst) < config.workers:
            raise ConfigError(f"workers: {config.workers} workers cannot share the budget of "
                              f"{server} ({pps} packets/s, burst {total_burst}): each needs at "
                              "least 1 of both; use fewer workers or a bigger budget")


def _same_socket(server: Endpoint, own: Endpoint) -> bool:
    if server.port != own.port:
        return False
    a, b = ipaddress.ip_address(server.host), ipaddress.ip_address(own.host)
    if a == b:
        return True
    # A wildcard listener answers on every local address, loopback included.
    return b.is_unspecified and a.version == b.version and (a.is_loopback or a.is_unspecified)
