"""The open-loop load generator: schedule, matching and accounting, against a fake upstream.

Counts only: nothing here asserts how fast the machine is. The pure ``LoadRun`` tests take the
clock as an argument, so their times are exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import dns.message
import dns.rcode
import pytest
import trio

from resolver.bench import loadgen, workload
from resolver.bench.loadgen import LoadRun, check_target, prepare, run_load

from fakeupstream import FakeUpstream

LOOKUPS = [
    *workload.queries(workload.MailMix(n_domains=20), 1, 500),
    ("example.test.", "A"),  # FakeUpstream's own data: a NOERROR among the NXDOMAINs
    ("mx1.example.test.", "A"),
]


def assert_consistent(result: loadgen.LoadResult) -> None:
    assert result.answered + result.timeouts == result.sent
    assert sum(result.rcodes.values()) == result.answered
    assert sum(bucket.sent for bucket in result.seconds) == result.sent
    for bucket in result.seconds:
        assert bucket.answered + bucket.timeouts == bucket.sent


async def test_open_loop_sends_on_schedule(
    fake_upstream: Callable[..., FakeUpstream],
) -> None:
    upstream = fake_upstream("answer")
    result = await run_load(upstream.addr, LOOKUPS, rate_qps=200, duration_s=1.0)
    assert result.scheduled == 200
    assert 198 <= result.sent <= 202
    assert result.answered == result.sent
    assert result.timeouts == 0
    assert result.unmatched == result.mismatched == result.send_errors == 0
    assert set(result.rcodes) <= {"NOERROR", "NXDOMAIN"}
    assert upstream.wait_for_queries(result.sent)
    assert upstream.udp_count == result.sent
    assert result.latency_p50_s is not None and result.latency_max_s is not None
    assert result.latency_p50_s <= result.latency_max_s <= result.timeout_s
    assert_consistent(result)
    json.dumps(result.to_dict())  # the CLI prints it


async def test_dropping_upstream_times_out_and_the_run_is_bounded(
    fake_upstream: Callable[..., FakeUpstream],
) -> None:
    upstream = fake_upstream("drop")
    duration_s, timeout_s = 0.5, 0.5
    started = trio.current_time()
    result = await run_load(upstream.addr, LOOKUPS, 100, duration_s, timeout_s=timeout_s)
    elapsed = trio.current_time() - started
    assert 48 <= result.sent <= 52
    assert result.answered == 0
    assert result.timeouts == result.sent
    assert result.latency_p99_s is None
    assert upstream.wait_for_queries(result.sent)
    # A bound, not a speed claim: a run never waits more than timeout_s after its schedule.
    assert elapsed < duration_s + timeout_s + 0.5
    assert_consistent(result)


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::1", "10.0.0.2", "localhost"])
async def test_non_loopback_refused(host: str) -> None:
    with pytest.raises(ValueError):
        await run_load((host, 53), LOOKUPS, 10, 0.1)


def test_non_loopback_allowed_only_when_asked() -> None:
    assert check_target(("192.0.2.1", 53), allow_non_loopback=True) == ("192.0.2.1", 53)
    assert check_target(("::1", 53)) == ("::1", 53)
    assert check_target(("127.0.0.2", 53)) == ("127.0.0.2", 53)


def test_cli_prints_json(fake_upstream: Callable[..., FakeUpstream], capsys) -> None:
    upstream = fake_upstream("answer")
    argv = ["--server", f"127.0.0.1:{upstream.port}", "--rate", "100", "--duration", "0.2"]
    assert loadgen.main([*argv, "--domains", "10", "--timeout", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sent"] == report["answered"] == 20
    assert loadgen.main(["--server", "192.0.2.1:53"]) == 2


# -- the pure bookkeeping, clock as an argument -----------------------------------------------


def reply_to(wire: bytes, rcode: int = dns.rcode.NOERROR) -> bytes:
    reply = dns.message.make_response(dns.message.from_wire(wire))
    reply.set_rcode(rcode)
    return reply.to_wire()


def test_schedule_is_floor_rate_times_t_plus_one() -> None:
    run = LoadRun(prepare(LOOKUPS), rate_qps=200, duration_s=1.0, timeout_s=1.0, sockets=4)
    assert run.scheduled == 200
    assert [run.due(t) for t in (-0.1, 0.0, 0.0049, 0.005, 0.5, 0.999, 1.0, 7.0)] == [
        0, 1, 1, 2, 101, 200, 200, 200,
    ]  # fmt: skip
    # A late wake-up sends late but stays in the second its query was due in.
    for k in range(200):
        run.take(k / 200 + 0.004)
    assert [(b.second, b.sent) for b in run.result(1.0).seconds] == [(0, 200)]
    assert run.max_schedule_lag_s == pytest.approx(0.004)
    # rate * duration a hair above an integer must not add a query.
    assert LoadRun(prepare(LOOKUPS), 10, 0.7, 1.0, 1).scheduled == 7


def test_replies_are_matched_by_socket_id_and_question() -> None:
    run = LoadRun(prepare(LOOKUPS), rate_qps=1000, duration_s=1.0, timeout_s=0.5, sockets=2)
    sent = [run.take(k / 1000) for k in range(4)]
    assert [socket_index for socket_index, _ in sent] == [0, 1, 0, 1]
    (s0, w0), (s1, w1), (s2, w2), (s3, w3) = sent
    run.on_reply(s0, reply_to(w0, dns.rcode.NXDOMAIN), 0.010)
    run.on_reply(s1, reply_to(w0), 0.010)  # socket 0's ID, on socket 1: not pending there
    run.on_reply(s1, reply_to(w1), 0.601)  # late: 0.6 s after its send, timeout is 0.5 s
    wrong_question = bytearray(reply_to(w3))
    wrong_question[loadgen.HEADER_BYTES + 1] ^= 0x01  # first letter of the name changed
    run.on_reply(s3, bytes(wrong_question), 0.005)
    forged = dns.message.make_response(dns.message.make_query("spoofed.test.", "A"))
    forged.id = int.from_bytes(w3[:2], "big")
    run.on_reply(s3, forged.to_wire(), 0.005)
    run.on_reply(s2, w2, 0.005)  # a query, not a reply (QR clear)
    run.on_reply(s0, reply_to(w0), 0.02)  # a duplicate
    assert run.mismatched == 2  # and w3 stays pending: the right reply could still come
    assert run.outstanding == 2  # w2 and w3
    assert run.unmatched == 3
    result = run.result(wall_time_s=1.0)
    assert result.sent == 4
    assert result.answered == 1
    assert result.rcodes == {"NXDOMAIN": 1}
    assert result.late == 1
    assert result.timeouts == 3
    assert result.latency_max_s == pytest.approx(0.010)
    assert result.seconds == [loadgen.SecondBucket(0, 4, 1, 3, pytest.approx(0.010))]


def test_ids_do_not_repeat_within_65536_sends_per_socket() -> None:
    run = LoadRun(prepare(LOOKUPS), rate_qps=1e6, duration_s=1.0, timeout_s=1.0, sockets=2)
    ids: dict[int, set[int]] = {0: set(), 1: set()}
    for k in range(2 * 65536):
        socket_index, wire = run.take(k / 1e6)
        ids[socket_index].add(int.from_bytes(wire[:2], "big"))
    assert len(ids[0]) == len(ids[1]) == 65536
    assert run.id_reuses == 0
    run.take(0.2)  # the next send on socket 0 reuses an ID nobody answered
    assert run.id_reuses == 1
