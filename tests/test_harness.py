"""resolver.bench.harness: the benchmarks' shared scaffolding, without namespaces or nftables.

run_in_namespace and the nft_* commands need root and change the machine: they are exercised
by running the benchmarks, not here. Everything else runs with ordinary children and sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import pytest

from resolver.bench import harness

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


class Logged:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(message)


def test_make_log_prefix_and_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    harness.make_log("unit-bench")("hello")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("[unit-bench ")
    assert captured.err.endswith("] hello\n")


def test_process_stop_terminates_a_sleep_child(tmp_path: Path) -> None:
    logged = Logged()
    process = harness.Process("sleeper", ["sleep", "60"], tmp_path / "sleep.log", log=logged)
    assert process.alive()
    assert process.pid == process.popen.pid
    assert logged.lines == ["start sleeper: sleep 60"]
    started = time.monotonic()
    process.stop()
    assert time.monotonic() - started < harness.STOP_GRACE_SECONDS
    assert not process.alive()
    assert process.popen.returncode == -signal.SIGTERM
    process.stop()  # a second stop is harmless


def test_process_stop_kills_a_child_ignoring_sigterm(tmp_path: Path) -> None:
    logged = Logged()
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    log_path = tmp_path / "stubborn.log"
    process = harness.Process("stubborn", [sys.executable, "-c", code], log_path, log=logged,
                              stop_grace_seconds=0.3)
    wait_for(lambda: "ready" in process.log_tail())
    process.stop()
    assert process.popen.returncode == -signal.SIGKILL
    assert logged.lines[-1] == "stubborn ignored SIGTERM for 0.3s: SIGKILL"


def test_process_log_tail(tmp_path: Path) -> None:
    process = harness.Process("counter", ["sh", "-c", "seq 1 30; exec sleep 60"],
                              tmp_path / "counter.log", log=Logged())
    try:
        wait_for(lambda: process.log_tail(1) == "30")
        assert process.log_tail(3) == "28\n29\n30"
        assert process.log_tail().splitlines() == [str(i) for i in range(11, 31)]
    finally:
        process.stop()
    process.log_path.unlink()
    assert process.log_tail() == ""


def test_free_port_is_bindable_for_udp_and_tcp() -> None:
    port = harness.free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        udp.bind((harness.LOOPBACK, port))
        tcp.bind((harness.LOOPBACK, port))


def test_dns_query_is_a_valid_rd_question() -> None:
    wire = harness.dns_query("mx1.example.test.", qtype=15, qid=0x1234)
    message = dns.message.from_wire(wire)
    assert message.id == 0x1234
    assert message.flags & dns.flags.RD
    (question,) = message.question
    assert question.name.to_text() == "mx1.example.test."
    assert question.rdtype == 15
    assert question.rdclass == 1
    # No trailing dot and a random ID by default.
    assert harness.dns_query("a.test")[2:] == harness.dns_query("a.test.")[2:]


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A UDP server that sends every datagram back: an 'answer' with the query's ID."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((harness.LOOPBACK, 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                continue
            sock.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        sock.close()


def test_wait_answering_returns_once_answered(echo_port: int) -> None:
    harness.wait_answering(None, harness.LOOPBACK, echo_port, "ready.test.",
                           timeout_seconds=5.0, retry_seconds=0.05, qid=7)


def test_wait_answering_times_out_without_a_server() -> None:
    port = harness.free_port()
    with pytest.raises(RuntimeError, match=f"port {port} did not answer within 0.3s"):
        harness.wait_answering(None, harness.LOOPBACK, port, "ready.test.",
                               timeout_seconds=0.3, retry_seconds=0.05)


def test_wait_answering_reports_an_exited_process(tmp_path: Path) -> None:
    process = harness.Process("quitter", ["sh", "-c", "echo bye; exit 3"],
                              tmp_path / "quitter.log", log=Logged())
    try:
        process.popen.wait(10)
        with pytest.raises(RuntimeError, match="quitter exited:\nbye"):
            harness.wait_answering(process, harness.LOOPBACK, harness.free_port(), "ready.test.",
                                   timeout_seconds=5.0, retry_seconds=0.05)
    finally:
        process.stop()


def test_parse_nft_counters() -> None:
    out = (b'{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},'
           b' {"counter": {"family": "inet", "name": "offered", "table": "t", "handle": 1,'
           b' "packets": 12, "bytes": 840}},'
           b' {"counter": {"family": "inet", "name": "passed", "table": "t", "handle": 2,'
           b' "packets": 5, "bytes": 350}}]}')
    assert harness.parse_nft_counters(out) == {"offered": 12, "passed": 5}
    assert harness.parse_nft_counters('{"nftables": []}') == {}


def test_sigterm_as_interrupt() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        harness.sigterm_as_interrupt()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never sleeps this long
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_machine_facts() -> None:
    assert harness.cpu_model()
    load = harness.loadavg()
    assert len(load) == 3
    assert all(float(value) >= 0 for value in load)
    assert harness.tool_version([sys.executable, "--version"]).startswith("Python 3.")
    assert harness.tool_version(["/nonexistent/tool", "--version"]) == ""


def test_git_state_names_head() -> None:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert harness.git_state(REPO).startswith(head)


def test_venv_python_falls_back_to_this_interpreter(tmp_path: Path) -> None:
    assert harness.venv_python(tmp_path / "missing" / "python") == sys.executable
    existing = tmp_path / "python"
    existing.touch()
    assert harness.venv_python(existing) == str(existing)


def test_unbound_config_is_accepted_and_unbound_answers(tmp_path: Path) -> None:
    from conftest import require_binary

    require_binary("unbound")
    port = harness.free_port()
    process = harness.start_unbound(tmp_path, "127.0.0.1", port, ["127.0.0.1@9"], "0",
                                    lambda message: None, local_zones=["test."],
                                    options=["prefetch: no", 'local-zone: "ready." static'])
    try:
        # A static local zone answers at once; the forwarder (port 9) never would.
        harness.wait_answering(process, "127.0.0.1", port, "probe.ready.", timeout_seconds=15.0,
                               retry_seconds=0.1)
        conf = (tmp_path / "unbound.conf").read_text()
        assert 'local-zone: "test." nodefault' in conf and "forward-addr: 127.0.0.1@9" in conf
    finally:
        process.stop()
