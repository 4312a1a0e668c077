"""Lifecycle: sd_notify, reload on SIGHUP, drain on SIGTERM, warm restart, logs, the unit file.

The daemon runs as the real CLI in a subprocess against a FakeUpstream on loopback; every wait
polls with a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rrset
import pytest

from resolver import config as config_mod
from resolver.bench.authority import free_port
from resolver.core import snapshot, wire
from resolver.core.cache import Cache, TtlPolicy
from resolver.daemon import logs, sdnotify
from resolver.daemon.lifecycle import SNAPSHOT_FILE

from conftest import REPO_ROOT
from fakeupstream import FakeUpstream, SlowUpstream

WAIT_SECONDS = 10.0
POLL_SECONDS = 0.02
UPSTREAM_TTL = 3000


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT_SECONDS) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Daemon:
    """`python -m resolver serve` with its log in a file; stopped by PID at teardown."""

    def __init__(self, workdir: Path, upstream: FakeUpstream, config_text: str,
                 extra_args: list[str] = (), env: dict[str, str] | None = None,
                 name: str = "resolver") -> None:
        self.port = free_port("127.0.0.1")
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        args = [sys.executable, "-m", "resolver", "serve", "--config", str(self.config_path),
                "--listen", f"127.0.0.1:{self.port}",
                "--upstream", f"{upstream.address}:{upstream.port}", *extra_args]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=self._log, cwd=REPO_ROOT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"resolver exited ({self.process.returncode}):\n{self.log()}")
            return self.log().count(text) >= count
        wait_for(seen, f"{text!r} in the log:\n{self.log()}")

    def ask(self, name: str, rdtype: str = "A") -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", timeout=2.0,
                             port=self.port)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=WAIT_SECONDS)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT_SECONDS)
        self._log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(upstream: FakeUpstream, config_text: str, **kwargs: object) -> Daemon:
        daemon = Daemon(tmp_path, upstream, config_text, name=f"resolver-{len(started)}",
                        **kwargs)  # type: ignore[arg-type]
        started.append(daemon)
        daemon.wait_log("ready: listening")
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def upstream_asked(upstream: FakeUpstream, name: str) -> int:
    return sum(1 for q in upstream.queries
               if q.message.question[0].name.to_text().lower() == name)


def answer_ttl(msg: dns.message.Message) -> int:
    assert msg.answer, msg.to_text()
    return msg.answer[0].ttl


# -- reload --------------------------------------------------------------------------------
def test_sighup_applies_a_good_config_and_keeps_the_cache(
        daemons: Callable[..., Daemon]) -> None:
    with FakeUpstream(ttl=UPSTREAM_TTL) as upstream:
        daemon = daemons(upstream, "max_ttl_seconds = 3600\n")
        assert answer_ttl(daemon.ask("example.test.")) == UPSTREAM_TTL
        daemon.config_path.write_text("max_ttl_seconds = 100\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log("reload: applied")
        assert "changed max_ttl_seconds; cache kept (" in daemon.log()
        # New answers follow the new policy...
        assert answer_ttl(daemon.ask("mx1.example.test.")) <= 100
        # ...and the cached one is still there: no second upstream query for it.
        assert answer_ttl(daemon.ask("example.test.")) > 100
        assert upstream_asked(upstream, "example.test.") == 1


def test_sighup_refuses_a_bad_config_in_one_line_and_keeps_serving(
        daemons: Callable[..., Daemon]) -> None:
    with FakeUpstream(ttl=UPSTREAM_TTL) as upstream:
        daemon = daemons(upstream, "max_ttl_seconds = 3600\n")
        daemon.config_path.write_text("max_ttl_seconds = 0\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log("reload refused")
        refused = [line for line in daemon.log().splitlines() if "reload" in line and
                   "SIGHUP" not in line]
        assert len(refused) == 1, refused
        assert "max_ttl_seconds: must be an integer from 1 to 604800 (got 0)" in refused[0]
        assert "still serving the previous configuration" in refused[0]
        assert answer_ttl(daemon.ask("example.test.")) == UPSTREAM_TTL  # old max_ttl holds


def test_sighup_keeps_socket_settings_and_says_a_restart_is_needed(
        daemons: Callable[..., Daemon]) -> None:
    with FakeUpstream() as upstream:
        daemon = daemons(upstream, "")
        daemon.config_path.write_text('allow = ["10.0.0.0/8"]\nmax_tries = 2\n')
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log("reload: applied")
        assert "reload: allow changed in" in daemon.log()
        assert "only take effect after a restart" in daemon.log()
        assert "changed max_tries;" in daemon.log()
        assert daemon.ask("example.test.").answer  # still answering loopback: ACL kept


# -- shutdown and warm restart ---------------------------------------------------------------
def test_sigterm_drains_writes_the_snapshot_and_a_restart_is_warm(
        daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config_text = f'state_directory = "{state}"\n'
    with FakeUpstream(ttl=UPSTREAM_TTL) as upstream:
        daemon = daemons(upstream, config_text)
        first_ttl = answer_ttl(daemon.ask("example.test."))
        started = time.monotonic()
        assert daemon.terminate() == 0
        assert time.monotonic() - started < 5.0
    assert "cache snapshot: wrote" in daemon.log()
    path = state / SNAPSHOT_FILE
    assert path.exists() and not list(state.glob(".*.tmp"))
    # Pretend the resolver was down for 1000 s: move the snapshot's wall time back.
    data = bytearray(path.read_bytes())
    (wall,) = struct.unpack_from("!d", data, 8)
    struct.pack_into("!d", data, 8, wall - 1000)
    path.write_bytes(bytes(data))
    with FakeUpstream(ttl=UPSTREAM_TTL) as fresh:
        daemon = daemons(fresh, config_text)
        assert "cache snapshot: restored" in daemon.log()
        msg = daemon.ask("example.test.")
        assert msg.answer[0][0].address == "192.0.2.1"
        assert first_ttl - 1002 <= answer_ttl(msg) <= first_ttl - 1000
        assert fresh.udp_count == 0 and fresh.tcp_count == 0


def test_sigterm_lets_a_fetch_in_flight_answer_its_client(
        daemons: Callable[..., Daemon]) -> None:
    with SlowUpstream(delay_seconds=0.5) as upstream:
        daemon = daemons(upstream, "upstream_timeout_seconds = 2.0\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT_SECONDS)
            client.sendto(dns.message.make_query("example.test.", "A").to_wire(),
                          ("127.0.0.1", daemon.port))
            assert upstream.wait_for_queries(1)
            daemon.process.send_signal(signal.SIGTERM)
            reply = dns.message.from_wire(client.recv(65535))
        assert reply.answer[0][0].address == "192.0.2.1"
        assert daemon.process.wait(timeout=WAIT_SECONDS) == 0


def test_a_corrupt_snapshot_means_a_cold_start_and_one_line(
        daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / SNAPSHOT_FILE).write_bytes(snapshot.MAGIC + b"\x00\x01" + os.urandom(64))
    with FakeUpstream() as upstream:
        daemon = daemons(upstream, f'state_directory = "{state}"\n')
        lines = [line for line in daemon.log().splitlines() if "cache snapshot" in line]
        assert len(lines) == 1 and "unusable" in lines[0] and "cold start" in lines[0], lines
        assert daemon.ask("example.test.").answer
        assert upstream_asked(upstream, "example.test.") == 1


# -- sd_notify -------------------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(WAIT_SECONDS)
        yield sock, path


def receive_until(sock: socket.socket, line: str) -> list[str]:
    messages = []
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        messages.append(sock.recv(4096).decode())
        if line in messages[-1].splitlines():
            return messages
    raise AssertionError(f"no {line} in {messages}")


def test_daemon_notifies_ready_then_stopping(
        daemons: Callable[..., Daemon], notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    with FakeUpstream() as upstream:
        daemon = daemons(upstream, "", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        ready = receive_until(sock, "READY=1")[-1].splitlines()
        assert any(line.startswith("STATUS=serving on 127.0.0.1:") for line in ready)
        assert f"MAINPID={daemon.process.pid}" in ready
        receive_until(sock, "WATCHDOG=1")  # every 0.1 s: half of WATCHDOG_USEC
        assert daemon.terminate() == 0
        assert any("STOPPING=1" in m.splitlines() for m in receive_until(sock, "STOPPING=1"))


def test_notifier_sends_datagrams_and_is_a_no_op_when_unset(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    assert sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": path}).status("warming up")
    assert sock.recv(4096) == b"STATUS=warming up"
    assert not sdnotify.Notifier.from_environ({}).notify("READY=1")
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({}) is None


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"resolver-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT_SECONDS)
        assert sdnotify.Notifier(f"@{name}").notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_a_dead_notify_socket_is_logged_once_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = sdnotify.Notifier(str(tmp_path / "nobody"))
    with caplog.at_level(logging.WARNING, logger="resolver"):
        assert not notifier.notify("READY=1")
        assert not notifier.notify("STOPPING=1")
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


# -- logging ---------------------------------------------------------------------------------
def test_json_log_format_is_one_object_per_line(daemons: Callable[..., Daemon]) -> None:
    with FakeUpstream() as upstream:
        daemon = daemons(upstream, "", extra_args=["--log-format", "json"])
        assert daemon.terminate() == 0
    lines = daemon.log().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("ready: listening") for r in records)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["time"])


def test_repeat_filter_holds_back_identical_messages_for_a_window() -> None:
    now = [0.0]
    repeat = logs.RepeatFilter(window_seconds=10.0, clock=lambda: now[0])

    def record(message: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("resolver", logging.WARNING, __file__, 1, message, args, None)

    first = record("upstream %s down", "10.0.0.2:53")
    assert repeat.filter(first)
    assert not repeat.filter(record("upstream %s down", "10.0.0.2:53"))
    assert repeat.filter(record("upstream %s down", "10.0.0.3:53"))  # a different line
    now[0] = 5.0
    assert not repeat.filter(record("upstream %s down", "10.0.0.2:53"))
    now[0] = 10.0
    after = record("upstream %s down", "10.0.0.2:53")
    assert repeat.filter(after)
    assert after.getMessage() == "upstream 10.0.0.2:53 down (repeated 2 times)"
    now[0] = 25.0
    quiet = record("upstream %s down", "10.0.0.2:53")
    assert repeat.filter(quiet) and quiet.getMessage() == "upstream 10.0.0.2:53 down"


# -- snapshot format -------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [
    lambda d: d[:-3],  # truncated
    lambda d: d[:30] + bytes([d[30] ^ 0xFF]) + d[31:],  # a flipped byte
    lambda d: b"PICKLE" + d[6:],  # not ours
    lambda d: d[:6] + b"\x00\x63" + d[8:],  # a future version
    lambda d: b"",
])
def test_damaged_snapshots_are_rejected_whole(damage: Callable[[bytes], bytes]) -> None:
    reply = dns.message.make_response(dns.message.make_query("example.test.", "A"))
    reply.answer.append(dns.rrset.from_text("example.test.", 300, "IN", "A", "192.0.2.1"))
    data = reply.to_wire()
    scan = wire.scan_reply(data)
    key = wire.cache_key(data[12:scan.qend - 4], data[scan.qend - 4:scan.qend], 0)
    cache = Cache(100, 1 << 20, TtlPolicy())
    cache.store(key, scan, now=50.0)
    good = snapshot.encode(cache.entries.values(), now=60.0, wall_now=1000.0)
    restored = Cache(100, 1 << 20, TtlPolicy())
    assert snapshot.restore(restored, good, now=7.0, wall_now=1030.0) == 1
    # 10 s old at snapshot, 30 s of downtime: 40 s of the 300 gone.
    assert restored.entries[key].expires_at == pytest.approx(7.0 + 260)
    with pytest.raises(snapshot.SnapshotError):
        snapshot.restore(restored := Cache(100, 1 << 20, TtlPolicy()), damage(good), 7.0, 1030.0)
    assert len(restored) == 0


# -- systemd files ---------------------------------------------------------------------------
SYSTEMD_DIR = REPO_ROOT / "systemd"


def test_example_config_parses() -> None:
    config = config_mod.load(SYSTEMD_DIR / "resolver.toml")
    assert config.listen and config.upstream


def test_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (SYSTEMD_DIR / "resolver.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit
    # verify insists the ExecStart binary exists: point a copy at one that does.
    unit = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", unit)
    copy = tmp_path / "resolver.service"
    copy.write_text(unit)
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60, check=False)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "resolver.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
