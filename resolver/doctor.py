"""`resolver doctor`: checks that explain what is wrong with a resolver deployment, and what to do.

Every check is a pure function from facts to a `Check` (name, status, detail, advice); the I/O
that gathers the facts (DNS probes, the control socket, files, `ethtool -S`) is at the edges, in
`Gather`, and every piece of it is injectable so tests feed fake upstreams and fake counters.

Statuses: ok, warn, fail, skipped. Exit code (see `exit_code`): 1 when any check fails, else 0;
warnings alone exit 0 unless `--strict`, which makes them exit 1 too. (2 stays click's "usage
error".)

Traffic rule: DNS probes go only to the --server address, to loopback addresses, or to the
upstreams the resolver is configured with (its control socket or --config); `Gather.query`
refuses anything else, so a typo cannot make the doctor query a stranger.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resolver.core import ena
from resolver.core.model import Endpoint

OK, WARN, FAIL, SKIPPED = "ok", "warn", "fail", "skipped"
STATUSES = (OK, WARN, FAIL, SKIPPED)

DEFAULT_SERVER = "127.0.0.1:53"
DEFAULT_PROBE = (".", "NS")  # in every recursive server's cache: tests reachability, not data
# Spamhaus' permanent test entry: 127.0.0.2 is always listed in zen.spamhaus.org.
DEFAULT_DNSBL_NAME = "2.0.0.127.zen.spamhaus.org"
DEFAULT_TIMEOUT_SECONDS = 2.0
ENA_INTERVAL_SECONDS = 1.0
ETHTOOL_TIMEOUT_SECONDS = 5.0
HEADROOM_WARN = 0.8  # warn when an upstream sends above this share of its budget
SLOW_RTT_MS = 250.0
# Spamhaus return codes that are errors, not listings (www.spamhaus.org/faqs/return-codes).
DNSBL_ERRORS = {
    "127.255.255.252": "typing error in the DNSBL name",
    "127.255.255.254": "query via a public/open resolver refused",
    "127.255.255.255": "excessive number of queries",
}
OPEN_RESOLVER_CODE = "127.255.255.254"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    advice: str = ""

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Probe:
    """What one DNS query got: an rcode and answers, or an error (rcode None)."""

    server: Endpoint
    name: str
    rdtype: str
    rcode: str | None = None
    rtt_ms: float | None = None
    answers: tuple[str, ...] = ()
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.rcode is not None

    def describe(self) -> str:
        if not self.answered:
            return f"{self.name} {self.rdtype}: {self.error}"
        got = ", ".join(self.answers) if self.answers else "no records"
        return f"{self.name} {self.rdtype}: {self.rcode} ({got}) in {self.rtt_ms:.1f} ms"


# -- helpers ----------------------------------------------------------------------------------
def serves(listen: Endpoint, server: Endpoint) -> bool:
    """Whether a socket bound to `listen` receives what is sent to `server`."""
    if listen.port != server.port:
        return False
    a, b = ipaddress.ip_address(listen.host), ipaddress.ip_address(server.host)
    return a == b or (a.is_unspecified and a.version == b.version)


def is_loopback(endpoint: Endpoint) -> bool:
    return ipaddress.ip_address(endpoint.host).is_loopback


def parse_endpoints(texts: Iterable[str]) -> list[Endpoint]:
    from resolver.config import parse_endpoint
    from resolver.errors import ConfigError

    out = []
    for text in texts:
        try:
            out.append(parse_endpoint(text))
        except ConfigError:
            continue
    return out


def dnsbl_zone(name: str) -> str:
    """`2.0.0.127.zen.spamhaus.org` → `zen.spamhaus.org`: the name without its reversed IP."""
    labels = name.rstrip(".").split(".")
    while labels and labels[0].isdigit():
        labels = labels[1:]
    return ".".join(labels) or name


def zone_forward_snippet(zone: str) -> str:
    return (f'[[zone]]\nname = "{zone}"\nupstream = ["10.0.0.53:53"]  '
            "# your own recursive resolver, with a direct path to the internet\npps = 100")


# -- the checks (pure) -----------------------------------------------------------------------
def check_listening(server: Endpoint, probe: Probe, control_path: str,
                    before: dict[str, Any] | None, after: dict[str, Any] | None,
                    control_error: str | None) -> Check:
    """1. Is the resolver the process answering on `server`?

    Evidence: the control socket's `stats` lists the addresses the daemon bound (`listen`), and
    its query counter must go up by our probe (the UDP count is exact)."""
    name = "listening"
    others = (f"Something else may hold the port: `ss -lunp 'sport = :{server.port}'` names it "
              "(often systemd-resolved, dnsmasq, unbound, named or nscd).")
    if control_error is not None:
        if probe.answered:
            return Check(name, WARN,
                         f"{server} answers ({probe.describe()}), but the control socket "
                         f"{control_path} does not ({control_error}), so it cannot be confirmed "
                         "that the answer is this resolver's.",
                         "Pass --control with the resolver's socket (`control` in its config). "
                         + others)
        return Check(name, FAIL,
                     f"nothing answers on {server} ({probe.error}) and no control socket at "
                     f"{control_path} ({control_error}): the resolver does not seem to run.",
                     "Start it (`systemctl start resolver`) and read why it stopped: "
                     "`journalctl -u resolver -n 50`.")
    listen = parse_endpoints((after or before or {}).get("listen") or [])
    ours = any(serves(own, server) for own in listen) if listen else None
    where = ", ".join(map(str, listen)) or "unknown addresses"
    counted = None
    if before is not None and after is not None:
        counted = int(after.get("queries_total", 0)) - int(before.get("queries_total", 0))
    if not probe.answered:
        if ours is False:
            return Check(name, FAIL,
                         f"nothing answers on {server} ({probe.error}); the resolver runs but "
                         f"listens on {where}.",
                         f"Use --server with one of {where}, or set `listen` to include "
                         f"{server} and reload.")
        return Check(name, FAIL,
                     f"the resolver runs (its control socket answers) but {server} gave no "
                     f"answer: {probe.error}.",
                     "Check `allow` (clients outside it get REFUSED), a local firewall, and "
                     "`journalctl -u resolver` for errors.")
    if ours is False or counted == 0:
        why = (f"the resolver listens on {where}" if ours is False
               else "the resolver's query counter did not move for our query")
        return Check(name, FAIL,
                     f"{server} answers ({probe.describe()}) but not from this resolver: {why}. "
                     "Clients sending there bypass the cache.",
                     others + f" Stop it or move it, then make the resolver listen on {server}.")
    proof = f"the control socket reports it listening on {where}"
    if counted is not None:
        proof += " and counted the query"
    status, advice = OK, ""
    if probe.rcode == "REFUSED":
        status = WARN
        advice = ("It answered REFUSED: this client is outside `allow` (default loopback only); "
                  "add its network to `allow` if it should be served.")
    return Check(name, status, f"{server} answers ({probe.describe()}); {proof}.", advice)


def check_resolv_conf(text: str | None, path: str, listen: Sequence[Endpoint],
                      read_error: str | None = None) -> Check:
    """2. Does resolv.conf send the host's lookups (the MTA's) to the resolver first?"""
    from resolver.config import resolv_conf_nameservers

    name = "resolv.conf"
    if text is None:
        return Check(name, FAIL, f"cannot read {path}: {read_error}.",
                     f"Create {path} with `nameserver 127.0.0.1` as its first line.")
    servers = resolv_conf_nameservers(text)
    rotate = any(line.split()[:1] == ["options"] and "rotate" in line.split()
                 for line in text.splitlines())
    if not servers:
        return Check(name, WARN,
                     f"{path} has no nameserver line; glibc then asks 127.0.0.1:53, which works "
                     "only while the resolver listens there.",
                     "Write `nameserver 127.0.0.1` explicitly, so the intent is visible.")
    if not any(s.port == 53 for s in listen):
        return Check(name, FAIL,
                     f"the resolver listens on {', '.join(map(str, listen))}, and resolv.conf "
                     "can only name port 53: the host's lookups cannot reach it.",
                     "Listen on 127.0.0.1:53 (the service unit grants CAP_NET_BIND_SERVICE).")
    points = [i for i, s in enumerate(servers) if any(serves(own, s) for own in listen)]
    listed = ", ".join(s.host for s in servers)
    stub = (" 127.0.0.53 is systemd-resolved's stub: disable its stub listener or point "
            "resolv.conf past it." if any(s.host == "127.0.0.53" for s in servers) else "")
    if not points:
        return Check(name, FAIL,
                     f"{path} names {listed}; none is the resolver "
                     f"({', '.join(map(str, listen))}): the MTA's lookups bypass the cache.",
                     f"Put `nameserver {_first_host(listen)}` first in {path} (with "
                     "systemd-resolved or DHCP managing it, configure it there)." + stub)
    if points[0] != 0:
        return Check(name, FAIL,
                     f"{path} names {listed}; the resolver is not first, so it is asked only "
                     "after the others time out: the MTA's lookups bypass the cache.",
                     f"Move `nameserver {servers[points[0]].host}` to the top." + stub)
    if len(servers) > 1 or rotate:
        extra = ", ".join(s.host for s in servers[1:])
        why = ("`options rotate` spreads lookups over all of them" if rotate
               else f"glibc falls over to {extra} when the resolver is slow or down")
        return Check(name, WARN,
                     f"{path} names the resolver first, then {extra or 'nothing'}: {why}, and "
                     "those lookups bypass the cache and its upstream budgets.",
                     "Keep only the resolver; it has fallbacks of its own (`fallback`). "
                     "Remove `options rotate` if present.")
    return Check(name, OK, f"{path} names only the resolver ({servers[0].host}).")


def _first_host(listen: Sequence[Endpoint]) -> str:
    return next((e.host for e in listen if e.port == 53 and not
                 ipaddress.ip_address(e.host).is_unspecified), "127.0.0.1")


def check_upstream(probe: Probe, role: str = "") -> Check:
    """3. Can this upstream answer one query? RTT shown."""
    name = f"upstream {probe.server}" + (f" ({role})" if role else "")
    if not probe.answered:
        return Check(name, FAIL,
                     f"no answer to {probe.describe()}: misses sent there wait for the "
                     "timeout and then go elsewhere, or end in SERVFAIL.",
                     "Check the path: security group and network ACL (UDP and TCP 53 both "
                     "ways), the upstream's own ACL, and whether it is dropping us for rate "
                     "(`resolver upstreams`, the ENA counters below).")
    if probe.rcode == "REFUSED":
        return Check(name, FAIL, f"refuses us: {probe.describe()}.",
                     "Add this host's address to the upstream's allowed clients.")
    if probe.rcode == "SERVFAIL":
        return Check(name, WARN, f"answered SERVFAIL: {probe.describe()}; it is reachable but "
                     "cannot resolve (its own upstreams or DNSSEC validation are failing).",
                     "Look at the upstream's logs; try --probe-name with a name you know.")
    if probe.rtt_ms is not None and probe.rtt_ms > SLOW_RTT_MS:
        return Check(name, WARN, f"slow: {probe.describe()}.",
                     "A nearby resolver answers cached names in a few ms: check its load and "
                     "the network path.")
    return Check(name, OK, f"answers: {probe.describe()}.")


def check_budget(row: dict[str, Any]) -> Check:
    """4. Headroom between the current send rate and the upstream's budget."""
    name = f"budget {row.get('upstream')}"
    send = float(row.get("send_pps") or 0.0)
    rate = row.get("rate_pps")
    configured, learned = row.get("configured_pps"), row.get("learned_pps")
    if rate is None:
        return Check(name, OK, f"sending {send:g} packets/s; no budget is set for it.",
                     "" if send < 1000 else
                     "Set `upstream_pps` (or `pps` in its [[upstream]] table) to its known "
                     "limit, so a flood of misses cannot get us dropped.")
    share = send / rate if rate else 1.0
    origin = (f"learned {learned:g} (configured {configured})"
              if learned is not None and configured is not None and learned < configured
              else f"configured {rate:g}")
    detail = f"sending {send:g} packets/s of {rate:g} allowed ({origin}): {share:.0%} used"
    denied = int(row.get("tokens_denied") or 0)
    if denied:
        detail += f"; {denied} sends were denied by the budget since start"
    if share >= HEADROOM_WARN:
        return Check(name, WARN, detail + f", above {HEADROOM_WARN:.0%}.",
                     "Above the budget misses queue, then get stale answers or SERVFAIL. Raise "
                     "the hit ratio (`resolver stats`), spread load over more upstreams, or, "
                     "if the upstream can take it, raise its `pps`. The VPC resolver cannot go "
                     "above 1024 packets/s per interface.")
    return Check(name, OK, detail + ".")


_ENA_MEANING = {
    ena.LINKLOCAL: ("packets to link-local services (the VPC resolver 169.254.169.253, "
                    "instance metadata, time sync) dropped above 1024 packets/s per network "
                    "interface"),
    ena.PPS: "packets dropped because the instance exceeded its packets-per-second allowance",
}


def check_ena(first: dict[str, int] | None, second: dict[str, int] | None, source: str,
              skip_reason: str | None = None, link_local_upstream: bool = False) -> Check:
    """5. ENA allowance counters: non-zero means drops happened; rising means they happen now."""
    name = "ena counters"
    if first is None:
        return Check(name, SKIPPED, skip_reason or "no counters read.")
    present = [c for c in (ena.LINKLOCAL, ena.PPS) if c in first]
    if not present:
        return Check(name, SKIPPED, f"{source} has no {ena.LINKLOCAL} or {ena.PPS} counter: "
                     "not an ENA interface (AWS) or an old driver; nothing to check here.")
    rising = ena.increases(first, second) if second is not None else {}
    nonzero = {c: first[c] for c in present if first[c]}
    if not nonzero and not rising:
        return Check(name, OK, f"{source}: " + ", ".join(f"{c} 0" for c in present) +
                     ": the hypervisor has dropped no packets for allowances.")
    parts = []
    for counter in present:
        value = (second or first).get(counter, first[counter])
        if value or counter in rising:
            text = f"{counter} = {value}"
            if counter in rising:
                text += f" (+{rising[counter]} during the check: dropping now)"
            parts.append(f"{text}: {_ENA_MEANING[counter]}")
    advice = []
    if ena.LINKLOCAL in nonzero or ena.LINKLOCAL in rising:
        advice.append("Link-local drops hit the VPC resolver" +
                      (" (one of our upstreams)" if link_local_upstream else "") +
                      ": keep its budget below 1024 packets/s per interface (`pps` 900 is the "
                      "default for 169.254.169.253), raise the hit ratio, or repoint to "
                      "resolvers of your own (`upstream`, then `resolver repoint primary`).")
    if ena.PPS in nonzero or ena.PPS in rising:
        advice.append("Instance pps drops hit every destination: lower the packet rate (budgets, "
                      "cache) or move to a larger instance type.")
    advice.append("The counters only grow until the driver reloads; what matters is an "
                  "increase: watch `resolver_ena_allowance_exceeded_total` or run the doctor "
                  "again.")
    status = FAIL if rising else WARN
    meaning = "they are rising now" if rising else "drops happened since the driver loaded"
    return Check(name, status, f"{source}: " + "; ".join(parts) + f". {meaning.capitalize()}.",
                 " ".join(advice))


def check_dnsbl(probe: Probe, role: str = "") -> Check:
    """6. The mail trap: DNSBLs refuse queries arriving through shared public/cloud resolvers."""
    name = f"dnsbl via {probe.server}" + (f" ({role})" if role else "")
    zone = dnsbl_zone(probe.name)
    snippet = zone_forward_snippet(zone)
    if not probe.answered:
        return Check(name, WARN, f"no answer to {probe.describe()}; blocklist lookups through "
                     "this upstream time out, so the MTA's DNSBL checks do not protect it.",
                     "See the upstream check above; then run the doctor again.")
    codes = [a for a in probe.answers if a in DNSBL_ERRORS]
    if OPEN_RESOLVER_CODE in codes:
        return Check(name, FAIL,
                     f"{probe.describe()}: {OPEN_RESOLVER_CODE} is Spamhaus' \"query via "
                     "public/open resolver refused\". Every lookup in this zone through this "
                     "upstream gets this code instead of real data: an MTA that treats any "
                     "127.x answer as listed rejects good mail; one that filters it accepts "
                     "spam unchecked.",
                     f"Send {zone} to a resolver of your own that queries the blocklist "
                     "directly (not through the VPC resolver or a public one), with a per-zone "
                     f"forward in the config file:\n{snippet}\n(or use Spamhaus DQS with a "
                     "key.)")
    if codes:
        return Check(name, WARN, f"{probe.describe()}: {codes[0]} means "
                     f"\"{DNSBL_ERRORS[codes[0]]}\"; the blocklist does not answer normally.",
                     "Check the DNSBL name (--dnsbl-name) and your query volume to it; a "
                     f"per-zone forward to a resolver of your own helps:\n{snippet}")
    if probe.rcode == "NXDOMAIN" or not probe.answers:
        return Check(name, WARN, f"{probe.describe()}: the test entry should be listed; the "
                     "blocklist may be answering this upstream with nothing (some silently "
                     "block shared resolvers).",
                     "Confirm --dnsbl-name is the list's test point; if it is, forward the "
                     f"zone to a resolver of your own:\n{snippet}")
    return Check(name, OK, f"{probe.describe()}: the blocklist answers this upstream.")


def exit_code(checks: Iterable[Check], strict: bool = False) -> int:
    statuses = {c.status for c in checks}
    if FAIL in statuses or (strict and WARN in statuses):
        return 1
    return 0


def summary(checks: Sequence[Check]) -> dict[str, int]:
    return {status: sum(c.status == status for c in checks) for status in STATUSES}


# -- the edges (I/O) --------------------------------------------------------------------------
def udp_probe(server: Endpoint, name: str, rdtype: str, timeout: float) -> Probe:
    """One UDP query with EDNS; never raises for network trouble."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    request = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
    started = time.monotonic()
    try:
        response = dns.query.udp(request, server.host, timeout=timeout, port=server.port)
    except dns.exception.Timeout:
        return Probe(server, name, rdtype, error=f"no answer within {timeout:g} s")
    except OSError as e:
        return Probe(server, name, rdtype, error=f"{e.strerror or e} (nothing listening?)")
    except dns.exception.DNSException as e:
        return Probe(server, name, rdtype, error=f"unusable reply: {e}")
    rtt = (time.monotonic() - started) * 1000
    wanted = dns.rdatatype.from_text(rdtype)
    answers = tuple(r.to_text() for rrset in response.answer if rrset.rdtype == wanted
                    for r in rrset)
    return Probe(server, name, rdtype, dns.rcode.to_text(response.rcode()), round(rtt, 1),
                 answers)


def read_ethtool(command: str | None, file: str | None) -> tuple[str | None, str]:
    """(text or None, source description or the reason there is none)."""
    if file:
        try:
            return Path(file).read_text(), file
        except OSError as e:
            return None, f"cannot read {file}: {e.strerror or e}"
    if command:
        argv = shlex.split(command)
        if not argv or shutil.which(argv[0]) is None:
            return None, f"`{command}`: {argv[0] if argv else 'command'} is not installed"
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=ETHTOOL_TIMEOUT_SECONDS)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"`{command}` failed: {e}"
        if done.returncode != 0:
            return None, f"`{command}` exited {done.returncode}: " \
                         f"{(done.stderr or done.stdout).strip()[:200]}"
        return done.stdout, f"`{command}`"
    return None, "no ethtool source"


def default_interface(route_table: str = "/proc/net/route") -> str | None:
    """The interface of the IPv4 default route, or None."""
    try:
        lines = Path(route_table).read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) > 2 and parts[1] == "00000000":
            return parts[0]
    return None


@dataclass
class Options:
    server: Endpoint
    control_path: str | None
    resolv_conf: str = "/etc/resolv.conf"
    upstreams: list[tuple[Endpoint, str]] = field(default_factory=list)  # from --config
    config_error: str | None = None
    ethtool_command: str | None = None
    ethtool_file: str | None = None
    probe: tuple[str, str] = DEFAULT_PROBE
    dnsbl_name: str | None = DEFAULT_DNSBL_NAME
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    ena_interval: float = ENA_INTERVAL_SECONDS


class NotAllowed(RuntimeError):
    """A probe to an address that is neither loopback, the server, nor a configured upstream."""


@dataclass
class Gather:
    """Runs the checks: gathers facts through injectable functions, hands them to the checks."""

    options: Options
    probe: Callable[[Endpoint, str, str, float], Probe] = udp_probe
    control: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    ethtool: Callable[[str | None, str | None], tuple[str | None, str]] = read_ethtool
    sleep: Callable[[float], None] = time.sleep
    allowed: set[Endpoint] = field(default_factory=set)

    def query(self, server: Endpoint, name: str, rdtype: str) -> Probe:
        if not (is_loopback(server) or server in self.allowed or server == self.options.server):
            raise NotAllowed(f"refusing to query {server}: not loopback, not configured")
        return self.probe(server, name, rdtype, self.options.timeout)

    def ask(self, request: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        from resolver.daemon import control

        call = self.control or control.call
        try:
            path = control.path_or_default(self.options.control_path)
            reply = call(path, request)
        except control.NotRunning:
            return None, "not running or no such socket"
        except (OSError, ValueError) as e:
            return None, str(e)
        if "error" in reply:
            return None, str(reply["error"])
        return reply, None

    def control_path(self) -> str:
        from resolver.daemon import control

        return self.options.control_path or control.DEFAULT_PATH

    def run(self) -> list[Check]:
        opts = self.options
        checks: list[Check] = []
        if opts.config_error:
            checks.append(Check("config", FAIL, opts.config_error,
                                "Fix the file: `resolver serve --config FILE` refuses it too."))
        # 1. listening
        before, error = self.ask({"command": "stats"})
        probe = self.query(opts.server, *opts.probe)
        after, _ = self.ask({"command": "stats"}) if before is not None else (None, None)
        checks.append(check_listening(opts.server, probe, self.control_path(), before, after,
                                      error))
        listen = parse_endpoints((after or before or {}).get("listen") or []) or [opts.server]
        # 2. resolv.conf ('' skips it: e.g. a test resolver on a port resolv.conf cannot name)
        if not opts.resolv_conf:
            checks.append(Check("resolv.conf", SKIPPED, "--resolv-conf '' given."))
        else:
            checks.append(self.resolv_conf_check(listen))
        self.upstream_checks(checks)
        return checks

    def resolv_conf_check(self, listen: list[Endpoint]) -> Check:
        opts = self.options
        try:
            text, read_error = Path(opts.resolv_conf).read_text(), None
        except OSError as e:
            text, read_error = None, e.strerror or str(e)
        return check_resolv_conf(text, opts.resolv_conf, listen, read_error)

    def upstream_checks(self, checks: list[Check]) -> None:
        opts = self.options
        # 3. upstreams: the running daemon's list, then any from --config it does not have
        reply, up_error = self.ask({"command": "upstreams"})
        rows = (reply or {}).get("upstreams", [])
        upstreams: list[tuple[Endpoint, str]] = []
        for row in rows:
            for endpoint in parse_endpoints([row.get("upstream", "")]):
                upstreams.append((endpoint, str(row.get("role", ""))))
        for endpoint, role in opts.upstreams:
            if endpoint not in {e for e, _ in upstreams}:
                upstreams.append((endpoint, role))
        self.allowed |= {e for e, _ in upstreams}
        if not upstreams:
            checks.append(Check("upstreams", SKIPPED,
                                f"no upstreams known: the control socket gave none "
                                f"({up_error or 'empty list'}) and no --config was given.",
                                "Pass --control or --config."))
        for endpoint, role in upstreams:
            checks.append(check_upstream(self.query(endpoint, *opts.probe), role))
        # 4. budget headroom
        if reply is None:
            checks.append(Check("budget", SKIPPED,
                                f"needs the control socket's current send rates ({up_error})."))
        for row in rows:
            checks.append(check_budget(row))
        # 5. ENA counters
        checks.append(self.ena_check(upstreams))
        # 6. DNSBL through each upstream
        if opts.dnsbl_name:
            for endpoint, role in upstreams:
                checks.append(check_dnsbl(self.query(endpoint, opts.dnsbl_name, "A"), role))

    def ena_check(self, upstreams: list[tuple[Endpoint, str]]) -> Check:
        opts = self.options
        command, file = opts.ethtool_command, opts.ethtool_file
        if not command and not file:
            iface = default_interface()
            if iface is None:
                return check_ena(None, None, "", "no default route interface to ask ethtool "
                                 "about; pass --ethtool-command or --ethtool-file.")
            command = f"ethtool -S {iface}"
        text, source = self.ethtool(command, file)
        if text is None:
            return check_ena(None, None, "", f"{source}; pass --ethtool-command "
                             "'ethtool -S IFACE' or --ethtool-file to check ENA counters.")
        first = ena.parse_ethtool(text)
        second = None
        if any(c in first for c in (ena.LINKLOCAL, ena.PPS)) and opts.ena_interval > 0:
            self.sleep(opts.ena_interval)
            text2, _ = self.ethtool(command, file)
            second = ena.parse_ethtool(text2) if text2 is not None else None
        link_local = any(ipaddress.ip_address(e.host).is_link_local
                         or e.host in ("fd00:ec2::253",) for e, _ in upstreams)
        return check_ena(first, second, source, link_local_upstream=link_local)


# -- rendering ----------------------------------------------------------------------------------
_MARK = {OK: "[ ok ]", WARN: "[warn]", FAIL: "[FAIL]", SKIPPED: "[skip]"}


def render(checks: Sequence[Check], code: int) -> str:
    lines = []
    for check in checks:
        lines.append(f"{_MARK[check.status]} {check.name}: {check.detail}")
        if check.advice:
            advice = check.advice.splitlines()
            lines.append(f"       -> {advice[0]}")
            lines.extend(f"          {line}" for line in advice[1:])
    counts = summary(checks)
    lines.append("")
    lines.append(", ".join(f"{n} {status}" for status, n in counts.items()) +
                 f"; exit {code}")
    return "\n".join(lines)


def as_json(checks: Sequence[Check], code: int) -> dict[str, Any]:
    return {"checks": [c.as_dict() for c in checks], "summary": summary(checks),
            "exit_code": code}


# -- the command ------------------------------------------------------------------------------
def options_from(server: str | None, control_path: str | None, config_path: str | None,
                 resolv_conf: str, ethtool_command: str | None, ethtool_file: str | None,
                 probe_name: str, probe_type: str, dnsbl_name: str, timeout: float,
                 ena_interval: float, ipv6_loopback: bool) -> Options:
    """Flags, then the config file's `listen`, `control`, upstreams and ENA source."""
    from resolver import config as config_mod
    from resolver.errors import ConfigError

    upstreams: list[tuple[Endpoint, str]] = []
    config_error = None
    if config_path:
        try:
            cfg = config_mod.load(config_path)
        except ConfigError as e:
            cfg, config_error = None, str(e)
        if cfg is not None:
            control_path = control_path or cfg.control
            if server is None and cfg.listen:
                server = str(cfg.listen[0])
            if not ethtool_command and not ethtool_file:
                ethtool_command, ethtool_file = cfg.ena_counters_command, cfg.ena_counters_file
            try:
                text = Path(resolv_conf).read_text()
            except OSError:
                text = None
            try:
                cfg = config_mod.finalize(cfg, text, ipv6_loopback)
            except ConfigError as e:
                config_error = str(e)
            upstreams = ([(e, "primary") for e in cfg.upstream] +
                         [(e, "fallback") for e in cfg.fallback])
    endpoint = config_mod.parse_endpoint(server or DEFAULT_SERVER, key="--server")
    return Options(endpoint, control_path, resolv_conf, upstreams, config_error,
                   ethtool_command, ethtool_file, (probe_name, probe_type.upper()),
                   dnsbl_name or None, timeout, ena_interval)


def _command() -> Any:
    import json

    import click

    @click.command("doctor")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False),
                  help="The resolver's TOML config: its upstreams, listen, control, ENA source.")
    @click.option("--control", "control_path", metavar="PATH",
                  help="Control socket. Default: the config's `control`, else "
                       "/run/resolver/control.sock.")
    @click.option("--server", metavar="HOST:PORT",
                  help=f"Where the resolver should answer. Default: the config's first "
                       f"`listen`, else {DEFAULT_SERVER}.")
    @click.option("--resolv-conf", default="/etc/resolv.conf", show_default=True,
                  metavar="PATH", help="The resolv.conf the MTA reads ('' skips the check).")
    @click.option("--ethtool-command", metavar="CMD",
                  help="e.g. 'ethtool -S eth0'. Default: the config's source, else ethtool -S "
                       "on the default route's interface.")
    @click.option("--ethtool-file", type=click.Path(dir_okay=False), metavar="PATH",
                  help="A file holding `ethtool -S` output instead of a command.")
    @click.option("--probe-name", default=DEFAULT_PROBE[0], show_default=True,
                  help="Name each upstream is asked (one query each).")
    @click.option("--probe-type", default=DEFAULT_PROBE[1], show_default=True)
    @click.option("--dnsbl-name", default=DEFAULT_DNSBL_NAME, show_default=True,
                  help="DNSBL test entry asked through each upstream; '' skips the check.")
    @click.option("--timeout", default=DEFAULT_TIMEOUT_SECONDS, show_default=True,
                  help="Seconds to wait for each DNS answer.")
    @click.option("--ena-interval", default=ENA_INTERVAL_SECONDS, show_default=True,
                  help="Seconds between the two ENA counter reads (0: read once).")
    @click.option("--strict", is_flag=True, help="Exit 1 on warnings too.")
    @click.option("--json", "as_json_flag", is_flag=True, help="Print the checks as JSON.")
    def doctor(config_path: str | None, control_path: str | None, server: str | None,
               resolv_conf: str, ethtool_command: str | None, ethtool_file: str | None,
               probe_name: str, probe_type: str, dnsbl_name: str, timeout: float,
               ena_interval: float, strict: bool, as_json_flag: bool) -> None:
        """Check the deployment and explain problems: listener, resolv.conf, upstreams,
        budget headroom, ENA counters, DNSBL refusals. Exit 1 when a check fails (warnings:
        exit 0, or 1 with --strict)."""
        from resolver.cli import _ipv6_loopback
        from resolver.errors import ConfigError

        if ethtool_command and ethtool_file:
            raise click.UsageError("give --ethtool-command or --ethtool-file, not both")
        try:
            options = options_from(server, control_path, config_path, resolv_conf,
                                   ethtool_command, ethtool_file, probe_name, probe_type,
                                   dnsbl_name, timeout, ena_interval, _ipv6_loopback())
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
        checks = Gather(options).run()
        code = exit_code(checks, strict)
        if as_json_flag:
            click.echo(json.dumps(as_json(checks, code), indent=2))
        else:
            click.echo(render(checks, code))
        sys.exit(code)

    return doctor


command = _command()
