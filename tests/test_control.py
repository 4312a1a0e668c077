"""The control channel end to end: the CLI (in a thread) against the daemon on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator

import pytest
import trio
from click.testing import CliRunner, Result

from resolver.cli import main
from resolver.daemon import control

from dnsmsg import parse, query
from fakeupstream import FakeUpstream
from loopback import addr_of, ask_udp, running


@pytest.fixture
def sock_path() -> Iterator[str]:
    # A short directory: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    directory = tempfile.mkdtemp(prefix="rctl", dir="/tmp")
    yield os.path.join(directory, "control.sock")
    shutil.rmtree(directory, ignore_errors=True)


async def cli(*args: str) -> Result:
    """Run the (synchronous) CLI in a thread so the daemon keeps serving meanwhile."""
    return await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(main, list(args), catch_exceptions=False))


async def cli_json(*args: str) -> dict:
    result = await cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


async def ask(svc: object, name: str, rdtype: str = "A", qid: int = 1) -> None:
    await ask_udp(addr_of(svc), query(name, rdtype, qid=qid))


async def test_stats_count_the_queries_sent(sock_path: str) -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], control=sock_path) as svc:
            for i in range(6):  # 1 miss, 5 hits
                await ask(svc, "example.test.", qid=i)
            await ask(svc, "mx1.example.test.", qid=9)  # another miss
            reply = await cli_json("stats", "--control", sock_path)
            human = await cli("stats", "--control", sock_path)
    assert reply["queries_total"] == 7
    assert reply["queries_by_transport"]["udp"] == 7
    assert reply["cache"]["hits"] == 5 and reply["cache"]["misses"] == 2
    assert reply["cache"]["hit_ratio"] == pytest.approx(5 / 7, abs=1e-3)
    assert reply["upstream_packets_total"] == upstream.udp_count == 2
    assert reply["latency_ms"]["p50"] is not None
    assert reply["mode"] == "primary" and reply["override"] == "auto"
    assert human.exit_code == 0
    assert "cache hit ratio      71.4%  (5 hits, 2 misses)" in human.output


async def test_upstreams_show_role_and_state(sock_path: str) -> None:
    with FakeUpstream() as upstream, FakeUpstream() as spare:
        async with running([upstream], [spare], control=sock_path,
                           upstream_pps=500) as svc:
            await ask(svc, "example.test.")
            reply = await cli_json("upstreams", "--control", sock_path)
            human = await cli("upstreams", "--control", sock_path)
    first, second = reply["upstreams"]
    assert (first["upstream"], first["role"], first["state"]) == (
        f"127.0.0.1:{upstream.port}", "primary", "healthy")
    assert (second["role"], second["state"]) == ("fallback", "healthy")
    assert first["configured_pps"] == 500 and first["packets_total"] == 1
    assert first["loss"] == 0 and first["rtt_ms"]["mean"] is not None
    assert human.exit_code == 0
    assert f"127.0.0.1:{upstream.port}  primary   healthy" in human.output


async def test_lookup_finds_a_cached_name_and_flush_removes_it(sock_path: str) -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], control=sock_path) as svc:
            await ask(svc, "example.test.", "MX")
            await ask(svc, "example.test.", "A")
            found = await cli_json("cache", "lookup", "Example.TEST", "--control", sock_path)
            only_mx = await cli_json("cache", "lookup", "example.test", "MX",
                                     "--control", sock_path)
            human = await cli("cache", "lookup", "example.test", "MX", "--control", sock_path)
            flushed = await cli_json("cache", "flush", "--name", "example.test", "--type", "MX",
                                     "--control", sock_path)
            after = await cli_json("cache", "lookup", "example.test", "--control", sock_path)
            before = upstream.udp_count
            await ask(svc, "example.test.", "MX")
            await ask(svc, "example.test.", "A")  # not flushed: still a hit
            sent_after = upstream.udp_count - before
    assert sorted(e["type"] for e in found["entries"]) == ["A", "MX"]
    [mx] = only_mx["entries"]
    assert mx["kind"] == "positive" and 0 < mx["ttl_left"] <= 300 and mx["hits"] == 0
    assert any("MX 10 mx1.example.test." in r for r in mx["records"])
    assert "example.test. MX  positive  ttl" in human.output
    assert flushed == {"removed": 1, "remaining": 1}
    assert [e["type"] for e in after["entries"]] == ["A"]
    assert sent_after == 1  # the flushed MX went upstream again, the A did not


async def test_flush_all_and_negative_only(sock_path: str) -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], control=sock_path) as svc:
            await ask(svc, "example.test.")
            await ask(svc, "missing.test.")  # NXDOMAIN
            await ask(svc, "example.test.", "SRV")  # NODATA
            negative = await cli_json("cache", "flush", "--negative", "--control", sock_path)
            kept = await cli_json("cache", "lookup", "example.test", "--control", sock_path)
            everything = await cli_json("cache", "flush", "--control", sock_path)
            before = upstream.udp_count
            await ask(svc, "example.test.")
            sent_after = upstream.udp_count - before
    assert negative == {"removed": 2, "remaining": 1}
    assert [e["kind"] for e in kept["entries"]] == ["positive"]
    assert everything == {"removed": 1, "remaining": 0}
    assert sent_after == 1


async def test_dump_streams_every_entry(sock_path: str) -> None:
    names = [f"n{i}.test." for i in range(control.DUMP_BATCH + 50)]  # more than one batch
    answers = {(name, "A"): [f"192.0.2.{i % 250 + 1}"] for i, name in enumerate(names)}
    with FakeUpstream(answers) as upstream:
        async with running([upstream], control=sock_path) as svc:
            for i, name in enumerate(names):
                await ask(svc, name, qid=i)
            result = await cli("cache", "dump", "--json", "--control", sock_path)
            human = await cli("cache", "dump", "--control", sock_path)
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines[-1] == {"end": True, "count": len(names)}
    assert sorted(item["name"] for item in lines[:-1]) == sorted(names)
    assert human.output.rstrip().endswith(f";; {len(names)} entries")


async def test_repoint_fallback_sends_the_next_miss_to_the_fallback(sock_path: str) -> None:
    with FakeUpstream() as primary, FakeUpstream() as fallback:
        async with running([primary], [fallback], control=sock_path) as svc:
            await ask(svc, "example.test.")
            result = await cli_json("repoint", "fallback", "--control", sock_path)
            await ask(svc, "mx1.example.test.")
            state = await cli_json("upstreams", "--control", sock_path)
            back = await cli_json("repoint", "auto", "--control", sock_path)
            await ask(svc, "mx2.example.test.")
    assert result == {"override": "fallback", "previous": "auto", "mode": "primary"}
    assert state["override"] == "fallback"
    assert back["override"] == "auto"
    assert (primary.udp_count, fallback.udp_count) == (2, 1)
    assert [r.message.question[0].name.to_text() for r in fallback.queries] == [
        "mx1.example.test."]


async def test_reload_answers_whether_or_not_a_hook_exists(sock_path: str) -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], control=sock_path) as svc:
            result = await cli("reload", "--control", sock_path)
            await ask(svc, "example.test.")  # still serving
    if hasattr(svc, "reload"):
        # No reload_config was given to the in-process daemon: refused in one line, or applied.
        assert result.output.count("\n") == 1
    else:
        assert result.exit_code == 1 and "reload not available" in result.output


async def test_bad_requests_get_errors_and_the_daemon_keeps_serving(sock_path: str) -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], control=sock_path) as svc:
            def raw() -> list[dict]:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(sock_path)
                    s.sendall(b"{not json\n[1, 2]\n{\"command\": \"nope\"}\n"
                              b"{\"command\": \"cache lookup\"}\n"
                              b"{\"command\": \"repoint\", \"target\": \"moon\"}\n"
                              b"{\"command\": \"cache lookup\", \"name\": \"x.test\", "
                              b"\"type\": \"BOGUS\"}\n" + b"x" * (control.MAX_REQUEST_BYTES + 10))
                    reader = s.makefile("rb")
                    return [json.loads(line) for line in reader]  # the server closes at the end

            replies = await trio.to_thread.run_sync(raw)
            msg = parse(await ask_udp(addr_of(svc), query("example.test.", "A")))
            stats = await cli_json("stats", "--control", sock_path)
    assert len(replies) == 7 and all(set(r) == {"error"} for r in replies)
    assert replies[0]["error"].startswith("not JSON")
    assert "unknown command" in replies[2]["error"]
    assert "longer than" in replies[6]["error"]
    assert msg.answer and stats["queries_total"] == 1


async def test_socket_is_mode_0600_and_removed_at_exit(sock_path: str) -> None:
    with FakeUpstream() as upstream:
        async with running([upstream], control=sock_path):
            mode = os.stat(sock_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not os.path.exists(sock_path)


def test_missing_socket_is_one_line_and_exit_1(sock_path: str) -> None:
    result = CliRunner().invoke(main, ["stats", "--control", sock_path])
    assert result.exit_code == 1
    assert result.output == (f"Error: no resolver is running with control socket {sock_path} "
                             "(or --control is wrong)\n")
