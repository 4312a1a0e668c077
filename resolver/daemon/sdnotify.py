"""The systemd notification protocol (sd_notify(3)), without a dependency.

Each message is one datagram of `KEY=VALUE` lines sent to the AF_UNIX socket named by
$NOTIFY_SOCKET; a name starting with '@' is in the abstract namespace. With the variable unset
(not under systemd, or Type= is not notify) every call does nothing.

Messages we send: READY=1 once every listener is bound, STOPPING=1 when shutdown starts,
WATCHDOG=1 every WatchdogSec/2 ($WATCHDOG_USEC), STATUS=... for `systemctl status`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger("resolver")


class Notifier:
    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace (unix(7))
        self.address = address or None
        self.failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one message; True if it was sent. Failure is logged once and never raised:
        systemd going away must not take the resolver down."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as e:
            if not self.failed:
                log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), e)
                self.failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec, as sd_watchdog_enabled(3)
    advises; None when no watchdog is asked of this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. a wrapper that exec'd us is not us)
    return int(usec) / 1e6 / 2


async def watchdog(notifier: Notifier, interval: float) -> None:
    """Ping forever. It runs in the same trio loop as the listeners, so a wedged loop stops
    the pings and systemd restarts us: that is the point."""
    while True:
        notifier.notify("WATCHDOG=1")
        await trio.sleep(interval)
