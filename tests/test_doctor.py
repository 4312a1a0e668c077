"""`resolver doctor`: each check's paths as pure functions, then end to end against an
in-process daemon with a control socket and fake upstreams. Loopback traffic only: a fixture
fails the test if any DNS query leaves 127.0.0.0/8 or ::1."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dns.query
import pytest
import trio
from click.testing import CliRunner, Result

from resolver import doctor
from resolver.cli import main
from resolver.core.model import Endpoint
from resolver.doctor import FAIL, OK, SKIPPED, WARN, Check, Probe

from fakeupstream import DEFAULT_ANSWERS, DroppingUpstream, FakeUpstream, Request, Response
from loopback import addr_of, running

DNSBL = "2.0.0.127.zen.dnsbl.test."  # a fake-only name: never the real Spamhaus zone in tests
ANSWERS = {**DEFAULT_ANSWERS, (".", "NS"): ["a.root.test."], (DNSBL, "A"): ["127.0.0.2"]}
LOCAL53 = [Endpoint("127.0.0.1", 53)]
ZERO_ETHTOOL = """NIC statistics:
     tx_timeout: 0
     bw_in_allowance_exceeded: 0
     bw_out_allowance_exceeded: 0
     pps_allowance_exceeded: 0
     conntrack_allowance_exceeded: 0
     linklocal_allowance_exceeded: 0
"""
DROPPING_ETHTOOL = ZERO_ETHTOOL.replace("linklocal_allowance_exceeded: 0",
                                        "linklocal_allowance_exceeded: 4711")
VETH_ETHTOOL = "NIC statistics:\n     peer_ifindex: 7\n     rx_queue_0_xdp_packets: 0\n"


class OpenResolverRefused(FakeUpstream):
    """Answers like Spamhaus does when the query came through a public/cloud resolver."""

    def handle(self, request: Request) -> Response:
        question = request.message.question[0]
        if question.name.to_text().lower() == DNSBL:
            reply = self.make_reply(request.message)
            reply.answer.append(self._rrset(question.name, "A", ["127.255.255.254"]))
            return reply
        return self.answer(request)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DNS query the doctor sends in these tests must go to loopback."""
    real = dns.query.udp

    def guarded(q: object, where: str, *args: object, **kwargs: object) -> object:
        assert ipaddress.ip_address(where).is_loopback, f"query to {where} in a test"
        return real(q, where, *args, **kwargs)

    monkeypatch.setattr(dns.query, "udp", guarded)


@pytest.fixture
def sock_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="rdoc", dir="/tmp")  # Unix socket paths are short
    yield os.path.join(directory, "control.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ethtool_zero(tmp_path: Path) -> str:
    path = tmp_path / "ethtool-zero.txt"
    path.write_text(ZERO_ETHTOOL)
    return str(path)


def probe(rcode: str | None = "NOERROR", answers: tuple[str, ...] = (), rtt: float = 1.5,
          name: str = ".", rdtype: str = "NS", error: str | None = None) -> Probe:
    return Probe(Endpoint("127.0.0.1", 5300), name, rdtype, rcode, rtt if rcode else None,
                 answers, error if rcode is None else None)


# -- 1. listening -------------------------------------------------------------------------------
SERVER = Endpoint("127.0.0.1", 53)
STATS = {"queries_total": 10, "listen": ["127.0.0.1:53", "[::1]:53"]}


def test_listening_ok_when_bound_and_counted() -> None:
    check = doctor.check_listening(SERVER, probe(), "/c", STATS,
                                   {**STATS, "queries_total": 11}, None)
    assert check.status == OK and "counted the query" in check.detail


def test_listening_fails_when_another_process_answers() -> None:
    elsewhere = {"queries_total": 3, "listen": ["127.0.0.1:5353"]}
    check = doctor.check_listening(SERVER, probe(), "/c", elsewhere, elsewhere, None)
    assert check.status == FAIL and "not from this resolver" in check.detail
    assert "ss -lunp" in check.advice and "systemd-resolved" in check.advice


def test_listening_fails_when_the_counter_does_not_move() -> None:
    check = doctor.check_listening(SERVER, probe(), "/c", STATS, STATS, None)
    assert check.status == FAIL and "counter did not move" in check.detail


def test_listening_without_control_socket() -> None:
    answered = doctor.check_listening(SERVER, probe(), "/c", None, None, "no such socket")
    silent = doctor.check_listening(SERVER, probe(None, error="no answer within 1 s"), "/c",
                                    None, None, "no such socket")
    assert answered.status == WARN and "cannot be confirmed" in answered.detail
    assert silent.status == FAIL and "systemctl start resolver" in silent.advice


def test_wildcard_listener_serves_loopback() -> None:
    assert doctor.serves(Endpoint("0.0.0.0", 53), SERVER)
    assert not doctor.serves(Endpoint("0.0.0.0", 5353), SERVER)
    assert not doctor.serves(Endpoint("::", 53), SERVER)


# -- 2. resolv.conf -----------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "status", "words"), [
    ("search ec2.internal\nnameserver 127.0.0.1\n", OK, "only the resolver"),
    ("nameserver 127.0.0.1\nnameserver 10.0.0.2\n", WARN, "falls over to 10.0.0.2"),
    ("nameserver 127.0.0.1\noptions rotate\n", WARN, "options rotate"),
    ("nameserver 10.0.0.2\n", FAIL, "none is the resolver"),
    ("nameserver 10.0.0.2\nnameserver 127.0.0.1\n", FAIL, "not first"),
    ("nameserver 127.0.0.53\n", FAIL, "none is the resolver"),
    ("# empty\n", WARN, "no nameserver line"),
])
def test_resolv_conf(tmp_path: Path, text: str, status: str, words: str) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    check = doctor.check_resolv_conf(path.read_text(), str(path), LOCAL53)
    assert check.status == status and words in check.detail + check.advice


def test_resolv_conf_stub_and_unreadable_and_wrong_port() -> None:
    stub = doctor.check_resolv_conf("nameserver 127.0.0.53\n", "r", LOCAL53)
    assert "systemd-resolved" in stub.advice
    missing = doctor.check_resolv_conf(None, "/nope", LOCAL53, "No such file or directory")
    assert missing.status == FAIL and "nameserver 127.0.0.1" in missing.advice
    port = doctor.check_resolv_conf("nameserver 127.0.0.1\n", "r", [Endpoint("127.0.0.1", 5353)])
    assert port.status == FAIL and "only name port 53" in port.detail


# -- 3. upstreams -------------------------------------------------------------------------------
def test_upstream_paths() -> None:
    assert doctor.check_upstream(probe(answers=("a.root.test.",))).status == OK
    assert "1.5 ms" in doctor.check_upstream(probe()).detail
    timeout = doctor.check_upstream(probe(None, error="no answer within 2 s"), "fallback")
    assert timeout.status == FAIL and "(fallback)" in timeout.name
    assert "security group" in timeout.advice
    assert doctor.check_upstream(probe("REFUSED")).status == FAIL
    assert doctor.check_upstream(probe("SERVFAIL")).status == WARN
    assert doctor.check_upstream(probe(rtt=900.0)).status == WARN


def test_only_loopback_or_configured_upstreams_are_queried() -> None:
    sent: list[Endpoint] = []
    gather = doctor.Gather(doctor.Options(SERVER, None),
                           probe=lambda e, n, t, s: sent.append(e) or probe())
    with pytest.raises(doctor.NotAllowed):
        gather.query(Endpoint("192.0.2.1", 53), ".", "NS")
    gather.allowed.add(Endpoint("192.0.2.1", 53))
    gather.query(Endpoint("192.0.2.1", 53), ".", "NS")  # configured: allowed (fake probe)
    gather.query(Endpoint("127.0.0.9", 53), ".", "NS")
    assert sent == [Endpoint("192.0.2.1", 53), Endpoint("127.0.0.9", 53)]


# -- 4. budget ----------------------------------------------------------------------------------
def test_budget_headroom() -> None:
    row = {"upstream": "10.0.0.2:53", "send_pps": 400.0, "rate_pps": 900,
           "configured_pps": 900, "learned_pps": None, "tokens_denied": 0}
    assert doctor.check_budget(row).status == OK
    hot = doctor.check_budget({**row, "send_pps": 800.0, "tokens_denied": 12})
    assert hot.status == WARN and "89% used" in hot.detail and "12 sends" in hot.detail
    learned = doctor.check_budget({**row, "send_pps": 450.0, "rate_pps": 500,
                                   "learned_pps": 500})
    assert learned.status == WARN and "learned 500 (configured 900)" in learned.detail
    unlimited = doctor.check_budget({**row, "rate_pps": None})
    assert unlimited.status == OK and "no budget" in unlimited.detail


# -- 5. ENA -------------------------------------------------------------------------------------
def test_ena_paths(tmp_path: Path) -> None:
    zero = doctor.check_ena(doctor.ena.parse_ethtool(ZERO_ETHTOOL), None, "f")
    assert zero.status == OK
    past = doctor.check_ena(doctor.ena.parse_ethtool(DROPPING_ETHTOOL),
                            doctor.ena.parse_ethtool(DROPPING_ETHTOOL), "f",
                            link_local_upstream=True)
    assert past.status == WARN and "linklocal_allowance_exceeded = 4711" in past.detail
    assert "1024 packets/s" in past.detail and "(one of our upstreams)" in past.advice
    rising = doctor.check_ena(doctor.ena.parse_ethtool(ZERO_ETHTOOL),
                              doctor.ena.parse_ethtool(DROPPING_ETHTOOL), "f")
    assert rising.status == FAIL and "+4711 during the check" in rising.detail
    pps = doctor.check_ena({"pps_allowance_exceeded": 3, "linklocal_allowance_exceeded": 0},
                           None, "f")
    assert pps.status == WARN and "larger instance" in pps.advice
    veth = doctor.check_ena(doctor.ena.parse_ethtool(VETH_ETHTOOL), None, "f")
    assert veth.status == SKIPPED and "not an ENA interface" in veth.detail
    text, reason = doctor.read_ethtool(None, str(tmp_path / "missing"))
    assert text is None and "cannot read" in reason
    text, reason = doctor.read_ethtool("no-such-ethtool-binary -S eth0", None)
    assert text is None and "not installed" in reason


def test_ena_is_read_twice_and_a_rise_fails() -> None:
    outputs = iter([ZERO_ETHTOOL, DROPPING_ETHTOOL])
    gather = doctor.Gather(doctor.Options(SERVER, None, ethtool_file="x", ena_interval=0.5),
                           ethtool=lambda c, f: (next(outputs), "x"), sleep=lambda s: None)
    assert gather.ena_check([]).status == FAIL


# -- 6. DNSBL -----------------------------------------------------------------------------------
def test_dnsbl_paths() -> None:
    listed = probe(answers=("127.0.0.2",), name=DNSBL, rdtype="A")
    assert doctor.check_dnsbl(listed).status == OK
    refused = doctor.check_dnsbl(probe(answers=("127.255.255.254",), name=DNSBL, rdtype="A"))
    assert refused.status == FAIL and "public/open resolver refused" in refused.detail
    assert '[[zone]]\nname = "zen.dnsbl.test"' in refused.advice
    limited = doctor.check_dnsbl(probe(answers=("127.255.255.255",), name=DNSBL, rdtype="A"))
    assert limited.status == WARN and "excessive" in limited.detail
    assert doctor.check_dnsbl(probe("NXDOMAIN", name=DNSBL, rdtype="A")).status == WARN
    assert doctor.check_dnsbl(probe(None, error="no answer", name=DNSBL)).status == WARN
    assert doctor.dnsbl_zone("2.0.0.127.zen.spamhaus.org") == "zen.spamhaus.org"


def test_exit_code_and_render() -> None:
    ok, warn, fail = Check("a", OK, "d"), Check("b", WARN, "d", "do x"), Check("c", FAIL, "d")
    assert doctor.exit_code([ok, warn]) == 0
    assert doctor.exit_code([ok, warn], strict=True) == 1
    assert doctor.exit_code([ok, fail]) == 1
    text = doctor.render([ok, warn], 0)
    assert "[warn] b: d\n       -> do x" in text and text.endswith("; exit 0")


# -- end to end: the CLI against a daemon with a control socket ------------------------------
async def cli(*args: str) -> Result:
    return await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(main, ["doctor", *args], catch_exceptions=False))


def statuses(result: Result) -> dict[str, str]:
    return {c["name"]: c["status"] for c in json.loads(result.output)["checks"]}


async def test_healthy_deployment_exits_0(sock_path: str, ethtool_zero: str) -> None:
    with FakeUpstream(ANSWERS) as upstream:
        async with running([upstream], control=sock_path, upstream_pps=500) as svc:
            host, port = addr_of(svc)
            result = await cli("--server", f"{host}:{port}", "--control", sock_path,
                               "--resolv-conf", "", "--ethtool-file", ethtool_zero,
                               "--dnsbl-name", DNSBL, "--ena-interval", "0", "--json")
    report = json.loads(result.output)
    assert result.exit_code == report["exit_code"] == 0, result.output
    got = statuses(result)
    assert got == {"listening": OK, "resolv.conf": SKIPPED,
                   f"upstream 127.0.0.1:{upstream.port} (primary)": OK,
                   f"budget 127.0.0.1:{upstream.port}": OK, "ena counters": OK,
                   f"dnsbl via 127.0.0.1:{upstream.port} (primary)": OK}
    asked = [(q.message.question[0].name.to_text(), q.peer[0]) for q in upstream.queries]
    assert (DNSBL, "127.0.0.1") in asked


async def test_open_resolver_code_and_dead_fallback_fail(sock_path: str, ethtool_zero: str,
                                                         tmp_path: Path) -> None:
    dropping_eth = tmp_path / "ethtool-drops.txt"
    dropping_eth.write_text(DROPPING_ETHTOOL)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.2\n")
    with FakeUpstream(ANSWERS) as good, OpenResolverRefused(ANSWERS) as trap, \
            DroppingUpstream() as dead:
        async with running([good, trap], [dead], control=sock_path) as svc:
            host, port = addr_of(svc)
            args = ["--server", f"{host}:{port}", "--control", sock_path,
                    "--resolv-conf", str(resolv), "--ethtool-file", str(dropping_eth),
                    "--dnsbl-name", DNSBL, "--ena-interval", "0", "--timeout", "0.3"]
            result = await cli(*args, "--json")
            human = await cli(*args)
    assert result.exit_code == 1 and human.exit_code == 1
    got = statuses(result)
    assert got["listening"] == OK
    assert got["resolv.conf"] == FAIL  # names 10.0.0.2 only
    assert got[f"upstream 127.0.0.1:{dead.port} (fallback)"] == FAIL
    assert got[f"dnsbl via 127.0.0.1:{good.port} (primary)"] == OK
    assert got[f"dnsbl via 127.0.0.1:{trap.port} (primary)"] == FAIL
    assert got[f"dnsbl via 127.0.0.1:{dead.port} (fallback)"] == WARN
    assert got["ena counters"] == WARN
    assert "127.255.255.254 is Spamhaus' \"query via public/open resolver refused\"" in \
        human.output
    assert 'name = "zen.dnsbl.test"' in human.output
    assert human.output.rstrip().endswith("; exit 1")


async def test_someone_else_on_the_server_address(sock_path: str, ethtool_zero: str) -> None:
    with FakeUpstream(ANSWERS) as upstream, FakeUpstream(ANSWERS) as impostor:
        async with running([upstream], control=sock_path):
            result = await cli("--server", f"127.0.0.1:{impostor.port}", "--control",
                               sock_path, "--resolv-conf", "", "--ethtool-file", ethtool_zero,
                               "--dnsbl-name", "", "--ena-interval", "0", "--json")
    assert result.exit_code == 1
    [listening] = [c for c in json.loads(result.output)["checks"] if c["name"] == "listening"]
    assert listening["status"] == FAIL and "not from this resolver" in listening["detail"]
    assert not any(c["name"].startswith("dnsbl") for c in json.loads(result.output)["checks"])


async def test_nothing_running(sock_path: str, ethtool_zero: str, tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    with FakeUpstream(ANSWERS) as upstream:
        closed = upstream.port
    result = await cli("--server", f"127.0.0.1:{closed}", "--control", sock_path,
                       "--resolv-conf", str(resolv), "--ethtool-file", ethtool_zero,
                       "--ena-interval", "0", "--timeout", "0.3", "--json")
    assert result.exit_code == 1
    got = statuses(result)
    assert got["listening"] == FAIL and got["upstreams"] == SKIPPED and got["budget"] == SKIPPED


async def test_config_file_gives_upstreams_and_server(sock_path: str, ethtool_zero: str,
                                                      tmp_path: Path) -> None:
    with FakeUpstream(ANSWERS) as upstream, FakeUpstream(ANSWERS) as extra:
        async with running([upstream], control=sock_path) as svc:
            host, port = addr_of(svc)
            config = tmp_path / "resolver.toml"
            config.write_text(f'listen = ["{host}:{port}"]\ncontrol = "{sock_path}"\n'
                              f'upstream = ["127.0.0.1:{upstream.port}"]\n'
                              f'fallback = ["127.0.0.1:{extra.port}"]\n'
                              f'ena_counters_file = "{ethtool_zero}"\n')
            result = await cli("--config", str(config), "--resolv-conf", "",
                               "--dnsbl-name", DNSBL, "--ena-interval", "0", "--json")
    assert result.exit_code == 0, result.output
    got = statuses(result)
    assert got["listening"] == OK and got["ena counters"] == OK
    # The daemon knows only `upstream`; the config's fallback is probed as well.
    assert got[f"upstream 127.0.0.1:{extra.port} (fallback)"] == OK
    assert extra.udp_count == 2  # the probe and the DNSBL name, nothing else


async def test_bad_flags() -> None:
    result = await cli("--ethtool-command", "ethtool -S eth0", "--ethtool-file", "x")
    assert result.exit_code == 2 and "not both" in result.output
    result = await cli("--server", "localhost:53")
    assert result.exit_code == 2 and "not an IP address" in result.output
