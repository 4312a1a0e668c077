"""`resolver serve --workers N`: the budget split, per-worker settings, two workers end to end."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dns.message
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resolver import config as config_mod
from resolver.bench.authority import free_port
from resolver.core.budget import default_burst
from resolver.core.model import Endpoint
from resolver.daemon import workers
from resolver.errors import ConfigError

from conftest import REPO_ROOT
from fakeupstream import FakeUpstream

WAIT_SECONDS = 15.0
AWS = Endpoint("169.254.169.253", 53)
OWN = Endpoint("192.0.2.53", 53)


# -- the budget split (pure) -------------------------------------------------------------------
@given(total=st.integers(1, 10_000_000), n=st.integers(1, 64))
def test_worker_shares_add_up_to_the_total(total: int, n: int) -> None:
    shares = [config_mod.worker_share(total, n, i) for i in range(n)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1
    if total >= n:
        assert min(shares) >= 1


@given(pps=st.integers(64, 100_000), burst=st.one_of(st.none(), st.integers(64, 100_000)),
       n=st.integers(1, 64), aws=st.booleans())
def test_budget_split_never_exceeds_the_configured_budget(pps: int, burst: int | None, n: int,
                                                          aws: bool) -> None:
    if aws:  # the AWS resolver's default budget, nothing configured
        base = config_mod.Config(upstream=(AWS,), workers=n)
        endpoint, total_pps = AWS, config_mod.AWS_RESOLVER_PPS
        total_burst = config_mod.AWS_RESOLVER_PPS // 10
    else:
        base = config_mod.Config(upstream=(OWN,), upstream_pps=pps, upstream_burst=burst,
                                 workers=n)
        endpoint, total_pps = OWN, pps
        total_burst = burst if burst is not None else pps // 10
    if min(total_pps, total_burst) < n:
        return
    config_mod.finalize(base, None, False)  # accepted
    shares = [config_mod.budget_for(config_mod.for_worker(base, i), endpoint) for i in range(n)]
    # None: the token bucket's default burst for that rate (one worker, nothing configured).
    shares = [(p, b if b is not None else int(default_burst(p))) for p, b in shares]
    assert all(p >= 1 and b >= 1 for p, b in shares)
    assert sum(p + b for p, b in shares) <= total_pps + total_burst
    assert sum(p for p, _ in shares) == total_pps


def test_one_worker_keeps_the_budget_as_configured() -> None:
    base = config_mod.Config(upstream=(OWN,), upstream_pps=500)
    assert config_mod.budget_for(base, OWN) == (500, None)
    assert config_mod.budget_for(base, AWS) == (500, None)
    assert config_mod.budget_for(config_mod.Config(), AWS) == (config_mod.AWS_RESOLVER_PPS, None)


def test_a_budget_too_small_to_share_is_refused() -> None:
    base = config_mod.Config(upstream=(OWN,), upstream_pps=100, upstream_burst=3, workers=4)
    with pytest.raises(ConfigError, match="workers: 4 workers cannot share"):
        config_mod.finalize(base, None, False)


def test_port_zero_is_refused_with_workers() -> None:
    base = config_mod.Config(upstream=(OWN,), listen=(Endpoint("127.0.0.1", 0),), workers=2)
    with pytest.raises(ConfigError, match="port 0"):
        config_mod.finalize(base, None, False)


def test_workers_key_is_range_checked() -> None:
    assert config_mod.parse({"workers": 4}).workers == 4
    with pytest.raises(ConfigError, match="workers: must be an integer from 1 to 64"):
        config_mod.parse({"workers": 65})


def test_each_worker_has_its_own_metrics_port_and_control_path() -> None:
    base = config_mod.Config(metrics=Endpoint("127.0.0.1", 9153), control="/run/r/c.sock",
                             workers=3)
    w0, w2 = config_mod.for_worker(base, 0), config_mod.for_worker(base, 2)
    assert (w0.metrics, w0.control) == (Endpoint("127.0.0.1", 9153), "/run/r/c.sock")
    assert (w2.metrics, w2.control) == (Endpoint("127.0.0.1", 9155), "/run/r/c.sock.2")
    unset = config_mod.Config(workers=2)
    assert config_mod.for_worker(unset, 1, "/run/resolver/control.sock").control == \
        "/run/resolver/control.sock.1"
    assert config_mod.for_worker(unset, 1, None).control is None


def test_child_argv_repeats_the_flags() -> None:
    argv = workers.child_argv({"config_path": "r.toml", "listen": ("127.0.0.1:53", "[::1]:53"),
                               "upstream": (), "upstream_pps": 900, "metrics": None,
                               "workers": 2, "worker_index": None}, 1)
    assert argv[1:] == ["-m", "resolver", "serve", "--config", "r.toml",
                        "--listen", "127.0.0.1:53", "--listen", "[::1]:53",
                        "--upstream-pps", "900", "--workers", "2", "--worker-index", "1"]


# -- two workers end to end --------------------------------------------------------------------
def _two_free_ports() -> int:
    """A port p with p and p + 1 free for TCP (metrics of worker 0 and 1)."""
    for _ in range(50):
        port = free_port("127.0.0.1")
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two adjacent free ports")


def _wait(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _queries_counted(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("resolver_queries_total{"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_share_one_port_and_stop_on_sigterm(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    metrics_port = _two_free_ports()
    log_path = tmp_path / "resolver.log"
    with FakeUpstream() as upstream, log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "resolver", "serve", "--listen", f"127.0.0.1:{port}",
             "--upstream", f"{upstream.address}:{upstream.port}", "--workers", "2",
             "--upstream-pps", "1000", "--metrics", f"127.0.0.1:{metrics_port}",
             "--control", str(tmp_path / "control.sock")],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        pids: list[int] = []
        try:
            def log() -> str:
                return log_path.read_text(errors="replace")

            _wait(lambda: log().count("ready: listening") >= 2 or process.poll() is not None,
                  "two workers ready")
            assert process.poll() is None, log()
            assert "as worker 0 of 2" in log() and "as worker 1 of 2" in log()
            # Each worker's share of the 1000 packets/s budget (burst 100) is logged.
            assert log().count("budget 500 packets/s, burst 50") == 2, log()
            pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", log())]
            assert len(pids) == 2
            assert (tmp_path / "control.sock").exists()
            assert (tmp_path / "control.sock.1").exists()

            # 200 queries, each from a socket of its own (a new source port each).
            answered = 0
            for i in range(200):
                query = dns.message.make_query("example.test." if i % 2 else f"n{i}.example.test.",
                                               "A")
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(3.0)
                    s.bind(("127.0.0.1", 0))
                    s.sendto(query.to_wire(), ("127.0.0.1", port))
                    data, _ = s.recvfrom(65535)
                    answered += dns.message.from_wire(data).id == query.id
            assert answered == 200
            counted = [_queries_counted(metrics_port), _queries_counted(metrics_port + 1)]
            assert all(n > 0 for n in counted), counted  # both workers handled queries

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=WAIT_SECONDS) == 0, log()
            assert not any(_alive(pid) for pid in pids)
            assert "workers: all stopped" in log()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=WAIT_SECONDS)
            for pid in pids:  # workers this test started through the supervisor
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_a_dead_worker_is_restarted(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    log_path = tmp_path / "resolver.log"
    with FakeUpstream() as upstream, log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "resolver", "serve", "--listen", f"127.0.0.1:{port}",
             "--upstream", f"{upstream.address}:{upstream.port}", "--workers", "2"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        pids: list[int] = []
        try:
            def log() -> str:
                return log_path.read_text(errors="replace")

            _wait(lambda: log().count("ready: listening") >= 2 or process.poll() is not None,
                  "two workers ready")
            pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", log())]
            os.kill(pids[1], signal.SIGKILL)
            _wait(lambda: log().count("ready: listening") >= 3, "worker 1 restarted")
            assert f"worker 1 (pid {pids[1]}) exited unexpectedly" in log()
            pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", log())]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=WAIT_SECONDS) == 0, log()
            assert not any(_alive(pid) for pid in pids)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=WAIT_SECONDS)
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
