"""The scaffolding the root benchmarks under bench/ share (standard library only).

bench/core_bench.py, bench/incident.py and bench/capacity_bench.py each start servers as child
processes, run themselves again inside a private network namespace, count packets with
nftables and record the machine they ran on. This module holds those pieces once; what each
benchmark measures stays in its script.

Only the standard library is imported here: the scripts import this module before they have
re-executed themselves under the project's venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
STOP_GRACE_SECONDS = 5.0
# How long the parent waits for the re-executed child after it returned or failed.
CHILD_STOP_SECONDS = 30.0

Log = Callable[[str], None]


def make_log(prefix: str) -> Log:
    """A logger writing ``[PREFIX HH:MM:SS] message`` lines to stderr, flushed at once."""

    def log(message: str) -> None:
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


# --- processes we start, and only those ------------------------------------------------


class Process:
    """A child we started; stopped by its PID only: SIGTERM, a grace period, then SIGKILL.

    Its stdout and stderr go to ``log_path``; ``log_tail`` reads the end back for error
    messages. ``pid`` is the child's own PID (``taskset`` execs the program, so it is the
    server's PID too, the one /proc is read for).
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *, log: Log,
                 stop_grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._say = log
        self._stop_grace_seconds = stop_grace_seconds
        self._log = log_path.open("wb")
        log(f"start {name}: {shlex.join(self.argv)}")
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's log ("" if it cannot be read)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM, wait the grace period, SIGKILL if still running; close the log file."""
        if self.alive():
            self.popen.terminate()
            grace = self._stop_grace_seconds
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._say(f"{self.name} ignored SIGTERM for {grace}s: SIGKILL")
                self.popen.kill()
                self.popen.wait()
        self._log.close()


# --- ports and readiness ----------------------------------------------------------------


def free_port(address: str = LOOPBACK) -> int:
    """A port free for both UDP and TCP on ``address`` right now (servers listen on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
                return port


def dns_query(name: str, qtype: int = 1, qid: int | None = None) -> bytes:
    """A minimal RD query (class IN), built by hand so readiness probes need no DNS library.

    ``qid`` defaults to a random 16-bit ID.
    """
    if qid is None:
        qid = random.getrandbits(16)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(
        bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")
    )
    return header + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def wait_answering(process: Process | None, address: str, port: int, probe_name: str, *,
                   timeout_seconds: float, retry_seconds: float, qid: int | None = None) -> None:
    """Wait until the server answers a UDP query (any rcode): listening is not enough.

    Raises RuntimeError if ``process`` exits first or nothing answers within
    ``timeout_seconds``. ``qid`` is every probe's ID (None: a random one per probe).
    """
    deadline = time.monotonic() + timeout_seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
            query = dns_query(probe_name, qid=qid)
            sock.sendto(query, (address, port))
            with contextlib.suppress(OSError):
                if sock.recv(4096)[:2] == query[:2]:
                    return
            time.sleep(retry_seconds)
    name = process.name if process else f"port {port}"
    tail = process.log_tail() if process else ""
    raise RuntimeError(f"{name} did not answer within {timeout_seconds}s\n{tail}")


# --- the network namespace ----------------------------------------------------------------


def run_in_namespace(
    script: Path, argv: Sequence[str], python: str, *, namespace: str, env_var: str, log: Log,
    forward_signals: Collection[int] = (signal.SIGTERM,),
) -> int:
    """Create ``namespace``, run ``script`` again inside it, delete the namespace.

    The child runs as ``ip netns exec NAMESPACE PYTHON SCRIPT ARGV...`` with ``env_var`` set to
    the namespace's name (its sign that it is inside), after ``lo`` is brought up. SIGINT and
    SIGTERM get a Python handler here (not SIG_IGN, which the child would inherit) that passes
    the signals in ``forward_signals`` on to the child: Ctrl-C already reaches it through the
    terminal's process group. Whatever happens, a child still running is stopped (SIGTERM, then
    SIGKILL after CHILD_STOP_SECONDS) and the namespace deleted. Returns the child's exit code.
    """
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is not None and child.poll() is None and signum in forward_signals:
            child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"],
                       check=True)
        child = subprocess.Popen(
            ["ip", "netns", "exec", namespace, python, str(script.resolve()), *argv],
            env={**os.environ, env_var: namespace},
        )
        while True:
            try:
                return child.wait()
            except InterruptedError:
                continue
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(CHILD_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
        log(f"deleted network namespace {namespace}")


def venv_python(venv_python_path: Path) -> str:
    """The project's venv interpreter if it exists, else the running one."""
    return str(venv_python_path) if venv_python_path.exists() else sys.executable


def reexec_in_venv(script: Path, argv: Sequence[str], venv_python_path: Path) -> None:
    """Replace this process by ``script`` under the venv's Python, unless already in a venv.

    Returns only when no exec happened (already in a venv, or no venv to go to).
    """
    if sys.prefix == sys.base_prefix and venv_python_path.exists():
        python = str(venv_python_path)
        os.execv(python, [python, str(script.resolve()), *argv])


def sigterm_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so ``finally`` blocks stop children and clean up."""

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


# --- nftables -------------------------------------------------------------------------------


def nft_load(ruleset: str) -> None:
    """Load an nftables ruleset (``nft -f -``)."""
    subprocess.run(["nft", "-f", "-"], input=ruleset.encode(), check=True)


def nft_delete_table(table: str, family: str = "inet") -> None:
    """Delete a table; no error if it is already gone."""
    subprocess.run(["nft", "delete", "table", family, table], check=False)


def parse_nft_counters(out: bytes | str) -> dict[str, int]:
    """Packets per named counter, from the JSON of ``nft -j list counter(s) ...``."""
    return {item["counter"]["name"]: int(item["counter"]["packets"])
            for item in json.loads(out)["nftables"] if "counter" in item}


# --- what the figures ran on ----------------------------------------------------------------


def cpu_model() -> str:
    """The first ``model name`` in /proc/cpuinfo, or "unknown"."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def tool_version(argv: list[str]) -> str:
    """The first line of a tool's output that holds a dotted version ("" if none or no tool)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return next((line for line in text if re.search(r"\d+\.\d+", line)), "")
    return ""


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    return Path("/proc/loadavg").read_text().split()[:3]


def git_state(repo: Path) -> str:
    """HEAD plus whether resolver/ differs from it: the figures belong to that code."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "resolver"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' + uncommitted changes in resolver/' if dirty else ''}"
    return "unknown"


def start_unbound(tmp: Path, listen: str, port: int, forwarders: Sequence[str], core: str,
                  log: Log, *, local_zones: Sequence[str], options: Sequence[str] = (),
                  verbosity: int = 0) -> Process:
    """unbound as a one-thread forwarding cache, the peer every benchmark compares against.

    No validator (module-config "iterator"), so no aggressive NSEC (RFC 8198) or RFC 8020 cut:
    every fresh NXDOMAIN name is a real upstream round trip, as for the resolver.
    `local_zones` are set `nodefault`: unbound answers RFC 6761 names such as "test." and the
    RFC 6303 TEST-NET reverse zones itself unless told not to. `options` are further
    `server:` lines (cache sizes, prefetch); `forwarders` are "ADDR@PORT" strings.
    """
    conf = tmp / "unbound.conf"
    lines = [
        "server:",
        "    num-threads: 1",
        f"    interface: {listen}@{port}",
        f"    port: {port}",
        "    do-ip6: no",
        "    do-not-query-localhost: no",
        "    access-control: 127.0.0.0/8 allow",
        '    chroot: ""',
        '    username: ""',
        f'    directory: "{tmp}"',
        f'    pidfile: "{tmp}/unbound.pid"',
        "    use-syslog: no",
        '    logfile: ""',
        f"    verbosity: {verbosity}",
        '    module-config: "iterator"',
        *(f"    {option}" for option in options),
        *(f'    local-zone: "{zone}" nodefault' for zone in local_zones),
        "remote-control:",
        "    control-enable: no",
        "forward-zone:",
        '    name: "."',
        *(f"    forward-addr: {forwarder}" for forwarder in forwarders),
    ]
    conf.write_text("\n".join(lines) + "\n")
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"unbound-checkconf: {check.stdout}{check.stderr}")
    return Process("unbound", ["taskset", "-c", core, "unbound", "-d", "-c", str(conf)],
                   tmp / "unbound.log", log=log)
