"""A mail-shaped test zone and a knotd that serves it, for integration tests and benchmarks.

Everything here is deterministic for a given ``(origin, n_domains, seed)`` so a benchmark run
and a test run see the same data, and a failing test can be reproduced by hand with
``knotd -c <tmpdir>/knot.conf``.

Zone contents (``generate_zone``), with ``O`` the origin (default ``test.``):

- ``O`` SOA ``ns1.O hostmaster.O 1 3600 900 604800 300`` with TTL ``SOA_TTL`` (600), NS ``ns1.O``.
  RFC 2308 section 5: the negative-caching TTL is min(SOA TTL, SOA MINIMUM) = ``NEGATIVE_TTL``
  (300). The two differ on purpose so a resolver that takes only one of them is caught.
- for each ``i`` in ``range(n_domains)``, ``d{i}.O``:
  MX 10 ``mx1.d{i}``, MX 20 ``mx2.d{i}`` (``TTL_MX``); A and AAAA for both MX hosts
  (``TTL_ADDRESS``); TXT SPF (``TTL_TXT``); ``_dmarc.d{i}`` TXT; ``sel1._domainkey.d{i}`` TXT,
  a DKIM-like key of about 400 characters split into 255-character strings;
  ``_25._tcp.mx1.d{i}`` TLSA 3 1 1 (``TTL_TLSA``); ``www.d{i}`` CNAME ``alias.d{i}`` CNAME
  ``mx1.d{i}`` (``TTL_CNAME``), so the answer to ``www.d{i} A`` is the whole chain plus an A.
- ``big.O`` TXT: ``BIG_TXT_COUNT`` strings of ``BIG_TXT_LENGTH`` characters (about 1.9 kB of
  rdata), more than an EDNS payload of 1232 (RFC 9715 / DNS flag day 2020) so it comes back
  truncated over UDP and whole over TCP.
- ``nodata.O`` has only an A record: ``nodata.O MX`` is NODATA (NOERROR, empty answer, SOA).
- Any other name under ``O`` (e.g. ``nx1.O``) is NXDOMAIN.

``generate_reverse_zone`` makes ``2.0.192.in-addr.arpa.``: ``mx1.d{i}`` has address
``192.0.2.{i + 1}`` for the first 254 domains, and each of those has a PTR back to it
(``TTL_PTR``). Hosts beyond that use 10.0.0.0/8 addresses without PTR records.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

DEFAULT_ORIGIN = "test."
REVERSE_ORIGIN = "2.0.192.in-addr.arpa."

# TTLs, in seconds. Address records get a short TTL because that is what mailbox providers
# publish for their MX hosts, so the cache sees both short and long lifetimes in one workload.
SOA_TTL = 600
SOA_MINIMUM = 300
NEGATIVE_TTL = min(SOA_TTL, SOA_MINIMUM)  # RFC 2308 section 5
TTL_NS = 3600
TTL_MX = 3600
TTL_ADDRESS = 300
TTL_TXT = 3600
TTL_TLSA = 3600
TTL_CNAME = 3600
TTL_PTR = 3600

# The big TXT RRset: 8 strings of 240 characters is 1928 bytes of rdata, above both 1232 (the
# EDNS payload everyone advertises since DNS flag day 2020) and a 1500-byte Ethernet MTU.
BIG_TXT_COUNT = 8
BIG_TXT_LENGTH = 240

# The first 254 domains have their mx1 host in 192.0.2.0/24 (RFC 5737), with PTR records.
REVERSE_HOSTS = 254

DKIM_KEY_CHARS = 392  # base64 of a 2048-bit RSA public key is about this long
TXT_STRING_MAX = 255  # RFC 1035 section 3.3: one character-string is at most 255 octets

READY_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0


def _relative(origin: str) -> str:
    """The origin with a trailing dot, lower-cased, so names compose predictably."""
    origin = origin.lower()
    return origin if origin.endswith(".") else origin + "."


def mx1_ipv4(i: int) -> str:
    """The IPv4 address of ``mx1.d{i}``: 192.0.2.x (with a PTR) for the first 254 domains."""
    if i < REVERSE_HOSTS:
        return f"192.0.2.{i + 1}"
    return f"10.1.{(i >> 8) & 0xFF}.{i & 0xFF}"


def mx2_ipv4(i: int) -> str:
    """The IPv4 address of ``mx2.d{i}``: always in 10.2.0.0/16, no PTR."""
    return f"10.2.{(i >> 8) & 0xFF}.{i & 0xFF}"


def mx1_ipv6(i: int) -> str:
    """The IPv6 address of ``mx1.d{i}`` (RFC 3849 documentation prefix)."""
    return f"2001:db8::1:{i:x}"


def mx2_ipv6(i: int) -> str:
    """The IPv6 address of ``mx2.d{i}`` (RFC 3849 documentation prefix)."""
    return f"2001:db8::2:{i:x}"


def _quote_strings(text: str) -> str:
    """``text`` as a TXT rdata of quoted character-strings of at most 255 characters each."""
    chunks = [text[start : start + TXT_STRING_MAX] for start in range(0, len(text), TXT_STRING_MAX)]
    return " ".join(f'"{chunk}"' for chunk in chunks)


def dkim_text(i: int, seed: int = 1) -> str:
    """The DKIM-like TXT value of ``sel1._domainkey.d{i}`` (deterministic from seed and i)."""
    rng = random.Random(seed * 1_000_003 + i)
    key = base64.b64encode(rng.randbytes(DKIM_KEY_CHARS * 3 // 4)).decode("ascii")
    return f"v=DKIM1; k=rsa; p={key}"


def spf_text(i: int) -> str:
    """The SPF TXT value of ``d{i}``."""
    return f"v=spf1 mx a:mx1.d{i} ip4:{mx1_ipv4(i)} ip6:{mx1_ipv6(i)} ~all"


def dmarc_text(i: int) -> str:
    """The DMARC TXT value of ``_dmarc.d{i}``."""
    return f"v=DMARC1; p=quarantine; rua=mailto:dmarc@d{i}; pct=100"


def tlsa_digest(i: int, seed: int = 1) -> str:
    """The SHA-256-sized hex digest of ``_25._tcp.mx1.d{i}`` TLSA 3 1 1."""
    rng = random.Random(seed * 7_000_003 + i)
    return rng.randbytes(32).hex()


def big_txt_strings(origin: str = DEFAULT_ORIGIN) -> list[str]:
    """The character-strings of ``big.<origin>`` TXT, one per record."""
    return [f"{n:02d}" + chr(ord("a") + n) * (BIG_TXT_LENGTH - 2) for n in range(BIG_TXT_COUNT)]


def _soa_lines(zone_origin: str, forward_origin: str) -> list[str]:
    """$ORIGIN, SOA and NS lines; the SOA and NS names live in the forward zone."""
    return [
        f"$ORIGIN {zone_origin}",
        f"$TTL {TTL_NS}",
        # serial refresh retry expire minimum; MINIMUM caps the negative TTL (RFC 2308).
        f"@ {SOA_TTL} IN SOA ns1.{forward_origin} hostmaster.{forward_origin} "
        f"1 3600 900 604800 {SOA_MINIMUM}",
        f"@ {TTL_NS} IN NS ns1.{forward_origin}",
    ]


def generate_zone(origin: str = DEFAULT_ORIGIN, n_domains: int = 200, seed: int = 1) -> str:
    """Zone-file text for ``origin`` with ``n_domains`` mail domains (see the module docstring).

    SOA: serial 1, refresh 3600, retry 900, expire 604800, MINIMUM ``SOA_MINIMUM`` (300), SOA
    TTL ``SOA_TTL`` (600); negative answers are therefore cached for ``NEGATIVE_TTL`` (300).
    """
    origin = _relative(origin)
    lines = _soa_lines(origin, origin)
    lines += [
        f"ns1 {TTL_ADDRESS} IN A 127.0.0.1",
        f"nodata {TTL_ADDRESS} IN A 192.0.2.255",
    ]
    lines += [f"big {TTL_TXT} IN TXT {_quote_strings(text)}" for text in big_txt_strings(origin)]
    for i in range(n_domains):
        d = f"d{i}"
        lines += [
            f"{d} {TTL_MX} IN MX 10 mx1.{d}",
            f"{d} {TTL_MX} IN MX 20 mx2.{d}",
            f"{d} {TTL_TXT} IN TXT {_quote_strings(spf_text(i))}",
            f"mx1.{d} {TTL_ADDRESS} IN A {mx1_ipv4(i)}",
            f"mx1.{d} {TTL_ADDRESS} IN AAAA {mx1_ipv6(i)}",
            f"mx2.{d} {TTL_ADDRESS} IN A {mx2_ipv4(i)}",
            f"mx2.{d} {TTL_ADDRESS} IN AAAA {mx2_ipv6(i)}",
            f"_dmarc.{d} {TTL_TXT} IN TXT {_quote_strings(dmarc_text(i))}",
            f"sel1._domainkey.{d} {TTL_TXT} IN TXT {_quote_strings(dkim_text(i, seed))}",
            f"_25._tcp.mx1.{d} {TTL_TLSA} IN TLSA 3 1 1 {tlsa_digest(i, seed)}",
            f"www.{d} {TTL_CNAME} IN CNAME alias.{d}",
            f"alias.{d} {TTL_CNAME} IN CNAME mx1.{d}",
        ]
    return "\n".join(lines) + "\n"


def generate_reverse_zone(origin: str = DEFAULT_ORIGIN, n_domains: int = 200, seed: int = 1) -> str:
    """Zone-file text for ``2.0.192.in-addr.arpa.``: a PTR for each ``mx1.d{i}`` in 192.0.2/24.

    ``origin`` is the forward zone the PTRs point into; ``seed`` is accepted for symmetry with
    ``generate_zone`` (the reverse zone has nothing random in it).
    """
    del seed  # nothing random here; the parameter keeps the two generators interchangeable
    origin = _relative(origin)
    lines = _soa_lines(REVERSE_ORIGIN, origin)
    for i in range(min(n_domains, REVERSE_HOSTS)):
        lines.append(f"{i + 1} {TTL_PTR} IN PTR mx1.d{i}.{origin}")
    return "\n".join(lines) + "\n"


def reverse_name(ipv4: str) -> str:
    """The in-addr.arpa name of an IPv4 address (RFC 1035 section 3.5)."""
    return ".".join(reversed(ipv4.split("."))) + ".in-addr.arpa."


def query_names(origin: str = DEFAULT_ORIGIN, n_domains: int = 200) -> list[tuple[str, str]]:
    """(name, type) pairs covering every record type in the zones, for dnsperf query files.

    Per domain: MX, A and AAAA of both MX hosts, SPF TXT, DMARC TXT, DKIM TXT, TLSA, the CNAME
    chain (``www`` A), and the PTR of mx1 when it has one. Then, once each: the big TXT, a
    NODATA and an NXDOMAIN question, so negative caching is exercised too.
    """
    origin = _relative(origin)
    names: list[tuple[str, str]] = []
    for i in range(n_domains):
        d = f"d{i}.{origin}"
        names += [
            (d, "MX"),
            (f"mx1.{d}", "A"),
            (f"mx1.{d}", "AAAA"),
            (f"mx2.{d}", "A"),
            (f"mx2.{d}", "AAAA"),
            (d, "TXT"),
            (f"_dmarc.{d}", "TXT"),
            (f"sel1._domainkey.{d}", "TXT"),
            (f"_25._tcp.mx1.{d}", "TLSA"),
            (f"www.{d}", "A"),
        ]
        if i < REVERSE_HOSTS:
            names.append((reverse_name(mx1_ipv4(i)), "PTR"))
    names += [
        (f"big.{origin}", "TXT"),
        (f"nodata.{origin}", "MX"),
        (f"nx1.{origin}", "A"),
    ]
    return names


def find_knotd() -> str | None:
    """The path of knotd, or None when it is not installed (Debian puts it in /usr/sbin)."""
    found = shutil.which("knotd")
    if found:
        return found
    return "/usr/sbin/knotd" if os.access("/usr/sbin/knotd", os.X_OK) else None


def free_port(address: str = "127.0.0.1") -> int:
    """An ephemeral port that is free for both UDP and TCP on ``address`` right now.

    There is a window between closing these sockets and the server binding the port; callers
    that start a server on it must detect a failed bind (Knot.start does, by polling).
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for _attempt in range(20):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port = udp.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {address}")


def wait_until_answers(
    address: str,
    port: int,
    qname: str,
    rdtype: str = "SOA",
    timeout_seconds: float = READY_TIMEOUT_SECONDS,
    process: subprocess.Popen[bytes] | None = None,
    accept_any_rcode: bool = False,
) -> dns.message.Message:
    """Poll ``address:port`` over UDP until it answers ``qname rdtype`` with NOERROR/NXDOMAIN.

    With ``accept_any_rcode`` any reply will do (a resolver whose upstream fails still proves
    it is listening by answering SERVFAIL). Raises RuntimeError if ``process`` exits or the
    time runs out. Each try waits at most 0.2 s, the whole wait at most ``timeout_seconds``.
    """
    deadline = time.monotonic() + timeout_seconds
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with status {process.returncode} before ready")
        query = dns.message.make_query(qname, rdtype)
        try:
            reply = dns.query.udp(query, address, port=port, timeout=0.2)
        except (dns.exception.DNSException, OSError) as error:
            last_error = error
            # A refused port makes udp() fail at once; pause briefly so we do not spin.
            time.sleep(0.05)
            continue
        if accept_any_rcode or reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return reply
        last_error = RuntimeError(f"rcode {dns.rcode.to_text(reply.rcode())}")
        time.sleep(0.05)
    raise RuntimeError(f"{address}@{port} did not answer {qname} {rdtype}: {last_error!r}")


def _knot_conf(workdir: Path, address: str, port: int, zones: dict[str, Path], workers: int) -> str:
    zone_lines: list[str] = []
    for origin, path in zones.items():
        zone_lines += [f"  - domain: {origin}", f'    file: "{path}"']
    return "\n".join(
        [
            "server:",
            f'    rundir: "{workdir}"',
            f"    listen: {address}@{port}",
            f"    udp-workers: {workers}",
            f"    tcp-workers: {workers}",
            "    background-workers: 1",
            # Root is Knot's default user; stating it keeps a non-root run from surprising us.
            "    user: root:root",
            "log:",
            "  - target: stderr",
            "    any: info",
            "database:",
            f'    storage: "{workdir}"',
            "template:",
            "  - id: default",
            f'    storage: "{workdir}"',
            # The zone files are the whole truth: no journal, no writing the zone back.
            "    zonefile-load: whole",
            "    journal-content: none",
            "    zonefile-sync: -1",
            "    semantic-checks: on",
            "zone:",
            *zone_lines,
            "",
        ]
    )


class Knot:
    """knotd serving ``generate_zone`` and ``generate_reverse_zone`` on loopback.

    Use as a context manager; ``.address`` and ``.port`` say where it listens (UDP and TCP).
    Everything it writes (config, zone files, rundir, storage, log) lives in one temp dir that
    ``stop()`` removes. knotd runs in the foreground as our child and is stopped by its PID.
    """

    def __init__(
        self,
        address: str = "127.0.0.1",
        port: int | None = None,
        origin: str = DEFAULT_ORIGIN,
        n_domains: int = 200,
        seed: int = 1,
        workers: int = 1,
        knotd: str | None = None,
    ) -> None:
        self.address = address
        self.origin = _relative(origin)
        self.n_domains = n_domains
        self.seed = seed
        self.workers = workers
        self._requested_port = port
        self.port: int = port or 0
        self._knotd = knotd or find_knotd()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return (self.address, self.port)

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("Knot is not started")
        return self._workdir

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stderr_text(self) -> str:
        """Whatever knotd has logged so far (it logs to stderr, which we keep in a file)."""
        if self._workdir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._workdir / "knotd.stderr").read_text(errors="replace")
        return ""

    def start(self) -> Knot:
        if self._knotd is None:
            raise FileNotFoundError("knotd not found (Debian package: knot)")
        # Short path: knotd's control socket lives in rundir and Unix socket paths are limited
        # to 108 bytes.
        self._workdir = Path(tempfile.mkdtemp(prefix="knot-"))
        zones = {
            self.origin: self._workdir / "forward.zone",
            REVERSE_ORIGIN: self._workdir / "reverse.zone",
        }
        zones[self.origin].write_text(generate_zone(self.origin, self.n_domains, self.seed))
        zones[REVERSE_ORIGIN].write_text(
            generate_reverse_zone(self.origin, self.n_domains, self.seed)
        )
        # An automatically chosen port can be taken between free_port() and knotd's bind; knotd
        # then runs without that listener, so a failed readiness wait gets a fresh port.
        attempts = 1 if self._requested_port else 3
        error: RuntimeError | None = None
        for _attempt in range(attempts):
            self.port = self._requested_port or free_port(self.address)
            try:
                self._spawn(zones)
                return self
            except RuntimeError as failure:
                error = failure
                self._terminate()
        self._remove_workdir()
        assert error is not None
        raise error

    def _spawn(self, zones: dict[str, Path]) -> None:
        workdir = self.workdir
        conf = workdir / "knot.conf"
        conf.write_text(_knot_conf(workdir, self.address, self.port, zones, self.workers))
        stderr_path = workdir / "knotd.stderr"
        with stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                [self._knotd or "knotd", "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        try:
            wait_until_answers(
                self.address, self.port, self.origin, "SOA", READY_TIMEOUT_SECONDS, self._process
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"knotd did not become ready: {error}\n{self.stderr_text()}"
            ) from None

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def _remove_workdir(self) -> None:
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def stop(self) -> None:
        """Stop knotd (SIGTERM, then SIGKILL after 5 s) and remove the temp dir."""
        self._terminate()
        self._remove_workdir()

    def __enter__(self) -> Knot:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
