"""The project's exception tree.

Foreign exceptions (dnspython's, socket errors, TOML errors) are translated into these once, at
the edge where they happen, so callers deal with a small closed set.
"""

from __future__ import annotations


class ResolverError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(ResolverError):
    """A bad configuration value: the message is one line naming the key and the fix."""


class MalformedQuery(ResolverError):
    """A client query we cannot serve; `rcode` is the reply it deserves, None means drop it."""

    def __init__(self, reason: str, rcode: int | None) -> None:
        super().__init__(reason)
        self.rcode = rcode


class UpstreamFailure(ResolverError):
    """An upstream exchange that ended without a usable answer; `outcome` says how."""

    def __init__(self, outcome: object, detail: str = "") -> None:
        super().__init__(f"{outcome}: {detail}" if detail else str(outcome))
        self.outcome = outcome
