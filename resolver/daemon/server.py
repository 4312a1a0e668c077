"""UDP and TCP listeners: read queries, answer hits at once, hand the rest to the service.

UDP (DESIGN.md 3.1): the socket is non-blocking and drained in a loop until it would block,
then we wait for readability; a trio checkpoint every few dozen packets keeps fetch tasks and
TCP connections running under load. A reply that would block waits for writability instead of
being dropped.

TCP (RFC 7766): length-prefixed messages, several queries per connection answered as each
completes (in any order), an idle timeout while nothing is in flight, a cap on connections
that closes the oldest idle one first. TCP work runs in its own tasks, so a slow TCP client
can never stall the UDP loop.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from resolver.core import wire
from resolver.daemon.metrics import add_hits, question_type

log = logging.getLogger("resolver.server")

# Yield to other tasks after this many datagrams in one drain: small enough that misses and
# TCP keep moving, large enough that the scheduler round trip stays off most packets.
PACKETS_PER_CHECKPOINT = 64
# Metrics: cache hits are attributed to a query type and rcode by sampling one reply per this
# many hits, or per this many seconds when fewer arrive (exact for hits further apart).
HITS_PER_SAMPLE = PACKETS_PER_CHECKPOINT
HIT_SAMPLE_SECONDS = 0.01
# A TCP client that does not read its replies for this long loses its connection.
TCP_SEND_TIMEOUT_SECONDS = 10.0
_MAX_DATAGRAM = 65535
ACL_MEMO_MAX = 4096


class Dispatcher(Protocol):
    """What listeners need from the service: the slow path, and a place to run tasks."""

    def on_query(self, data: bytes, client: tuple[Any, Any], now: float,
                 tcp: bool = False) -> None: ...

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None: ...


class Acl:
    """Client networks allowed to query; decisions memoised per address (bounded)."""

    def __init__(self, networks: tuple[str, ...]) -> None:
        self.networks = tuple(ipaddress.ip_network(n) for n in networks)
        # A plain dict, cleared when full: read once per packet, so it must cost what a dict
        # lookup costs (cachetools' LRU runs Python code on every get).
        self.memo: dict[str, bool] = {}

    def allowed(self, host: str) -> bool:
        verdict = self.memo.get(host)
        if verdict is None:
            if len(self.memo) >= ACL_MEMO_MAX:
                self.memo.clear()
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                verdict = False
            else:
                if address.version == 6 and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                verdict = any(address in net for net in self.networks)
            self.memo[host] = verdict
        return verdict


def refusal(data: bytes) -> bytes | None:
    """REFUSED for a client outside the access list; nothing for responses and runts."""
    if len(data) < wire.HEADER_LEN or data[2] & wire.FLAG2_QR:
        return None
    try:
        info = wire.parse_query(data)
    except Exception:
        return wire.error_reply(data, wire.RCODE_REFUSED)
    return wire.error_reply(data, wire.RCODE_REFUSED, info)


def bind_udp(host: str, port: int, buffer_bytes: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket; `reuse_port` (several workers) lets the kernel spread the
    datagrams to one address over every worker's socket (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            # The kernel caps this at net.core.[rw]mem_max; a bigger buffer absorbs bursts.
            sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def bind_tcp_shared(host: str, port: int) -> trio.SocketListener:
    """A TCP listener with SO_REUSEPORT, for several workers on one address (what
    trio.open_tcp_listeners does otherwise, plus that option)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class UdpListener:
    def __init__(self, sock: socket.socket, engine: Any, dispatcher: Dispatcher,
                 acl: Acl, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.sock = sock
        self.engine = engine
        self.dispatcher = dispatcher
        self.acl = acl
        # A socket bound to a loopback address only receives from this host (the kernel drops
        # 127/8 destinations arriving from outside unless route_localnet is set): when the ACL
        # admits the whole loopback network, there is nothing to check per packet.
        address = ipaddress.ip_address(sock.getsockname()[0])
        loopback = ipaddress.ip_network("127.0.0.0/8" if address.version == 4 else "::1/128")
        self.check_acl = not (address.is_loopback and any(
            loopback.subnet_of(net) for net in acl.networks if net.version == address.version))
        self._send_lock = trio.Lock()
        self.send_errors = 0
        # Plain counters for metrics (metrics.py): datagrams received, those handed to the
        # slow path or refused, and cache hits by (qtype, rcode), attributed per batch.
        self.received = 0
        self.slow = 0
        self.refused: dict[int, int] = {}
        self.refused_total = 0
        self.hits: dict[tuple[int, int], int] = {}
        self.hits_counted = 0
        self.sample_interval = HIT_SAMPLE_SECONDS
        self.sample_at = 0.0

    def tally(self, received: int, reply: bytes | None, now: float) -> None:
        """Count a batch of datagrams, off the per-packet path (metrics.py). Hits not yet
        attributed take the type and rcode of `reply`, the last hit's reply, once
        HITS_PER_SAMPLE of them wait or `sample_interval` has passed since the last sample:
        exact for hits that far apart, a sample under load, and one reply parse per 64 hits
        or per 10 ms at most, whatever the batches."""
        self.received = total = self.received + received
        new_hits = total - self.slow - self.refused_total - self.hits_counted
        if reply is not None and new_hits > 0 and (new_hits >= HITS_PER_SAMPLE
                                                   or now >= self.sample_at):
            self.sample_at = now + self.sample_interval
            self.hits_counted += new_hits
            add_hits(self.hits, reply, new_hits)

    async def serve(self) -> None:
        sock = self.sock
        recvfrom = sock.recvfrom
        sendto = sock.sendto
        answer = self.engine.answer
        memo = self.acl.memo
        allowed = self.acl.allowed
        check_acl = self.check_acl
        on_query = self.dispatcher.on_query
        clock = self.clock
        since_checkpoint = 0
        reply = None
        now = 0.0
        while True:
            try:
                data, addr = recvfrom(_MAX_DATAGRAM)
            except BlockingIOError:
                if since_checkpoint:
                    self.tally(since_checkpoint, reply, now)
                since_checkpoint = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as e:
                # ICMP errors from earlier sends surface here on some kernels; not fatal.
                log.debug("udp receive error: %s", e)
                continue
            since_checkpoint += 1
            if since_checkpoint >= PACKETS_PER_CHECKPOINT:
                self.tally(since_checkpoint, reply, now)
                since_checkpoint = 0
                await trio.lowlevel.checkpoint()
            if check_acl and not (memo.get(addr[0]) or allowed(addr[0])):
                qtype = question_type(data)
                self.refused[qtype] = self.refused.get(qtype, 0) + 1
                self.refused_total += 1
                refused = refusal(data)
                if refused is not None:
                    self.deliver(refused, addr)
                continue
            now = clock()
            reply = answer(data, now)
            if reply is None:
                self.slow += 1
                on_query(data, (self, addr), now)
                continue
            try:
                sendto(reply, addr)
            except BlockingIOError:
                await self.send_when_writable(reply, addr)
            except OSError as e:
                self.send_errors += 1
                log.debug("udp send to %s failed: %s", addr, e)

    def deliver(self, data: bytes, addr: Any) -> None:
        """Send now if the socket takes it, else wait for writability in a task."""
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            self.dispatcher.spawn(self.send_when_writable, data, addr)
        except OSError as e:
            self.send_errors += 1
            log.debug("udp send to %s failed: %s", addr, e)

    async def send_when_writable(self, data: bytes, addr: Any) -> None:
        # One waiter at a time: trio allows a single task waiting for writability per socket.
        async with self._send_lock:
            for _ in range(100):  # bounded: a socket that never drains is a dead peer
                try:
                    self.sock.sendto(data, addr)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                except OSError as e:
                    self.send_errors += 1
                    log.debug("udp send to %s failed: %s", addr, e)
                    return


class TcpConnection:
    """One client connection: replies may be written by several tasks, one at a time."""

    def __init__(self, stream: trio.SocketStream, dispatcher: Dispatcher) -> None:
        self.stream = stream
        self.dispatcher = dispatcher
        self.pending = 0
        self.last_active = time.monotonic()
        self.scope = trio.CancelScope()
        self._send_lock = trio.Lock()

    @property
    def idle(self) -> bool:
        return self.pending == 0

    def deliver(self, data: bytes, addr: Any = None) -> None:
        self.dispatcher.spawn(self.send, data)

    async def send(self, data: bytes) -> None:
        try:
            async with self._send_lock:
                with trio.move_on_after(TCP_SEND_TIMEOUT_SECONDS) as timer:
                    await self.stream.send_all(struct.pack("!H", len(data)) + data)
                if timer.cancelled_caught:
                    log.debug("tcp client not reading replies; closing")
                    self.scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing left to tell it
        finally:
            self.pending -= 1
            self.last_active = time.monotonic()


class TcpServer:
    def __init__(self, engine: Any, dispatcher: Dispatcher, acl: Acl, idle_timeout: float,
                 max_connections: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.engine = engine
        self.dispatcher = dispatcher
        self.acl = acl
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections: set[TcpConnection] = set()
        self.closed_for_cap = 0
        # Metrics (metrics.py): hits by (qtype, rcode); TCP has no refusals (it closes).
        self.hits: dict[tuple[int, int], int] = {}
        self.refused: dict[int, int] = {}

    def _make_room(self) -> bool:
        """Close the longest-idle connection when at the cap; False if none is idle."""
        if len(self.connections) < self.max_connections:
            return True
        idle = [c for c in self.connections if c.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_active)
        victim.scope.cancel()
        self.connections.discard(victim)
        self.closed_for_cap += 1
        return True

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            await stream.aclose()
            return
        if not self.acl.allowed(peer[0]) or not self._make_room():
            await stream.aclose()  # TCP has no REFUSED without reading; closing is clearer
            return
        conn = TcpConnection(stream, self.dispatcher)
        self.connections.add(conn)
        try:
            with conn.scope:
                await self._read_loop(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.connections.discard(conn)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_loop(self, conn: TcpConnection) -> None:
        buf = bytearray()
        while True:
            with trio.move_on_after(self.idle_timeout) as timer:
                chunk = await conn.stream.receive_some(65536)
            if timer.cancelled_caught:
                if conn.pending:
                    continue  # answers still owed: not idle (RFC 7766 6.2.3)
                return
            if not chunk:
                return
            conn.last_active = time.monotonic()
            buf += chunk
            while len(buf) >= 2:
                length = buf[0] << 8 | buf[1]
                if len(buf) < 2 + length:
                    break
                message = bytes(buf[2:2 + length])
                del buf[:2 + length]
                self._on_message(conn, message)

    def _on_message(self, conn: TcpConnection, message: bytes) -> None:
        if len(message) < wire.HEADER_LEN or message[2] & wire.FLAG2_QR:
            return  # nothing is owed to a runt or a response
        conn.pending += 1
        now = self.clock()
        reply = self.engine.answer(message, now, tcp=True)
        if reply is not None:
            add_hits(self.hits, reply, 1)
            conn.deliver(reply)
        else:
            self.dispatcher.on_query(message, (conn, None), now, tcp=True)


def explain_bind_error(endpoint: str, error: OSError, port: int, tcp: bool = False) -> str:
    """One line that says what went wrong binding a listener and how to fix it."""
    if error.errno in (errno.EACCES, errno.EPERM) and port < 1024:
        return (f"cannot listen on {endpoint}: ports below 1024 need privilege; run as root, "
                "grant CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE), "
                "or use --listen 127.0.0.1:5353")
    if error.errno == errno.EADDRINUSE:
        return (f"cannot listen on {endpoint}: the address is in use (another DNS server? "
                f"`ss -l{'t' if tcp else 'u'}np 'sport = :{port}'` shows which); stop it or pick "
                "another --listen")
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {endpoint}: no such local address on this host"
    return f"cannot listen on {endpoint}: {error.strerror or error}"
