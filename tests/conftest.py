"""Shared fixtures: knotd, fake upstreams, the real resolver as a subprocess, binary checks.

Tests that need a Debian binary (knotd, dig, kdig, unbound) skip when it is missing on a
laptop, and fail when the ``CI`` environment variable is set: CI must never go green by
skipping the integration tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from resolver.bench.authority import Knot, free_port, wait_until_answers

from fakeupstream import FakeUpstream, make_upstream

REPO_ROOT = Path(__file__).resolve().parent.parent
RESOLVER_READY_TIMEOUT_SECONDS = 10.0
RESOLVER_STOP_TIMEOUT_SECONDS = 5.0
# A name no test asks about, so the readiness probe leaves nothing in the cache that matters.
READY_PROBE = ("ready-probe.test.", "A")


def require_binary(name: str) -> str:
    """The path of ``name``; skip the test when it is absent, or fail when CI is set."""
    path = shutil.which(name)
    if path is None:
        for directory in ("/usr/sbin", "/usr/bin", "/sbin"):
            candidate = Path(directory) / name
            if os.access(candidate, os.X_OK):
                path = str(candidate)
                break
    if path is None:
        message = f"{name} is not installed (see DEB_PACKAGES in the Makefile)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so this is a failure, not a skip")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def knot() -> Iterator[Knot]:
    """One knotd for the whole session, serving the generated zones on 127.0.0.1."""
    knotd = require_binary("knotd")
    with Knot(knotd=knotd) as server:
        yield server


@pytest.fixture
def fake_upstream() -> Iterator[Callable[..., FakeUpstream]]:
    """Factory: ``fake_upstream("wrong-id", then_correct=False)`` → a started fake, stopped
    at teardown. The first argument is a behaviour name from ``fakeupstream.BEHAVIOURS`` or a
    FakeUpstream subclass."""
    started: list[FakeUpstream] = []

    def start(behaviour: str | type[FakeUpstream] = "answer", **kwargs: object) -> FakeUpstream:
        upstream = make_upstream(behaviour, **kwargs).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


def toml_value(value: object) -> str:
    """A TOML rendering of the few value kinds our config uses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def render_toml(config: dict[str, object]) -> str:
    """Flat keys first, then one ``[table]`` per nested dict (enough for our config)."""
    lines = [
        f"{key} = {toml_value(value)}"
        for key, value in config.items()
        if not isinstance(value, dict)
    ]
    for table, values in config.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class ResolverProcess:
    """``python -m resolver serve`` as a child process listening on 127.0.0.1:<port>."""

    def __init__(self, args: list[str], port: int, log_path: Path) -> None:
        self.address = "127.0.0.1"
        self.port = port
        self.args = args
        self.log_path = log_path
        self.returncode: int | None = None
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def addr(self) -> tuple[str, int]:
        return (self.address, self.port)

    @property
    def server(self) -> str:
        """``127.0.0.1:PORT`` for messages; dig wants ``@127.0.0.1 -p PORT`` instead."""
        return f"{self.address}:{self.port}"

    def stderr_text(self) -> str:
        """Everything the resolver logged so far (stdout and stderr share one file)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def wait_ready(self, timeout_seconds: float = RESOLVER_READY_TIMEOUT_SECONDS) -> None:
        try:
            wait_until_answers(
                self.address,
                self.port,
                *READY_PROBE,
                timeout_seconds=timeout_seconds,
                process=self.process,
                accept_any_rcode=True,
            )
        except RuntimeError as error:
            self.stop()
            pytest.fail(
                f"resolver did not become ready: {error}\n"
                f"command: {' '.join(self.args)}\n--- resolver log ---\n{self.stderr_text()}"
            )

    def stop(self) -> None:
        """SIGTERM (the drain path), then SIGKILL if it is still running after 5 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=RESOLVER_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=RESOLVER_STOP_TIMEOUT_SECONDS)
        self.returncode = self.process.returncode
        self._log.close()


def upstream_arg(upstream: Knot | FakeUpstream | tuple[str, int] | str) -> str:
    """``HOST:PORT`` for the CLI (IPv6 hosts in brackets)."""
    if isinstance(upstream, str):
        return upstream
    host, port = upstream if isinstance(upstream, tuple) else (upstream.address, upstream.port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


Upstream = Knot | FakeUpstream | tuple[str, int] | str


class ResolverLauncher:
    """Starts resolver subprocesses with their config and logs under ``workdir``; stops them all.

    The ``resolver_process`` fixture wraps one per test; a module-scoped fixture can hold its
    own to share one resolver between many tests.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[ResolverProcess] = []

    def start(
        self,
        upstream: Upstream,
        *,
        fallbacks: list[Upstream] | None = None,
        config: dict[str, object] | str | None = None,
        extra_args: list[str] | None = None,
        wait: bool = True,
    ) -> ResolverProcess:
        index = len(self.started)
        port = free_port("127.0.0.1")
        args = [
            sys.executable,
            "-m",
            "resolver",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream_arg(upstream),
        ]
        for fallback in fallbacks or []:
            args += ["--fallback", upstream_arg(fallback)]
        if config is not None:
            config_path = self.workdir / f"resolver-{index}.toml"
            config_path.write_text(config if isinstance(config, str) else render_toml(config))
            args += ["--config", str(config_path)]
        args += extra_args or []
        process = ResolverProcess(args, port, self.workdir / f"resolver-{index}.log")
        self.started.append(process)
        if wait:
            process.wait_ready()
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture
def resolver_process(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., ResolverProcess]]:
    """Factory that starts the real resolver CLI and waits until it answers DNS.

    ``resolver_process(upstream=knot_or_fake, config={...}, extra_args=[...])``; with no
    upstream it forwards to the session's knotd. ``config`` is written as TOML and passed with
    ``--config``. Each process is stopped (SIGTERM, then SIGKILL) at teardown.
    """
    launcher = ResolverLauncher(tmp_path)

    def start(upstream: Upstream | None = None, **kwargs: object) -> ResolverProcess:
        if upstream is None:
            upstream = request.getfixturevalue("knot")
        return launcher.start(upstream, **kwargs)  # type: ignore[arg-type]

    yield start
    launcher.stop_all()
