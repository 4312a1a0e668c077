#!/usr/bin/env python3
"""What metrics cost the hit path: the real UDP listener loop, with and without its counting.

    .venv/bin/python bench/metrics_cost.py [--packets 20000] [--rounds 41] [--names 1000]

The listener's per-packet code is unchanged by metrics: it already counted packets between
scheduler checkpoints, and the metrics only read that count when a batch ends (at the
checkpoint every 64 packets, or when the socket runs dry), plus one sampled reply parse per 64
hits or per 10 ms (UdpListener.tally). So the cost is per batch, and this measures it per
batch size:

  - burst 64: a loaded socket, a batch ends at each checkpoint;
  - burst 8 and burst 1: the socket runs dry every 8 packets or after every packet (lighter
    load, where each batch costs a scheduler round trip anyway).

Each round runs `UdpListener.serve` (the code the daemon runs, with the real engine and a
warm cache) over N cache hits, once with counting and once with `tally` replaced by a no-op,
in alternating order; the figures are CPU time per packet (best of the rounds) and the median
of the with/without ratios of adjacent pairs. An A/A row per burst (without against without)
shows the noise floor of the machine at the time. The socket
is a stand-in that hands out queries from memory and drops replies (a `socketpair` that is
always readable serves trio's wait), so the syscalls, which would dilute the ratio, are left
out: the ratio is against the listener loop plus `engine.answer` alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
if __name__ == "__main__" and sys.prefix == sys.base_prefix and VENV_PYTHON.exists():
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])  # needs the project's venv

sys.path.insert(0, str(REPO))

import dns.message  # noqa: E402
import dns.rrset  # noqa: E402
import trio  # noqa: E402

from resolver.config import Config  # noqa: E402
from resolver.core import wire  # noqa: E402
from resolver.core.model import Endpoint, Fetch  # noqa: E402
from resolver.daemon.server import Acl, UdpListener  # noqa: E402
from resolver.daemon.service import build_engine  # noqa: E402

CLIENT = ("127.0.0.1", 40000)
TYPES = ("A", "AAAA", "MX", "TXT")
ANSWERS = {"A": "192.0.2.1", "AAAA": "2001:db8::1", "MX": "10 mx.example.test.",
           "TXT": '"v=spf1 mx ~all"'}


class Done(Exception):
    """The feed is empty: ends the listener loop."""


class FeedSocket:
    """Hands out `total` queries, raising BlockingIOError after every `burst` of them."""

    def __init__(self, queries: list[bytes], burst: int, total: int) -> None:
        self.queries = queries
        self.burst = burst
        self.total = total
        self.given = 0
        self.in_burst = 0
        # Always readable: trio's wait_readable returns after one scheduler round.
        self._reader, self._writer = socket.socketpair()
        self._writer.send(b"x")

    def fileno(self) -> int:
        return self._reader.fileno()

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 53)

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        if self.in_burst == self.burst:
            self.in_burst = 0
            raise BlockingIOError
        if self.given == self.total:
            raise Done
        self.in_burst += 1
        query = self.queries[self.given % len(self.queries)]
        self.given += 1
        return query, CLIENT

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        return len(data)

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class MissIsABug:
    """The dispatcher: every packet of the feed must be a hit."""

    def on_query(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("a miss in the hit benchmark")

    def spawn(self, *args: object) -> None:
        raise AssertionError("a reply had to wait for the socket")


def warm_engine(names: int) -> tuple[object, list[bytes]]:
    config = Config(listen=(Endpoint("127.0.0.1", 0),), upstream=(Endpoint("127.0.0.1", 53),))
    engine = build_engine(config, now=time.monotonic())
    queries = []
    now = time.monotonic()
    for n in range(names):
        rdtype = TYPES[n % len(TYPES)]
        question = dns.message.make_query(f"host{n}.example.test.", rdtype, use_edns=0,
                                          payload=1232)
        data = question.to_wire()
        [fetch] = [a for a in engine.on_query(data, None, now) if isinstance(a, Fetch)]
        reply = dns.message.make_response(question)
        reply.answer.append(dns.rrset.from_text(question.question[0].name, 3600, "IN", rdtype,
                                                ANSWERS[rdtype]))
        engine.on_answer(fetch.key, wire.scan_reply(reply.to_wire()), now)
        queries.append(data)
    return engine, queries


def run_once(engine: object, queries: list[bytes], burst: int, total: int,
             counting: bool) -> float:
    """Seconds per packet for one pass of the listener loop over `total` hits."""
    feed = FeedSocket(queries, burst, total)
    listener = UdpListener(feed, engine, dispatcher=MissIsABug(), acl=Acl(("127.0.0.0/8",)))
    if not counting:
        listener.tally = lambda received, reply, now: None  # the loop as it was without metrics
    elapsed = 0.0

    async def main() -> None:
        nonlocal elapsed
        start = time.process_time()
        with contextlib.suppress(Done):
            await listener.serve()
        elapsed = time.process_time() - start

    hits_before = engine.hits
    trio.run(main)
    feed.close()
    assert engine.hits - hits_before == total, "every packet must be a cache hit"
    if counting:
        counted = sum(listener.hits.values())
        assert total - counted < max(burst, 64), (total, counted)  # only the last batch
    return elapsed / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--bursts", default="64,8,1")
    args = parser.parse_args()
    engine, queries = warm_engine(args.names)
    gc.freeze()  # as the daemon does once its cache is warm
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; {args.packets} hits per pass, {args.rounds} rounds, "
          f"{args.names} names")
    print("CPU time per packet (process_time), best of the rounds; ratio of the bests and "
          "median of the per-pair ratios")
    print(f"{'burst':>8} {'without ns/pkt':>15} {'with ns/pkt':>12} {'best ratio':>10} "
          f"{'median ratio':>13}")
    for burst in (int(b) for b in args.bursts.split(",")):
        run_once(engine, queries, burst, args.packets // 10, True)  # warm-up
        for control in (False, True):
            # The control row runs "without" against itself: its distance from 1.000 is the
            # noise floor of this machine at the time.
            first, second, ratios = [], [], []
            for round_number in range(args.rounds):
                # Alternating order, and a ratio per adjacent pair: a noisy neighbour slows
                # both halves of a pair alike, so pair ratios are steadier than the times.
                runs = [(0, False), (1, not control)]
                if round_number % 2:
                    runs.reverse()
                pair = [0.0, 0.0]
                for slot, counting in runs:
                    pair[slot] = run_once(engine, queries, burst, args.packets, counting)
                first.append(pair[0])
                second.append(pair[1])
                ratios.append(pair[1] / pair[0])
            label = f"{burst} A/A" if control else f"{burst}"
            print(f"{label:>8} {min(first) * 1e9:>15.0f} {min(second) * 1e9:>12.0f} "
                  f"{min(second) / min(first):>10.3f} {statistics.median(ratios):>13.3f}")


if __name__ == "__main__":
    main()
