"""Wiring: build the engine from the config, bind listeners, run fetches, stop on signals."""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from resolver.config import Config
from resolver.core.cache import Cache, TtlPolicy
from resolver.core.engine import Engine
from resolver.core.model import Endpoint, Fetch, Reply
from resolver.core.pool import Pool, Timing
from resolver.daemon import upstream as upstream_io
from resolver.daemon.server import (
    Acl,
    TcpServer,
    UdpListener,
    bind_udp,
    explain_bind_error,
)
from resolver.errors import ConfigError

log = logging.getLogger("resolver")

# Expired entries are swept out a slice at a time (they are never served regardless), so the
# sweep never holds up serving for more than a few milliseconds.
PURGE_INTERVAL_SECONDS = 1.0
PURGE_SCAN_ENTRIES = 2000


def build_engine(config: Config) -> Engine:
    policy = TtlPolicy(
        min_ttl=config.min_ttl_seconds,
        max_ttl=config.max_ttl_seconds,
        max_negative_ttl=config.max_negative_ttl_seconds,
        failure_ttl=config.failure_ttl_seconds,
    )
    cache = Cache(config.cache_max_entries, config.cache_max_bytes, policy)
    pool = Pool(config.upstream, config.fallback)
    timing = Timing(config.upstream_timeout_seconds, config.query_deadline_seconds,
                    config.max_tries)
    return Engine(cache, pool, timing)


@dataclass
class Service:
    """The running resolver: what tests and the CLI can inspect once `run` has started it."""

    config: Config
    engine: Engine
    nursery: trio.Nursery
    udp: list[UdpListener] = field(default_factory=list)
    tcp: list[TcpServer] = field(default_factory=list)
    bound: list[Endpoint] = field(default_factory=list)
    fetches_running: int = 0

    # -- Dispatcher protocol, used by the listeners -------------------------------------
    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self.nursery.start_soon(fn, *args)

    def on_query(self, data: bytes, client: tuple[Any, Any], now: float,
                 tcp: bool = False) -> None:
        for action in self.engine.on_query(data, client, now, tcp):
            if isinstance(action, Reply):
                _deliver(action)
            else:
                self.nursery.start_soon(self.fetch, action)

    # -- Misses ------------------------------------------------------------------------
    async def fetch(self, job: Fetch) -> None:
        """Ask upstreams until one answers or the resolution gives up; answer every waiter."""
        engine = self.engine
        self.fetches_running += 1
        scan = None
        try:
            resolution = engine.resolution(time.monotonic())
            while (attempt := resolution.next_try(time.monotonic())) is not None:
                result = await upstream_io.exchange(attempt.upstream, job.question, job.do,
                                                    job.cd, attempt.timeout)
                now = time.monotonic()
                engine.pool.report(attempt.upstream, result.outcome, result.rtt, now)
                if result.spoofed:
                    log.warning("ignored %d unmatched replies from %s (RFC 5452)",
                                result.spoofed, attempt.upstream)
                if resolution.record(attempt, result.outcome, now):
                    scan = result.scan
                    break
        except Exception:
            # A bug on one miss must not take the resolver down or leave clients hanging:
            # log it loudly and answer SERVFAIL.
            log.exception("fetch failed unexpectedly")
        finally:
            self.fetches_running -= 1
            now = time.monotonic()
            replies = (engine.on_answer(job.key, scan, now) if scan is not None
                       else engine.on_failure(job.key, now))
            for reply in replies:
                _deliver(reply)

    async def ticker(self) -> None:
        while True:
            await trio.sleep(PURGE_INTERVAL_SECONDS)
            self.engine.cache.purge_expired(time.monotonic(), scan_limit=PURGE_SCAN_ENTRIES)


def _deliver(reply: Reply) -> None:
    transport, addr = reply.client
    transport.deliver(reply.data, addr)


def _bind_all(config: Config) -> list[tuple[Endpoint, socket.socket]]:
    """Bind every UDP listener first, so TCP can reuse a port the kernel picked for UDP."""
    bound = []
    try:
        for endpoint in config.listen:
            try:
                sock = bind_udp(endpoint.host, endpoint.port, config.udp_buffer_bytes)
            except OSError as e:
                raise ConfigError(explain_bind_error(f"{endpoint} (udp)", e,
                                                     endpoint.port)) from None
            bound.append((Endpoint(endpoint.host, sock.getsockname()[1]), sock))
    except BaseException:
        for _, sock in bound:
            sock.close()
        raise
    return bound


async def run(config: Config, *, handle_signals: bool = True,
              task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled or signalled; task_status.started(service) once listening."""
    engine = build_engine(config)
    acl = Acl(config.allow)
    udp_socks = _bind_all(config)
    # Every socket is bound before the nursery opens, so a bind failure reaches the CLI as
    # one ConfigError line rather than inside an exception group.
    tcp_listeners = []
    try:
        for endpoint, _ in udp_socks:
            try:
                tcp_listeners += await trio.open_tcp_listeners(endpoint.port, host=endpoint.host)
            except OSError as e:
                raise ConfigError(explain_bind_error(f"{endpoint} (tcp)", e, endpoint.port,
                                                     tcp=True)) from None
    except BaseException:
        for _, sock in udp_socks:
            sock.close()
        for listener in tcp_listeners:
            await listener.aclose()
        raise
    async with trio.open_nursery() as nursery:
        service = Service(config, engine, nursery)
        for endpoint, sock in udp_socks:
            listener = UdpListener(sock, engine, service, acl)
            service.udp.append(listener)
            service.bound.append(endpoint)
            nursery.start_soon(listener.serve)
        # One TCP server for all addresses: the connection cap is for the whole resolver.
        tcp = TcpServer(engine, service, acl, config.tcp_idle_timeout_seconds,
                        config.tcp_max_connections)
        service.tcp.append(tcp)
        nursery.start_soon(trio.serve_listeners, tcp.handle, tcp_listeners)
        nursery.start_soon(service.ticker)
        if handle_signals:
            nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
        _log_inactive(config)
        log.info("ready: listening on %s (udp+tcp); upstreams %s; fallbacks %s",
                 ", ".join(map(str, service.bound)),
                 ", ".join(map(str, config.upstream)) or "none",
                 ", ".join(map(str, config.fallback)) or "none")
        task_status.started(service)


def _log_inactive(config: Config) -> None:
    for flag, value in (("--upstream-pps", config.upstream_pps), ("--metrics", config.metrics),
                        ("--control", config.control)):
        if value is not None:
            log.warning("%s %s accepted but not active yet: it arrives with a later release",
                        flag, value)


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s received: stopping", signal.Signals(signum).name)
            scope.cancel()
            return
