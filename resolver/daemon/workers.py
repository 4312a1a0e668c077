"""`resolver serve --workers N`: a supervisor process and N serving processes.

The supervisor re-executes `python -m resolver serve` with the same flags plus a hidden
`--worker-index i` for each worker. Every worker binds the same listen addresses with
SO_REUSEPORT (the kernel spreads datagrams and connections over the workers by a hash of the
client's address and port), keeps its own cache, and gets a 1/N share of each upstream budget
(config.budget_for); worker i serves metrics on the metrics port + i and control on the control
path + ".i" (worker 0 on the path itself): config.for_worker.

The supervisor forwards SIGTERM, SIGINT (as SIGTERM) and SIGHUP to the workers and exits 0 once
they have all stopped. A worker that dies unexpectedly is logged and restarted, at most
MAX_RESTARTS times per RESTART_WINDOW_SECONDS; past that the supervisor stops the others and
exits 1. A worker whose supervisor is gone (killed) stops on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from resolver.config import Config
from resolver.daemon import lifecycle, sdnotify

log = logging.getLogger("resolver.workers")

MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
RESTART_DELAY_SECONDS = 0.5
POLL_SECONDS = 0.1
STOP_TIMEOUT_SECONDS = 30.0
PARENT_POLL_SECONDS = 1.0
# systemd variables only the supervisor (the unit's main process) may use.
_SUPERVISOR_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def child_argv(params: Mapping[str, Any], index: int) -> list[str]:
    """`python -m resolver serve` with the flags given to the supervisor, for worker `index`.

    `params` are click's values of `serve`: each becomes `--name value` (repeated for multiple
    options, bare for true flags); config_path is `--config`."""
    argv = [sys.executable, "-m", "resolver", "serve"]
    for name, value in params.items():
        if name == "worker_index" or value is None or value is False or value == ():
            continue
        flag = "--config" if name == "config_path" else "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, tuple | list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return [*argv, "--worker-index", str(index)]


class Supervisor:
    """Starts the workers, forwards signals, restarts a dead worker (bounded)."""

    def __init__(self, workers: int, argv_for: Callable[[int], list[str]],
                 environ: Mapping[str, str] = os.environ) -> None:
        self.workers = workers
        self.argv_for = argv_for
        self.env = {k: v for k, v in environ.items() if k not in _SUPERVISOR_ONLY_ENV}
        self.notifier = sdnotify.Notifier.from_environ(environ)
        self.watchdog = sdnotify.watchdog_interval(environ) if self.notifier.enabled else None
        self.children: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.restarts: list[list[float]] = [[] for _ in range(workers)]
        self.stopping = False
        self.failed = False

    def start(self, index: int) -> None:
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards it once (as SIGTERM), rather than every worker getting it twice.
        child = subprocess.Popen(self.argv_for(index), stdin=subprocess.DEVNULL, env=self.env,
                                 process_group=0)
        self.children[index] = child
        log.info("workers: worker %d started (pid %d)", index, child.pid)

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            if child is not None and child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP received: forwarding to %d workers", self.workers)
            self.signal_all(signal.SIGHUP)
            return
        if not self.stopping:
            log.info("%s received: stopping %d workers", signal.Signals(signum).name,
                     self.workers)
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def run(self) -> int:
        """Until every worker has stopped; the exit status (0, or 1 after giving up)."""
        previous = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for index in range(self.workers):
                self.start(index)
            self.notifier.ready(f"supervising {self.workers} workers")
            return self._loop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._reap()

    def _loop(self) -> int:
        stop_deadline: float | None = None
        last_watchdog = 0.0
        while True:
            now = time.monotonic()
            if self.watchdog is not None and now - last_watchdog >= self.watchdog:
                self.notifier.notify("WATCHDOG=1")
                last_watchdog = now
            for index, child in enumerate(self.children):
                if not self.stopping and child is not None and child.poll() is not None:
                    self._died(index, child, now)
            alive = sum(1 for c in self.children if c is not None and c.poll() is None)
            if self.stopping:
                if alive == 0:
                    log.info("workers: all stopped")
                    return 1 if self.failed else 0
                stop_deadline = stop_deadline or now + STOP_TIMEOUT_SECONDS
                if now > stop_deadline:
                    log.error("workers: %d still running %g s after SIGTERM; killing them",
                              alive, STOP_TIMEOUT_SECONDS)
                    self.signal_all(signal.SIGKILL)
                    stop_deadline = now + STOP_TIMEOUT_SECONDS
            time.sleep(POLL_SECONDS)

    def _died(self, index: int, child: subprocess.Popen[bytes], now: float) -> None:
        recent = [t for t in self.restarts[index] if now - t < RESTART_WINDOW_SECONDS]
        self.restarts[index] = recent
        log.error("workers: worker %d (pid %d) exited unexpectedly with status %s",
                  index, child.pid, child.returncode)
        if len(recent) >= MAX_RESTARTS:
            log.error("workers: worker %d died %d times within %g s; stopping every worker",
                      index, len(recent) + 1, RESTART_WINDOW_SECONDS)
            self.failed = True
            self.stopping = True
            self.children[index] = None
            self.signal_all(signal.SIGTERM)
            return
        recent.append(now)
        time.sleep(RESTART_DELAY_SECONDS)
        log.info("workers: restarting worker %d (restart %d of at most %d per %g s)", index,
                 len(recent), MAX_RESTARTS, RESTART_WINDOW_SECONDS)
        self.start(index)

    def _reap(self) -> None:
        """Never leave a worker behind, whatever ended the loop."""
        for child in self.children:
            if child is not None and child.poll() is None:
                child.kill()
                child.wait(STOP_TIMEOUT_SECONDS)


async def run_worker(config: Config, reload_config: Callable[[], Config],
                     parent_pid: int) -> None:
    """One worker: the service, plus a watch that stops it when the supervisor is gone."""
    from resolver.daemon import service as service_mod

    async with trio.open_nursery() as nursery:
        async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            await service_mod.run(config, reload_config=reload_config, task_status=task_status)
            nursery.cancel_scope.cancel()

        service = await nursery.start(serve)
        nursery.start_soon(_watch_parent, service, parent_pid)


async def _watch_parent(service: Any, parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        await trio.sleep(PARENT_POLL_SECONDS)
    await lifecycle.shutdown(service, "supervisor gone")
