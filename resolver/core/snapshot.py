"""The cache snapshot for warm restarts: bytes out of a Cache, a Cache filled from bytes.

The file is untrusted input (anyone who can write the state directory writes it), so it is a
plain binary format checked as strictly as an upstream reply, never pickle:

    header   magic "RSNAP\\0", version u16, snapshot wall time f64 (Unix seconds),
             entry count u32, CRC-32 of the payload u32
    payload  per entry, least recently used first:
             key length u16, reply length u16, age f64 (seconds cached at snapshot time),
             key, reply (header minus ID, then the body: the question comes from the key)

Invariants:
  1. Restoring goes through Cache.store, so a snapshot entry passes the same checks (wire scan,
     cacheability, TTL policy, bounds) as an upstream reply; anything else rejects the file.
  2. TTLs are aged by the entry's age at snapshot time plus the downtime, measured on the wall
     clock (the cache's clock is monotonic and restarts with the process). A clock that went
     backwards counts as no downtime.
  3. A rejected file changes nothing: restore decodes everything before storing anything.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable

from resolver.core import wire
from resolver.core.cache import Cache, Entry

MAGIC = b"RSNAP\0"
VERSION = 1
_HEADER = struct.Struct("!6sHdII")
_ENTRY = struct.Struct("!HHd")
# A key is a question (name up to 255 bytes, type, class) plus the flag byte.
MAX_KEY_BYTES = wire.MAX_NAME_LEN + 5
# Reply header minus the ID: flags (2) and four counts (8).
_REPLY_HEADER_BYTES = 10


class SnapshotError(ValueError):
    """The file is not a snapshot we can trust; the message says why, for the one log line."""


def encode(entries: Iterable[Entry], now: float, wall_now: float) -> bytes:
    """The snapshot of `entries` (a Cache's, in LRU order) at monotonic `now`, wall `wall_now`."""
    parts = []
    count = 0
    pack = _ENTRY.pack
    for entry in entries:
        reply = entry.header + entry.body
        if len(entry.key) > MAX_KEY_BYTES or len(reply) > wire.MAX_TCP_MESSAGE:
            continue
        parts.append(pack(len(entry.key), len(reply), now - entry.stored_at))
        parts.append(entry.key)
        parts.append(reply)
        count += 1
    payload = b"".join(parts)
    return _HEADER.pack(MAGIC, VERSION, wall_now, count, zlib.crc32(payload)) + payload


def decode(data: bytes) -> tuple[float, list[tuple[bytes, float, wire.ReplyScan]]]:
    """(snapshot wall time, [(key, age, scan)]); SnapshotError for anything malformed."""
    if len(data) < _HEADER.size:
        raise SnapshotError("too short for a snapshot header")
    magic, version, wall_time, count, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("not a resolver cache snapshot")
    if version != VERSION:
        raise SnapshotError(f"snapshot version {version}, this resolver reads {VERSION}")
    payload = memoryview(data)[_HEADER.size:]
    if zlib.crc32(payload) != crc:
        raise SnapshotError("checksum mismatch (truncated or damaged)")
    out = []
    offset = 0
    for _ in range(count):
        if offset + _ENTRY.size > len(payload):
            raise SnapshotError("ends inside an entry")
        key_len, reply_len, age = _ENTRY.unpack_from(payload, offset)
        offset += _ENTRY.size
        end = offset + key_len + reply_len
        if not 6 <= key_len <= MAX_KEY_BYTES or reply_len < _REPLY_HEADER_BYTES or \
                end > len(payload) or not 0 <= age < 1e9:
            raise SnapshotError("an entry has impossible lengths or age")
        key = bytes(payload[offset:offset + key_len])
        reply = payload[offset + key_len:end]
        offset = end
        # Rebuild a whole reply (ID 0, the question from the key) and scan it like one from
        # upstream; a qdcount other than 1 or a bad name fails here.
        message = b"\0\0" + bytes(reply[:_REPLY_HEADER_BYTES]) + key[:-1] + \
            bytes(reply[_REPLY_HEADER_BYTES:])
        try:
            scan = wire.scan_reply(message)
        except wire.WireError as e:
            raise SnapshotError(f"an entry is not a valid reply: {e}") from None
        if scan.qend != wire.HEADER_LEN + key_len - 1:
            raise SnapshotError("an entry's key is not one question")
        out.append((key, age, scan))
    if offset != len(payload):
        raise SnapshotError("bytes after the last entry")
    return wall_time, out


def restore(cache: Cache, data: bytes, now: float, wall_now: float) -> int:
    """Fill `cache` from a snapshot; returns the entries restored (expired ones past the
    stale window are dropped). Raises SnapshotError, with the cache untouched."""
    wall_time, items = decode(data)
    downtime = max(0.0, wall_now - wall_time)
    restored = 0
    for key, age, scan in items:
        # Stored as if it had arrived age + downtime ago: expiry and record TTLs age together.
        entry = cache.store(key, scan, now - age - downtime)
        if cache.entries.get(key) is not entry:
            continue  # not cacheable under the current policy
        if entry.expires_at + cache.policy.stale_max <= now:
            cache.bytes -= cache.entries.pop(key).size
            continue
        restored += 1
    return restored
