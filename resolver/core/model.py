"""The core's vocabulary: outcomes, waiters and the actions the engine asks the daemon to do."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Outcome(enum.Enum):
    """How one exchange with one upstream ended: a closed set (STYLE.md 4)."""

    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    SERVFAIL = "servfail"
    REFUSED = "refused"
    TRUNCATED = "truncated"
    MISMATCHED = "mismatched"
    MALFORMED = "malformed"
    TIMEOUT = "timeout"

    @property
    def is_answer(self) -> bool:
        """An answer we can give the client: the upstream did its job."""
        return self in _ANSWERS


_ANSWERS = frozenset({Outcome.OK, Outcome.NXDOMAIN, Outcome.NODATA})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address and port, as given on the command line (`HOST:PORT`, `[V6]:PORT`)."""

    host: str
    port: int
    # Derived once: both are read for every upstream packet.
    family_v6: bool = field(init=False, compare=False, repr=False)
    sockaddr: tuple[str, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "family_v6", ":" in self.host)
        object.__setattr__(self, "sockaddr", (self.host, self.port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family_v6 else f"{self.host}:{self.port}"


@dataclass(slots=True)
class Waiter:
    """A client waiting for a miss to resolve: a record, not a task (DESIGN.md 3.3)."""

    client: Any  # opaque to the core: the daemon's reply channel and address
    qid: bytes
    rd: bool
    question: bytes  # the client's question bytes, in its letter case
    edns: bool
    payload: int
    do: bool
    cd: bool
    limit: int  # the largest reply it accepts: its UDP size, or 65535 over TCP


@dataclass(slots=True)  # not frozen: made per query, and frozen init is slow
class Reply:
    """Send `data` to `client`."""

    client: Any
    data: bytes


@dataclass(slots=True)  # not frozen: made per query, and frozen init is slow
class Fetch:
    """Resolve `key` upstream: `question` is the case-folded question to send."""

    key: bytes
    question: bytes
    do: bool
    cd: bool
    background: bool = False  # a prefetch: spends only tokens above the reserve
