"""The command line: refusals are one line naming the key and the fix; query prints like dig."""

from __future__ import annotations

import socket
from pathlib import Path

from click.testing import CliRunner

from resolver.cli import main

from fakeupstream import FakeUpstream


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_bad_config_key_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("max_ttl_seconds = -1\n")
    code, output = run("serve", "--config", str(path), "--upstream", "127.0.0.1:9")
    assert code == 1
    assert error_lines(output) == [
        "Error: max_ttl_seconds: must be an integer from 1 to 604800 (got -1)"]


def test_forwarding_loop_is_refused(tmp_path: Path) -> None:
    code, output = run("serve", "--listen", "127.0.0.1:5399", "--upstream", "127.0.0.1:5399")
    assert code == 1 and "forwarding loop" in output and len(error_lines(output)) == 1


def test_tcp_port_in_use_is_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        code, output = run("serve", "--listen", f"127.0.0.1:{port}", "--upstream",
                           "127.0.0.1:9")
    assert code == 1
    [line] = error_lines(output)
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port} (tcp): the address is in use")


def test_query_prints_the_answer_and_the_time() -> None:
    with FakeUpstream() as upstream:
        code, output = run("query", "example.test", "MX", "--server",
                           f"127.0.0.1:{upstream.port}")
    assert code == 0
    assert "example.test. 300 IN MX 10 mx1.example.test." in output
    assert ";; Query time:" in output


def test_query_unknown_type() -> None:
    code, output = run("query", "example.test", "NOPE", "--server", "127.0.0.1:9")
    assert code == 1 and "unknown record type" in output
