"""ENA counters (`ethtool -S IFACE` on AWS instances): parsing and what an increase means.

The ENA driver counts packets the hypervisor dropped for exceeding an allowance. Two matter:
  - linklocal_allowance_exceeded: traffic to link-local services (the VPC resolver at
    169.254.169.253, metadata, time sync) above 1024 packets/s per interface;
  - pps_allowance_exceeded: the instance's own packets-per-second allowance.
An increase while we send to the VPC resolver is direct evidence that it is dropping our
queries, long before timeouts pile up. The source is injectable (a command or a file), so tests
feed it fake output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

LINKLOCAL = "linklocal_allowance_exceeded"
PPS = "pps_allowance_exceeded"
COUNTERS = (LINKLOCAL, PPS, "bw_in_allowance_exceeded", "bw_out_allowance_exceeded",
            "conntrack_allowance_exceeded")


class _Upstream(Protocol):
    link_local: bool

    @property
    def health(self) -> object: ...


def parse_ethtool(text: str) -> dict[str, int]:
    """`     name: 123` lines → {name: 123}; other lines (the NIC statistics header) ignored."""
    counters = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        value = value.strip()
        if sep and value.isdigit():
            counters[name.strip()] = int(value)
    return counters


def increases(previous: dict[str, int], current: dict[str, int]) -> dict[str, int]:
    """Counters of interest that went up (a driver reload resets them: a drop is no evidence)."""
    return {name: current[name] - previous[name] for name in COUNTERS
            if name in current and name in previous and current[name] > previous[name]}


def evidence(previous: dict[str, int], current: dict[str, int], upstreams: Iterable[_Upstream],
             now: float) -> Iterator[tuple[_Upstream, str]]:
    """(upstream, evidence) for each upstream an increase implicates.

    linklocal_allowance_exceeded implicates the link-local upstreams we are sending to;
    pps_allowance_exceeded implicates every upstream we are sending to (the whole instance is
    over its allowance, so every destination loses packets).
    """
    rising = increases(previous, current)
    for upstream in upstreams:
        if upstream.health.sent_rate(now) <= 0:  # type: ignore[attr-defined]
            continue
        if LINKLOCAL in rising and upstream.link_local:
            yield upstream, (f"ENA {LINKLOCAL} rose by {rising[LINKLOCAL]} in a second while we "
                             "sent to this link-local resolver")
        elif PPS in rising:
            yield upstream, (f"ENA {PPS} rose by {rising[PPS]} in a second: the instance is over "
                             "its packet allowance")
