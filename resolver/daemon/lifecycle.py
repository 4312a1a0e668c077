"""Reload, shutdown and warm restart of a running Service.

Reload (SIGHUP, `Service.reload()`): the config is read again the way it was at start (file,
then the same flags). A refused config changes nothing and logs one line. An accepted one is
applied in place: the cache keeps its entries (its bounds and TTL policy change), the engine's
timing and the upstream pool (rebuilt when upstreams or budgets changed) are replaced. Keys bound
to sockets or tasks made at start (RESTART_KEYS) keep their old values, with one line saying a
restart is needed.

Shutdown (SIGTERM, SIGINT): STOPPING=1 to systemd, stop reading queries, give fetches in flight
up to DRAIN_SECONDS to answer their clients, write the cache snapshot, end.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from resolver.config import Config
from resolver.core import snapshot
from resolver.core.cache import Cache
from resolver.errors import ConfigError

if TYPE_CHECKING:
    from resolver.daemon.service import Service

log = logging.getLogger("resolver")

# How long shutdown waits for fetches in flight; systemd's stop timeout (90 s) is far above.
DRAIN_SECONDS = 3.0
DRAIN_POLL_SECONDS = 0.01
SNAPSHOT_FILE = "cache.snapshot"
# Set at start only: listeners, their buffers, the ACL compiled into them, the metrics and
# control endpoints, the ENA reader task.
RESTART_KEYS = ("listen", "allow", "udp_buffer_bytes", "tcp_idle_timeout_seconds",
                "tcp_max_connections", "metrics", "control", "ena_counters_command",
                "ena_counters_file", "log_format", "workers", "zone")
# Keys the upstream pool is built from: a change to any means a new pool.
POOL_KEYS = ("upstream", "fallback", "upstream_pps", "upstream_burst", "upstream_limits",
             "budget_reserve_fraction", "repoint_hold_seconds")


# -- reload ----------------------------------------------------------------------------------
def reload(service: Service) -> tuple[bool, str]:
    """Read the config again and apply it; (applied, the line logged)."""
    if service.reload_config is None:
        message = "reload: not available (this resolver was started without a config source)"
        log.warning("%s", message)
        return False, message
    try:
        new = service.reload_config()
    except ConfigError as e:
        message = f"reload refused, still serving the previous configuration: {e}"
        log.error("%s", message)
        return False, message
    message = apply(service, new, service.fetcher.clock())
    log.info("%s", message)
    service.notifier.status(message)
    return True, message


def apply(service: Service, new: Config, now: float) -> str:
    """Apply a valid config to the running service, in place; returns what was done."""
    from resolver.daemon.service import build_engine

    old = service.config
    kept = [key for key in RESTART_KEYS if getattr(new, key) != getattr(old, key)]
    if kept:
        log.warning("reload: %s changed in %s but only take effect after a restart; keeping "
                    "the running values", ", ".join(kept), new.source)
        new = dataclasses.replace(new, **{key: getattr(old, key) for key in kept})
    changed = [f.name for f in dataclasses.fields(Config)
               if f.compare and getattr(new, f.name) != getattr(old, f.name)]
    fresh = build_engine(new, now)  # an empty cache and a new pool: cheap to make
    engine = service.engine
    cache = engine.cache
    cache.policy = fresh.cache.policy
    cache.max_entries, cache.max_bytes = new.cache_max_entries, new.cache_max_bytes
    cache._evict()  # a smaller bound applies now, least recently used first
    engine.timing = fresh.timing
    engine.prefetch_min_hits = new.prefetch_min_hits
    service.fetcher.stale_answer_timeout = new.stale_answer_timeout_seconds
    if any(key in changed for key in POOL_KEYS):
        _replace_pool(service, fresh.pool, now)
    logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
    service.config = new
    if not changed:
        return f"reload: {new.source} read; nothing changed"
    return f"reload: applied {new.source}; changed {', '.join(changed)}; cache kept " \
           f"({len(cache)} entries)"


def _replace_pool(service: Service, pool: Any, now: float) -> None:
    """Swap in a pool built from the new upstreams and budgets. Resolutions in flight finish
    on the old one; the operator's repoint override carries over."""
    from resolver.daemon import metrics
    from resolver.daemon.service import _log_budgets

    old = service.engine.pool
    if pool.override is not old.override:
        pool.set_override(old.override, now)
    # metrics.instrument wraps instance methods of the engine, pool and fetcher: unwrap them
    # (the class methods show through again) and wrap anew, keeping the RTT histograms.
    for obj, names in ((service.engine, ("on_answer", "on_failure", "on_stale_timeout")),
                       (service.fetcher, ("log_events",))):
        for name in names:
            obj.__dict__.pop(name, None)
    rtt = dict(service.counts.rtt)
    service.engine.pool = pool
    service.fetcher.pool = pool
    if service.ena is not None:
        service.ena.pool = pool
    metrics.instrument(service)
    for endpoint, histogram in rtt.items():
        if endpoint in service.counts.rtt:
            service.counts.rtt[endpoint] = histogram
    _log_budgets(service.engine)


# -- shutdown --------------------------------------------------------------------------------
async def stoppable(scopes: list[trio.CancelScope], serve: Callable[..., Awaitable[Any]],
                    *args: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run a listener under a cancel scope kept in `scopes`, so shutdown can stop reading
    queries while the fetcher goes on answering the ones in flight."""
    with trio.CancelScope() as scope:
        scopes.append(scope)
        task_status.started()
        await serve(*args)


async def shutdown(service: Service, reason: str) -> None:
    """Stop reading, drain fetches in flight (bounded), write the snapshot, end the service."""
    log.info("%s: stopping (no new queries; up to %g s for %d fetches in flight)", reason,
             DRAIN_SECONDS, service.fetcher.running)
    service.notifier.stopping(f"stopping: {reason}")
    for scope in service.listener_scopes:
        scope.cancel()
    with trio.move_on_after(DRAIN_SECONDS):
        while service.fetcher.running > 0:
            await trio.sleep(DRAIN_POLL_SECONDS)
    if service.fetcher.running:
        log.warning("shutdown: %d fetches still in flight after %g s; their clients get no "
                    "answer from us", service.fetcher.running, DRAIN_SECONDS)
    for listener in service.udp:
        listener.sock.close()
    await write_snapshot(service)
    service.nursery.cancel_scope.cancel()


# -- warm restart ----------------------------------------------------------------------------
def snapshot_path(config: Config) -> Path | None:
    """The snapshot file; worker i > 0 of several keeps its own cache in cache.snapshot.i."""
    if not config.state_directory:
        return None
    name = SNAPSHOT_FILE + (f".{config.worker_index}" if config.worker_index else "")
    return Path(config.state_directory) / name


def load_snapshot(cache: Cache, config: Config, now: float,
                  wall_now: float | None = None) -> int:
    """Fill the cache from the state directory; one log line whatever happens."""
    path = snapshot_path(config)
    if path is None:
        return 0
    wall_now = time.time() if wall_now is None else wall_now
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info("cache snapshot: none at %s; cold start", path)
        return 0
    except OSError as e:
        log.warning("cache snapshot: cannot read %s (%s); cold start", path, e.strerror or e)
        return 0
    # Hundreds of thousands of new objects would set off repeated full collections (service.py
    # freezes them out of the collector right after): about 25% of the load time, measured.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        restored = snapshot.restore(cache, data, now, wall_now)
    except snapshot.SnapshotError as e:
        log.warning("cache snapshot: %s is unusable (%s); cold start", path, e)
        return 0
    finally:
        if gc_was_enabled:
            gc.enable()
    log.info("cache snapshot: restored %d entries from %s", restored, path)
    return restored


async def write_snapshot(service: Service) -> bool:
    """Write the cache atomically (temp file, fsync, rename); False and a log line on failure."""
    path = snapshot_path(service.config)
    if path is None:
        return False
    # Encoded here, in the loop, so the entries cannot change under it; written in a thread.
    data = snapshot.encode(list(service.engine.cache.entries.values()), service.fetcher.clock(),
                           time.time())
    try:
        await trio.to_thread.run_sync(_write_atomically, path, data)
    except OSError as e:
        log.warning("cache snapshot: cannot write %s: %s", path, e.strerror or e)
        return False
    log.info("cache snapshot: wrote %d entries (%d bytes) to %s", len(service.engine.cache),
             len(data), path)
    return True


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


async def snapshots(service: Service) -> None:
    """Write the snapshot every snapshot_interval_seconds (read each time: reload applies)."""
    while True:
        await trio.sleep(service.config.snapshot_interval_seconds)
        await write_snapshot(service)
