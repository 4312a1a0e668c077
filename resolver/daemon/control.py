"""The control channel: a Unix socket speaking JSON lines, in the spirit of unbound-control.

Protocol: a client writes one JSON object per line, `{"command": "stats"}`; the daemon answers
each with one JSON object on one line, or, for `cache dump`, a stream of lines ending with
`{"end": true, "count": N}`. Anything wrong with a request is answered `{"error": "..."}`.

    {"command": "stats"}                 {"command": "upstreams"}
    {"command": "cache lookup", "name": "example.com", "type": "MX"}   (type optional)
    {"command": "cache flush"}           all; or with "name", "name"+"type", "negative": true
    {"command": "cache dump"}            {"command": "repoint", "target": "fallback"}
    {"command": "reload"}

`Commands` holds the logic and is synchronous (requests and `now` in, replies out); `Server` is
the trio loop around it, and `call` / `stream` are the client the CLI uses.

Invariants:
  1. No input stops the daemon: every complete line gets a reply, an error object at worst.
  2. Each connection is bounded: MAX_REQUEST_BYTES per line, IDLE_TIMEOUT_SECONDS between
     requests, SEND_TIMEOUT_SECONDS per reply, MAX_CONNECTIONS at once.
  3. A dump holds one batch of rendered lines at a time, plus the list of the cache's keys
     taken when it starts (references, 8 bytes per entry); entries gone since are skipped.
  4. The socket is created mode 0600: whoever can connect can flush the cache and repoint.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import math
import os
import socket
import stat
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from resolver.core import wire
from resolver.core.cache import Entry, Kind
from resolver.core.health import WINDOW_SECONDS
from resolver.core.pool import Override
from resolver.daemon import metrics
from resolver.errors import ConfigError

if TYPE_CHECKING:
    from resolver.daemon.metrics import Histogram
    from resolver.daemon.service import Service

log = logging.getLogger("resolver.control")

DEFAULT_DIRECTORY = "/run/resolver"
DEFAULT_PATH = f"{DEFAULT_DIRECTORY}/control.sock"
SOCKET_MODE = 0o600
MAX_REQUEST_BYTES = 4096  # a request is a few dozen bytes; a longer line is a mistake
IDLE_TIMEOUT_SECONDS = 30.0
SEND_TIMEOUT_SECONDS = 10.0  # a client that stops reading a dump loses its connection
MAX_CONNECTIONS = 16
DUMP_BATCH = 200
# QPS and packets/s are measured over the samples of the last STATS_WINDOW_SECONDS.
SAMPLE_SECONDS = 1.0
STATS_WINDOW_SECONDS = 10.0
RECENT_EVENTS = 5
CLIENT_TIMEOUT_SECONDS = 10.0
NEGATIVE_KINDS = frozenset({Kind.NXDOMAIN, Kind.NODATA})
TARGETS = tuple(o.value for o in Override)


class RequestError(ValueError):
    """A request we cannot serve; its text is the reply's "error"."""


class NotRunning(ConnectionError):
    """Nothing listens on the control socket (the client side's only expected failure)."""


def default_path() -> str | None:
    """DEFAULT_PATH when its directory exists and is writable by us (systemd's
    RuntimeDirectory), else None: the control channel is then off unless --control is given."""
    if os.path.isdir(DEFAULT_DIRECTORY) and os.access(DEFAULT_DIRECTORY, os.W_OK | os.X_OK):
        return DEFAULT_PATH
    return None


# -- the logic ------------------------------------------------------------------------------------
class Commands:
    """Answers requests from the service's plain counters; every method takes `now`."""

    def __init__(self, service: Service, now: float) -> None:
        self.service = service
        self.started = now
        # (time, queries, upstream packets): stats measure rates between the oldest and now.
        self.samples: deque[tuple[float, int, int]] = deque(
            maxlen=int(STATS_WINDOW_SECONDS / SAMPLE_SECONDS) + 1)

    def sample(self, now: float) -> None:
        queries, packets = self._totals()
        self.samples.append((now, queries, packets))

    def handle(self, request: object, now: float) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """One reply, or for a dump an iterator of entry lines (the caller adds the end)."""
        if not isinstance(request, dict):
            raise RequestError('a request is a JSON object, e.g. {"command": "stats"}')
        command = request.get("command")
        if command == "stats":
            return self.stats(now)
        if command == "upstreams":
            return self.upstreams(now)
        if command == "cache lookup":
            return self.cache_lookup(_name(request), _type(request), now)
        if command == "cache flush":
            name = _name(request) if request.get("name") is not None else None
            rdtype = _type(request)
            if rdtype is not None and name is None:
                raise RequestError("cache flush: a type needs a name")
            return self.cache_flush(name, rdtype, bool(request.get("negative", False)))
        if command == "cache dump":
            return self.cache_dump(now)
        if command == "repoint":
            return self.repoint(request.get("target"), now)
        known = "stats, upstreams, cache lookup, cache flush, cache dump, repoint, reload"
        raise RequestError(f"unknown command {command!r}; known: {known}")

    # -- stats ------------------------------------------------------------------------------
    def _totals(self) -> tuple[int, int]:
        totals = _metric_totals(self.service)
        return int(totals.get("queries", 0)), int(totals.get("upstream_packets_sent", 0))

    def stats(self, now: float) -> dict[str, Any]:
        service = self.service
        engine, pool = service.engine, service.engine.pool
        totals = _metric_totals(service)
        queries, packets = self._totals()
        then, queries_then, packets_then = (self.samples[0] if self.samples
                                            else (self.started, 0, 0))
        interval = now - then
        hits, misses = engine.hits, engine.misses
        latency = _merge([service.counts.latency[s] for s in metrics.SOURCES])
        budgets = [u.bucket.rate for u in pool.candidates()]
        return {
            "uptime_seconds": round(now - self.started, 1),
            "interval_seconds": round(interval, 1),
            "qps": _rate(queries - queries_then, interval),
            "queries_total": queries,
            "queries_by_transport": totals.get("queries_by_transport", {}),
            "responses_by_source": totals.get("responses_by_source", {}),
            "cache": {"hits": hits, "misses": misses,
                      "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
                      "entries": len(engine.cache.entries), "bytes": engine.cache.bytes,
                      "evictions": engine.cache.evictions, "prefetches": engine.prefetches},
            # Bucket upper bounds: the histogram says "at most this", not an exact value.
            "latency_ms": {"p50": _ms(_percentile(latency, 0.5)),
                           "p90": _ms(_percentile(latency, 0.9)),
                           "p99": _ms(_percentile(latency, 0.99)),
                           "timed": sum(latency[1]), "note": "slow path only, bucket bounds"},
            "upstream_pps": _rate(packets - packets_then, interval),
            # The budget the current candidates can carry; None means some are unlimited.
            "budget_pps": None if any(b is None for b in budgets) else sum(budgets),
            "upstream_packets_total": packets,
            "inflight": len(engine.inflight),
            "failures": engine.failures,
            "mode": pool.mode.value,
            "override": pool.override.value,
            "listen": [str(endpoint) for endpoint in service.bound],  # for `resolver doctor`
        }

    # -- upstreams ----------------------------------------------------------------------------
    def upstreams(self, now: float) -> dict[str, Any]:
        pool = self.service.engine.pool
        rows = []
        every = [(u, f"zone {p.zone}" if p.zone else u.role.value)
                 for p in self.service.engine.pools for u in p.upstreams]
        for upstream, role in every:
            health, bucket, stats = upstream.health, upstream.bucket, upstream.stats
            window = health.window.totals(now)
            finished = window.answered + window.timeouts + window.errors
            histogram = self.service.counts.rtt.get(upstream.endpoint)
            rtt = _merge([histogram]) if histogram is not None else ((), [])
            last = health.last_transition
            rows.append({
                "upstream": str(upstream.endpoint),
                "role": role,
                "state": upstream.state.value,
                "configured_pps": bucket.configured_rate,
                "learned_pps": health.learned_rate,
                "rate_pps": bucket.rate,
                "send_pps": round(health.sent_rate(now), 1),
                "loss": round(window.timeouts / finished, 4) if finished else None,
                "errors_in_window": window.errors,
                "window_seconds": WINDOW_SECONDS,
                "rtt_ms": {"p50": _ms(_percentile(rtt, 0.5)), "p99": _ms(_percentile(rtt, 0.99)),
                           "mean": _ms(stats.rtt_total / stats.answered)
                           if stats.answered else None,
                           "smoothed": _ms(upstream.srtt)},
                "packets_total": stats.sent,
                "tokens_denied": bucket.denied,
                "last_transition": None if last is None else {
                    "from": last.old.value, "to": last.new.value,
                    "seconds_ago": round(now - last.at, 1), "evidence": last.evidence},
            })
        events = [{"seconds_ago": round(now - e.at, 1), "subject": e.subject, "from": e.old,
                   "to": e.new, "evidence": e.evidence}
                  for e in list(pool.events)[-RECENT_EVENTS:]]
        return {"mode": pool.mode.value, "override": pool.override.value,
                "mode_since_seconds": round(now - pool.mode_changed_at, 1),
                "upstreams": rows, "recent_events": events}

    # -- cache ----------------------------------------------------------------------------------
    def _matching(self, name: bytes | None, rdtype: int | None) -> list[bytes]:
        if name is None:
            return list(self.service.engine.cache.entries)
        size = len(name) + 5  # name, type, class, flag byte
        type_bytes = rdtype.to_bytes(2, "big") if rdtype is not None else None
        return [key for key in self.service.engine.cache.entries
                if len(key) == size and key.startswith(name)
                and (type_bytes is None or key[-5:-3] == type_bytes)]

    def cache_lookup(self, name: bytes, rdtype: int | None, now: float) -> dict[str, Any]:
        entries = self.service.engine.cache.entries
        found = [describe(entries[key], now) for key in self._matching(name, rdtype)]
        return {"name": _name_text(name), "entries": found}

    def cache_flush(self, name: bytes | None, rdtype: int | None,
                    negative_only: bool) -> dict[str, Any]:
        cache = self.service.engine.cache
        removed = 0
        for key in self._matching(name, rdtype):
            entry = cache.entries.get(key)
            if entry is None or (negative_only and entry.kind not in NEGATIVE_KINDS):
                continue
            cache.remove(key)
            removed += 1
        return {"removed": removed, "remaining": len(cache.entries)}

    def cache_dump(self, now: float) -> Iterator[dict[str, Any]]:
        keys = list(self.service.engine.cache.entries)
        return self._dump(keys)

    def _dump(self, keys: list[bytes]) -> Iterator[dict[str, Any]]:
        entries = self.service.engine.cache.entries
        clock = self.service.fetcher.clock
        for key in keys:
            entry = entries.get(key)
            if entry is not None:
                yield describe(entry, clock())

    # -- routing --------------------------------------------------------------------------------
    def repoint(self, target: object, now: float) -> dict[str, Any]:
        if target not in TARGETS:
            raise RequestError(f"repoint: target must be one of {', '.join(TARGETS)}")
        pool = self.service.engine.pool
        override = Override(target)
        if override is Override.FALLBACK and not pool.fallbacks:
            raise RequestError("repoint fallback: no fallback upstreams are configured")
        previous = pool.override.value
        pool.set_override(override, now)
        self.service.fetcher.log_events()
        return {"override": pool.override.value, "previous": previous, "mode": pool.mode.value}


def describe(entry: Entry, now: float) -> dict[str, Any]:
    """One cache entry for people: name, type, kind, TTL left, hits, and its records as text."""
    import dns.message
    import dns.rdatatype

    key = entry.key
    name_wire, qtype = key[:-5], int.from_bytes(key[-5:-3], "big")
    reply = entry.reply(b"\x00\x00", 1, key[:-1], b"", wire.MAX_TCP_MESSAGE, now)
    message = dns.message.from_wire(reply, ignore_trailing=True)
    records = [line for section in (message.answer, message.authority)
               for rrset in section for line in rrset.to_text().splitlines()]
    return {"name": _name_text(name_wire), "type": dns.rdatatype.to_text(qtype),
            "do": bool(key[-1] & wire.KEY_DO), "cd": bool(key[-1] & wire.KEY_CD),
            "kind": entry.kind, "ttl": entry.ttl,
            "ttl_left": max(0, int(entry.expires_at - now)), "stale": now >= entry.expires_at,
            "hits": entry.hits, "records": records}


# -- helpers ------------------------------------------------------------------------------------
def _name(request: dict[str, Any]) -> bytes:
    import dns.exception
    import dns.name

    text = request.get("name")
    if not isinstance(text, str) or not text:
        raise RequestError("a name is needed, e.g. \"name\": \"example.com\"")
    try:
        return dns.name.from_text(text).to_wire(canonicalize=True)
    except dns.exception.DNSException as e:
        raise RequestError(f"bad name {text!r}: {e}") from None


def _type(request: dict[str, Any]) -> int | None:
    import dns.rdatatype

    text = request.get("type")
    if text is None:
        return None
    try:
        return int(dns.rdatatype.from_text(str(text)))
    except (dns.rdatatype.UnknownRdatatype, ValueError):
        raise RequestError(f"unknown record type {text!r}") from None


def _name_text(name_wire: bytes) -> str:
    import dns.name

    return dns.name.from_wire(name_wire, 0)[0].to_text()


def _metric_totals(service: Service) -> dict[str, Any]:
    """Sums of what Prometheus would scrape, read through metrics.Collector (one source)."""
    collector = metrics.Collector()
    collector.service = service
    totals: dict[str, Any] = {"queries_by_transport": {}, "responses_by_source": {}}
    prefix = metrics.NAMESPACE + "_"
    for family in collector.collect():
        for sample in family.samples:
            name = sample.name.removeprefix(prefix).removesuffix("_total")
            if name == "queries" and sample.labels["transport"] != "udp":
                by = totals["queries_by_transport"]
                by[sample.labels["transport"]] = by.get(sample.labels["transport"], 0) + \
                    int(sample.value)
            elif name == "responses" and sample.labels["source"] != "cache":
                by = totals["responses_by_source"]
                by[sample.labels["source"]] = by.get(sample.labels["source"], 0) + \
                    int(sample.value)
            elif name == "upstream_packets_sent":
                totals[name] = totals.get(name, 0) + sample.value
    # The exposition attributes UDP hits to a type by sampling, so a hit or two may not be in
    # it yet; the listeners' datagram counts and the engine's hit count are exact.
    totals["queries_by_transport"]["udp"] = sum(listener.received for listener in service.udp)
    totals["queries"] = sum(totals["queries_by_transport"].values())
    totals["responses_by_source"]["cache"] = service.engine.hits
    return totals


def _merge(histograms: list[Histogram]) -> tuple[tuple[float, ...], list[int]]:
    if not histograms:
        return (), []
    counts = [0] * len(histograms[0].counts)
    for histogram in histograms:
        for i, n in enumerate(list(histogram.counts)):
            counts[i] += n
    return histograms[0].bounds, counts


def _percentile(histogram: tuple[tuple[float, ...], list[int]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q; inf past the last bound."""
    bounds, counts = histogram
    total = sum(counts)
    if not total:
        return None
    cumulative = 0
    for i, n in enumerate(counts):
        cumulative += n
        if cumulative >= q * total:
            return bounds[i] if i < len(bounds) else math.inf
    return math.inf


def _ms(seconds: float | None) -> float | str | None:
    if seconds is None:
        return None
    if math.isinf(seconds):
        return "inf"  # past the last histogram bucket; JSON has no infinity
    return round(seconds * 1000, 3)


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


# -- the server ----------------------------------------------------------------------------------
def bind(path: str | None) -> socket.socket | None:
    """The listening socket at path (or the default), mode 0600; None when disabled.

    Called before the daemon's nursery opens, so a failure is one ConfigError line. A socket
    file left by a dead daemon is replaced; one a live daemon answers on is not."""
    if path is None:
        path = default_path()
        if path is None:
            log.debug("control: %s missing or not writable and no --control given: "
                      "control channel off", DEFAULT_DIRECTORY)
            return None
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600, with no moment of wider access
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(MAX_CONNECTIONS)
    except OSError as e:
        sock.close()
        raise ConfigError(f"control socket {path}: {e.strerror or e}") from None
    finally:
        os.umask(old_umask)
    return sock


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"control socket {path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"control socket {path}: exists and is not a socket; "
                          "remove it or pick another --control")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: left by a daemon that died
            return
    raise ConfigError(f"control socket {path}: another resolver is answering on it")


class Server:
    """Accepts control connections and drives `Commands` for each line."""

    def __init__(self, service: Service, sock: socket.socket) -> None:
        self.service = service
        self.clock = service.fetcher.clock
        self.commands = Commands(service, self.clock())
        self.sock = sock
        self.path = sock.getsockname()
        self.connections = 0

    async def serve(self) -> None:
        inode = os.stat(self.path).st_ino
        log.info("control: listening on %s", self.path)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sampler)
                await trio.serve_listeners(self.connection, [listener],
                                           handler_nursery=nursery)
        finally:
            listener.socket.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == inode:  # ours, not a successor's
                    os.unlink(self.path)

    async def _sampler(self) -> None:
        while True:
            self.commands.sample(self.clock())
            await trio.sleep(SAMPLE_SECONDS)

    async def connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.connections >= MAX_CONNECTIONS:
                with contextlib.suppress(trio.BrokenResourceError, trio.TooSlowError):
                    await self._send(stream, [{"error": "too many control connections"}])
                return
            self.connections += 1
            try:
                await self._requests(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                pass  # the client went away or stopped reading
            finally:
                self.connections -= 1

    async def _requests(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:  # ends on EOF, idle timeout, an over-long line, or a broken stream
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > MAX_REQUEST_BYTES:
                    await self._send(stream, [{"error": f"request longer than "
                                                        f"{MAX_REQUEST_BYTES} bytes"}])
                    return
                with trio.move_on_after(IDLE_TIMEOUT_SECONDS):
                    chunk = await stream.receive_some(MAX_REQUEST_BYTES)
                    if chunk:
                        buffer += chunk
                        continue
                    if buffer.strip():  # a last request without its newline
                        await self._answer(stream, buffer)
                return
            line, buffer = buffer[:newline], buffer[newline + 1:]
            if line.strip():
                await self._answer(stream, line)

    async def _answer(self, stream: trio.SocketStream, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            await self._send(stream, [{"error": f"not JSON: {e}"}])
            return
        if isinstance(request, dict) and request.get("command") == "reload":
            await self._send(stream, [await self._reload()])
            return
        try:
            reply = self.commands.handle(request, self.clock())
        except RequestError as e:
            reply = {"error": str(e)}
        except Exception as e:  # a bug must not take the resolver down with it
            log.exception("control: request %r failed", line[:200])
            reply = {"error": f"internal error: {e}"}
        if isinstance(reply, dict):
            await self._send(stream, [reply])
            return
        count = 0
        batch: list[dict[str, Any]] = []
        for item in reply:
            batch.append(item)
            if len(batch) >= DUMP_BATCH:
                count += len(batch)
                await self._send(stream, batch)
                batch = []
        count += len(batch)
        await self._send(stream, [*batch, {"end": True, "count": count}])

    async def _reload(self) -> dict[str, Any]:
        hook = getattr(self.service, "reload", None)
        if not callable(hook):
            return {"error": "reload not available"}
        try:
            result = hook()
            if inspect.isawaitable(result):
                result = await result
        except Exception as e:  # ConfigError and friends: the old config keeps serving
            return {"error": f"reload refused: {e}"}
        if isinstance(result, tuple) and len(result) == 2:  # Service.reload: (applied, line)
            applied, line = result
            return {"reloaded": True, "detail": str(line)} if applied else {"error": str(line)}
        reply: dict[str, Any] = {"reloaded": True}
        if isinstance(result, dict):
            reply.update(result)
        elif result is not None:
            reply["detail"] = str(result)
        return reply

    @staticmethod
    async def _send(stream: trio.SocketStream, items: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items)
        with trio.fail_after(SEND_TIMEOUT_SECONDS):
            await stream.send_all(data.encode())


# -- the client (sync, for the CLI) ---------------------------------------------------------------
@contextlib.contextmanager
def _connect(path: str, timeout: float) -> Iterator[Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotRunning(path) from e
        except OSError as e:
            if e.errno in (errno.ENOTSOCK, errno.ENOENT, errno.ECONNREFUSED):
                raise NotRunning(path) from e
            raise
        yield sock
    finally:
        sock.close()


def stream(path: str, request: dict[str, Any],
           timeout: float = CLIENT_TIMEOUT_SECONDS) -> Iterator[dict[str, Any]]:
    """Send one request and yield reply lines until `{"end": true}` (or the one reply)."""
    with _connect(path, timeout) as sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        reader = sock.makefile("rb")
        while True:  # bounded by the server: it ends each reply, or closes
            line = reader.readline()
            if not line:
                raise ConnectionError(f"control socket {path} closed mid-reply")
            item = json.loads(line)
            yield item
            if "end" in item or "error" in item or request.get("command") != "cache dump":
                return


def call(path: str, request: dict[str, Any],
         timeout: float = CLIENT_TIMEOUT_SECONDS) -> dict[str, Any]:
    """Send one request, return its one reply."""
    with contextlib.closing(stream(path, request, timeout)) as replies:
        return next(replies)


def path_or_default(path: str | None) -> str:
    if path is not None:
        return path
    default = default_path()
    if default is None:
        raise NotRunning(DEFAULT_PATH)
    return default

