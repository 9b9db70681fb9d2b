"""The load generator's event loop: raw non-blocking sockets on epoll, no Twisted, no Autobahn.

One load process drives thousands of connections, and each message costs it four socket
operations on four different sockets (the send, its ack, the push, the recipient's ack), none
of which can share a system call with another. Twisted and Autobahn spend far more than the
server under test on each (a reactor round trip through epoll per write, a frame state machine
and a new XOR masker per frame): the load generator, not the server, would set the pace. Here a
write is one `send()` unless the socket is full, a read is one `recv()`, and WebSocket framing is
done by hand: client frames are masked with the all-zero key (the RFC lets the client choose any
key, and XOR with zero leaves the payload as it is), so a prebuilt frame goes out unchanged.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import time
from typing import Any, Callable, Protocol

from construct.bench.wire import Codec

CONNECT_TIMEOUT = 30.0
READ_BYTES = 256 * 1024
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_ZERO_MASK = b"\x00\x00\x00\x00"
_EPOLL_IN, _EPOLL_OUT = select.EPOLLIN, select.EPOLLOUT
_EPOLL_ERRORS = select.EPOLLERR | select.EPOLLHUP


class EngineError(Exception):
    """A connection could not be set up, or a setup request was refused."""


class Party(Protocol):
    """What a connection hands its decoded frames to."""

    def frame_received(self, message: dict) -> None: ...

    def read_done(self) -> None: ...

    def closed(self) -> None: ...


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame with the all-zero key, whose payload goes out unchanged."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return header + _ZERO_MASK + payload


class Link:
    """One client connection: a non-blocking socket, its framing, and the party it serves."""

    __slots__ = ("loop", "sock", "fd", "codec", "party", "_in", "_out", "_writing", "open", "_opcode")

    def __init__(self, loop: "Loop", sock: socket.socket, codec: Codec, leftover: bytes = b"") -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.codec = codec
        self.party: Party = _Unclaimed()
        self._in = leftover
        self._out = b""
        self._writing = False
        self.open = True
        self._opcode = OP_BINARY if codec.binary else OP_TEXT

    # Writing

    def frame(self, payload: bytes) -> bytes:
        """The wire bytes of one protocol message (line codecs end theirs with "\\n" already)."""
        return client_frame(self._opcode, payload) if self.codec.websocket else payload

    def send(self, message_type: str, payload: dict) -> None:
        self.write(self.frame(self.codec.encode({"type": message_type, "payload": payload})))

    def send_frame(self, payload: bytes) -> None:
        self.write(self.frame(payload))

    def write(self, data: bytes) -> None:
        """Send at once; what the socket cannot take now waits, in order, until it can."""
        if not self.open:
            return
        if self._out:
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self._out = data[sent:]
            self._want_write(True)

    def writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self._out = self._out[sent:]
        if not self._out:
            self._want_write(False)

    @property
    def backlog_bytes(self) -> int:
        return len(self._out)

    def _want_write(self, wanted: bool) -> None:
        if wanted != self._writing:
            self._writing = wanted
            self.loop.modify(self, wanted)

    # Reading

    def readable(self) -> None:
        try:
            data = self.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._in += data
        if self.codec.websocket:
            self._ws_frames()
        else:
            self._lines()
        self.party.read_done()

    def _lines(self) -> None:
        lines = self._in.split(b"\n")
        self._in = lines.pop()
        decode, party = self.codec.decode, self.party
        for line in lines:
            party.frame_received(decode(line))

    def _ws_frames(self) -> None:
        buffer, start, end = self._in, 0, len(self._in)
        decode, party = self.codec.decode, self.party
        while end - start >= 2:
            opcode, length = buffer[start] & 0x0F, buffer[start + 1] & 0x7F
            head = 2
            if length >= 126:
                size = 2 if length == 126 else 8
                if end - start < 2 + size:
                    break
                length = int.from_bytes(buffer[start + 2:start + 2 + size], "big")
                head = 2 + size
            if end - start < head + length:
                break
            payload = buffer[start + head:start + head + length]
            start += head + length
            if opcode == OP_BINARY or opcode == OP_TEXT:
                party.frame_received(decode(payload))
            elif opcode == OP_PING:
                self.write(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.close()
                return
        self._in = buffer[start:]

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.loop.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        self.party.closed()


class _Unclaimed:
    """A link's party until one takes it over: frames are kept for whoever asks."""

    def __init__(self) -> None:
        self.replies: list[dict] = []
        self.lost = False

    def frame_received(self, message: dict) -> None:
        self.replies.append(message)

    def read_done(self) -> None:
        pass

    def closed(self) -> None:
        self.lost = True


class Loop:
    """epoll over the links; `run` calls `tick` between polls until it returns False."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._links: dict[int, Link] = {}
        self._extra: dict[int, Callable[[], None]] = {}

    def add(self, link: Link) -> None:
        self._links[link.fd] = link
        self._epoll.register(link.fd, _EPOLL_IN)

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Another descriptor to read when it is ready (the load process's control pipe)."""
        self._extra[fd] = on_readable
        self._epoll.register(fd, _EPOLL_IN)

    def unwatch(self, fd: int) -> None:
        if self._extra.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def modify(self, link: Link, writing: bool) -> None:
        self._epoll.modify(link.fd, _EPOLL_IN | _EPOLL_OUT if writing else _EPOLL_IN)

    def forget(self, link: Link) -> None:
        if self._links.pop(link.fd, None) is not None:
            try:
                self._epoll.unregister(link.fd)
            except OSError:
                pass

    def run(self, tick: Callable[[], float | None]) -> None:
        """Poll and dispatch. `tick` runs before every poll and returns how long the next poll
        may wait (seconds), or None to stop."""
        links, extra, poll = self._links, self._extra, self._epoll.poll
        while (timeout := tick()) is not None:
            for fd, events in poll(timeout):
                link = links.get(fd)
                if link is None:
                    handler = extra.get(fd)
                    if handler is not None:
                        handler()
                    continue
                if events & _EPOLL_OUT:
                    link.writable()
                if events & (_EPOLL_IN | _EPOLL_ERRORS) and link.open:
                    link.readable()

    def close(self) -> None:
        for link in list(self._links.values()):
            link.close()
        self._epoll.close()


def connect(loop: Loop, codec: Codec, host: str, port: int) -> Link:
    """A connection, blocking until it is open (and upgraded, for WebSocket), then non-blocking."""
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    leftover = b""
    if codec.websocket:
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), port, key)
        )
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                raise EngineError("the server closed the connection during the WebSocket handshake")
            received += chunk
        head, _, leftover = received.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise EngineError(f"WebSocket upgrade refused: {head.splitlines()[0][:80]!r}")
    sock.setblocking(False)
    link = Link(loop, sock, codec, leftover)
    loop.add(link)
    return link


def requests(loop: Loop, calls: list[tuple[Link, str, dict]], expected: str, timeout: float) -> list[dict]:
    """Send one request on each link (links fresh from `connect`) and wait for every reply;
    each must be of type `expected`."""
    for link, message_type, payload in calls:
        link.send(message_type, payload)
    waiting = {id(link): link for link, _, _ in calls}
    deadline = time.monotonic() + timeout

    def tick() -> float | None:
        for key, link in list(waiting.items()):
            party = link.party
            if party.replies or party.lost:
                del waiting[key]
        if not waiting:
            return None
        if time.monotonic() > deadline:
            raise EngineError(f"{len(waiting)} {calls[0][1]} requests unanswered after {timeout:.0f} s")
        return 0.05

    loop.run(tick)
    replies = []
    for link, message_type, _ in calls:
        party = link.party
        if not party.replies:
            raise EngineError(f"the server closed a connection before answering {message_type}")
        reply = party.replies.pop(0)
        if reply.get("type") != expected:
            raise EngineError(f"{message_type} answered {reply.get('type')}: {reply.get('payload')}")
        replies.append(reply["payload"])
    return replies
