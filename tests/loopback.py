"""Running the daemon in-process on loopback, and asking it, for the daemon-level tests."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator

import trio

from resolver.config import Config
from resolver.core.model import Endpoint
from resolver.daemon import service as service_mod

from fakeupstream import FakeUpstream

LOCAL = (Endpoint("127.0.0.1", 0),)


class MovableClock:
    """time.monotonic() plus an offset a test moves forward instead of waiting for TTLs."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@contextlib.asynccontextmanager
async def running(upstreams: list[FakeUpstream], fallbacks: list[FakeUpstream] = (),
                  clock: MovableClock | None = None,
                  **settings: object) -> AsyncIterator[service_mod.Service]:
    config = Config(
        listen=LOCAL,
        upstream=tuple(Endpoint(*u.addr) for u in upstreams),
        fallback=tuple(Endpoint(*u.addr) for u in fallbacks),
        **settings,
    )
    async with trio.open_nursery() as nursery:
        service = await nursery.start(lambda task_status: service_mod.run(
            config, handle_signals=False, clock=clock or time.monotonic,
            task_status=task_status))
        yield service
        nursery.cancel_scope.cancel()


def addr_of(service: service_mod.Service) -> tuple[str, int]:
    return service.bound[0].sockaddr


async def ask_udp(server: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(server)
        await sock.send(data)
        with trio.fail_after(timeout):
            return await sock.recv(65535)


async def read_tcp_message(stream: trio.SocketStream) -> bytes:
    buf = b""
    while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    return buf[2:]
