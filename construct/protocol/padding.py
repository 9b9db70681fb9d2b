"""`--ws-padding`: every WebSocket message the server sends, padded to a size bucket.

Under TLS an observer still sees each message's length, which tells an `ack` from a `pong` from
a pushed message and, for pushes, the content's size. Padded, a message is 512 bytes, or the
next power of two up to 64 KiB, or the next multiple of 64 KiB: most replies fall into the first
bucket, and a push into one bucket per content bucket of the client's own padding.

The padding is valid in both encodings, so any client reads a padded message as it is: JSON gets
trailing spaces (whitespace after a value is allowed), MessagePack a `padding` member of the
top-level map holding zero bytes (clients ignore members they do not know). A client may pad
what it sends the same way; the server ignores both.
"""

from __future__ import annotations

SMALLEST_BUCKET = 512
LARGE_STEP = 64 * 1024
# MessagePack: the fixstr "padding" (1 + 7 bytes) and a bin 32 header (5 bytes; any length fits).
_MSGPACK_KEY = b"\xa7padding"
_MSGPACK_OVERHEAD = len(_MSGPACK_KEY) + 5
_FIXMAP_FIRST, _FIXMAP_LAST = 0x80, 0x8E  # a fixmap with room for one more member


def bucket(size: int) -> int:
    """The padded length of a message of `size` bytes."""
    if size > LARGE_STEP:
        return -(-size // LARGE_STEP) * LARGE_STEP
    padded = SMALLEST_BUCKET
    while padded < size:
        padded *= 2
    return padded


def pad(data: bytes, binary: bool) -> bytes:
    """`data` (one encoded message) padded to its bucket."""
    if not binary:
        return data + b" " * (bucket(len(data)) - len(data))
    if not data or not _FIXMAP_FIRST <= data[0] <= _FIXMAP_LAST:
        return data  # not a map of ours: nothing to hang the padding on
    filler = bucket(len(data) + _MSGPACK_OVERHEAD) - len(data) - _MSGPACK_OVERHEAD
    return b"".join((
        bytes((data[0] + 1,)), data[1:], _MSGPACK_KEY, b"\xc6", filler.to_bytes(4, "big"), bytes(filler),
    ))
