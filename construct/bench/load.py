"""The message load of one load-generator process: sender/recipient pairs.

Run as `python -m construct.bench.load` by `construct.bench.workers`. Over stdin and stdout, one
JSON object a line: it reads its `LoadSpec`, registers its pairs, writes `{"ready": true}`,
waits for `{"start": <monotonic seconds>}` (every process starts at the same instant; the
monotonic clock is shared by the processes of a machine), runs, and writes its result. A
`{"stop": true}` line ends a run that has no duration or message count of its own.
"""

from __future__ import annotations

import base64
import time
import uuid
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, stdio, task
from twisted.protocols.basic import LineReceiver

from construct.bench.clients import Connector, Target
from construct.bench.wire import CODECS, NUMBER_BASE, PASSWORD, SendFrames, json_dumps, json_loads, key_bundle, \
    sent_ns_of

# Fixed-rate sends go out in bursts this often: small enough to look like a steady stream.
PACE_SECONDS = 0.002
SETUP_CONCURRENCY = 32
ACK_BATCH = 1000
# Deliveries may trail the last ack by this long before the missing ones count as lost.
SETTLE_SECONDS = 10.0
SETTLE_POLL_SECONDS = 0.02


@dataclass
class LoadSpec:
    transport: str
    # (sender's server, recipient's server) of each pair
    pairs: list[tuple[Target, Target]]
    content_bytes: int = 256
    window: int = 64
    rate: float | None = None  # messages/s offered by this process; None: as fast as the window allows
    messages: int | None = None  # messages this process sends in all; None: until the duration ends
    warmup: float = 0.0
    duration: float | None = None  # None with no message count: until told to stop
    settle: float = SETTLE_SECONDS

    def as_dict(self) -> dict:
        fields = dict(vars(self))
        fields["pairs"] = [[sender.as_dict(), recipient.as_dict()] for sender, recipient in self.pairs]
        return fields

    @classmethod
    def from_dict(cls, fields: dict) -> "LoadSpec":
        pairs = [(Target(**sender), Target(**recipient)) for sender, recipient in fields.pop("pairs")]
        return cls(pairs=pairs, **fields)


class Stats:
    """Counters of one process; the `measured_*` ones count only inside the measured window."""

    def __init__(self) -> None:
        self.measuring = False
        self.started_ns = 0
        self.sent = self.accepted = self.delivered = self.duplicates = 0
        self.measured_sent = self.measured_accepted = self.measured_delivered = 0
        self.errors: Counter[str] = Counter()
        # One entry per measured delivery: latency in µs, and when it arrived (ms after the start).
        self.latency_us = array("i")
        self.received_ms = array("i")

    def connection_lost(self) -> None:
        self.errors["CONNECTION_LOST"] += 1
        self.on_connection_lost()

    def on_connection_lost(self) -> None:
        """Replaced by the run: a pair that lost a connection can never complete."""

    def delivery(self, sent_ns: int) -> None:
        self.delivered += 1
        if self.measuring:
            now = time.monotonic_ns()
            self.measured_delivered += 1
            self.latency_us.append((now - sent_ns) // 1000)
            self.received_ms.append((now - self.started_ns) // 1_000_000)


class Sender:
    """Pipelines sendMessage frames, at most `window` without their reply."""

    def __init__(self, link: Any, frames: SendFrames, stats: Stats, window: int, quota: int | None) -> None:
        self.link = link
        self._frames = frames
        self._stats = stats
        self._window = window
        self.quota = quota
        self.sent = 0
        self.replied = 0
        self.open = False  # sending allowed
        self.paced = False  # a pacer decides when to send; otherwise every reply makes room

    def can_send(self) -> bool:
        return self.open and self.sent - self.replied < self._window and (self.quota is None or self.sent < self.quota)

    def send_one(self) -> None:
        self.link.send_frame(self._frames.frame(self.sent, time.monotonic_ns()))
        self.sent += 1
        self._stats.sent += 1
        if self._stats.measuring:
            self._stats.measured_sent += 1

    def fill(self) -> None:
        while self.can_send():
            self.send_one()

    def frame_received(self, message: dict) -> None:
        self.replied += 1
        if message["type"] == "ack":
            self._stats.accepted += 1
            if self._stats.measuring:
                self._stats.measured_accepted += 1
        else:
            self._stats.errors[_error_code(message)] += 1

    def read_done(self) -> None:
        if not self.paced:
            self.fill()

    def closed(self) -> None:
        if self.open:
            self.open = False
            self._stats.connection_lost()


class Recipient:
    """Receives pushes and acknowledges each read's worth with one ackMessage, as a client would."""

    def __init__(self, link: Any, stats: Stats) -> None:
        self.link = link
        self._stats = stats
        self._unacked: list[str] = []
        self._last_number = -1
        self.running = True

    def frame_received(self, message: dict) -> None:
        if message["type"] != "message":
            self._stats.errors[_error_code(message)] += 1
            return
        payload = message["payload"]
        self._unacked.append(payload["id"])
        # One sender per recipient and FIFO delivery: a number not above the last one is a repeat.
        number = payload["messageNumber"] - NUMBER_BASE
        if number <= self._last_number:
            self._stats.duplicates += 1
            return
        self._last_number = number
        self._stats.delivery(sent_ns_of(payload["content"]))

    def read_done(self) -> None:
        while self._unacked:
            batch, self._unacked = self._unacked[:ACK_BATCH], self._unacked[ACK_BATCH:]
            self.link.send("ackMessage", {"messageIds": batch})

    def closed(self) -> None:
        if self.running:
            self._stats.connection_lost()


def _error_code(message: dict) -> str:
    if message.get("type") == "error":
        return str(message.get("payload", {}).get("code", "UNKNOWN"))
    return f"UNEXPECTED_{message.get('type')}"


class PairLoad:
    """Registers this process's pairs, then runs the load and reports what happened."""

    def __init__(self, reactor: Any, spec: LoadSpec) -> None:
        self._reactor = reactor
        self._spec = spec
        self._codec = CODECS[spec.transport]
        self._connectors: dict[Target, Connector] = {}
        self.stats = Stats()
        self.stats.on_connection_lost = self.stop
        self.senders: list[Sender] = []
        self.recipients: list[Recipient] = []
        self._ended: defer.Deferred = defer.Deferred()
        self._next_sender = 0

    async def setup(self) -> None:
        limit = defer.DeferredSemaphore(SETUP_CONCURRENCY)
        quotas = _split(self._spec.messages, len(self._spec.pairs))
        await defer.gatherResults(
            [limit.run(lambda pair=pair, quota=quota: defer.ensureDeferred(self._add_pair(*pair, quota)))
             for pair, quota in zip(self._spec.pairs, quotas)],
            consumeErrors=True,
        ).addErrback(lambda failure: failure.value.subFailure)

    async def _add_pair(self, sender_target: Target, recipient_target: Target, quota: int | None) -> None:
        sender_link, sender_id = await self._register(sender_target)
        recipient_link, recipient_id = await self._register(recipient_target)
        frames = SendFrames(self._codec, sender_id, recipient_id, self._spec.content_bytes)
        sender = Sender(sender_link, frames, self.stats, self._spec.window, quota)
        sender.paced = self._spec.rate is not None
        recipient = Recipient(recipient_link, self.stats)
        sender_link.handler, recipient_link.handler = sender, recipient
        self.senders.append(sender)
        self.recipients.append(recipient)

    async def _register(self, target: Target) -> tuple[Any, str]:
        if target not in self._connectors:
            self._connectors[target] = Connector(self._reactor, self._codec, target)
        link = await self._connectors[target].open()
        reply = await link.request(
            "register",
            {"username": f"bench-{uuid.uuid4().hex[:24]}", "password": PASSWORD, "publicKey": key_bundle()},
            "registerSuccess",
        )
        return link, reply["userId"]

    def stop(self) -> None:
        if not self._ended.called:
            self._ended.callback(None)

    async def run(self, start: float) -> dict:
        spec = self._spec
        await task.deferLater(self._reactor, max(0.0, start - time.monotonic()), lambda: None)
        self.stats.started_ns = time.monotonic_ns()
        timers = []
        if spec.warmup > 0:
            timers.append(self._reactor.callLater(spec.warmup, self._start_measuring))
        else:
            self._start_measuring()
        if spec.duration is not None:
            timers.append(self._reactor.callLater(spec.warmup + spec.duration, self.stop))
        for sender in self.senders:
            sender.open = True
        loops = []
        if spec.rate is not None:
            loops.append(self._every(PACE_SECONDS, self._pace, start, spec.rate))
        else:
            for sender in self.senders:
                sender.fill()
        if spec.messages is not None:
            loops.append(self._every(SETTLE_POLL_SECONDS, self._stop_when_complete))
        await self._ended
        measured_until = time.monotonic()
        self.stats.measuring = False
        for timer in timers:
            if timer.active():
                timer.cancel()
        for loop in loops:
            if loop.running:
                loop.stop()
        for sender in self.senders:
            sender.open = False
        await self._settle()
        self._close()
        return self._result(measured_from=start + spec.warmup, measured_until=measured_until)

    def _start_measuring(self) -> None:
        self.stats.measuring = True

    def _every(self, seconds: float, function: Any, *args: Any) -> task.LoopingCall:
        loop = task.LoopingCall(function, *args)
        loop.clock = self._reactor
        loop.start(seconds)
        return loop

    def _pace(self, start: float, rate: float) -> None:
        """Send what is due by now, round-robin over the senders with room in their window."""
        due = int(rate * (time.monotonic() - start))
        idle = 0
        while self.stats.sent < due and idle < len(self.senders):
            sender = self.senders[self._next_sender]
            self._next_sender = (self._next_sender + 1) % len(self.senders)
            if sender.can_send():
                sender.send_one()
                idle = 0
            else:
                idle += 1

    def _all_answered(self) -> bool:
        return all(sender.replied == sender.sent for sender in self.senders)

    def _caught_up(self) -> bool:
        return self.stats.delivered >= self.stats.accepted

    def _stop_when_complete(self) -> None:
        """With a message count, the run ends once everything is sent, answered and delivered."""
        quotas_met = all(sender.sent == sender.quota for sender in self.senders)
        if quotas_met and self._all_answered() and self._caught_up():
            self.stop()

    async def _settle(self) -> None:
        deadline = time.monotonic() + self._spec.settle
        while not (self._all_answered() and self._caught_up()) and time.monotonic() < deadline:
            await task.deferLater(self._reactor, SETTLE_POLL_SECONDS, lambda: None)

    def _close(self) -> None:
        for recipient in self.recipients:
            recipient.running = False
        for party in [*self.senders, *self.recipients]:
            party.link.close()

    def _result(self, measured_from: float, measured_until: float) -> dict:
        stats = self.stats
        return {
            "pairs": len(self.senders),
            "sent": stats.sent,
            "accepted": stats.accepted,
            "delivered": stats.delivered,
            "duplicates": stats.duplicates,
            "unanswered": sum(sender.sent - sender.replied for sender in self.senders),
            "lost": max(0, stats.accepted - stats.delivered),
            "errors": dict(stats.errors),
            "measured": {
                "from": measured_from,
                "until": measured_until,
                "sent": stats.measured_sent,
                "accepted": stats.measured_accepted,
                "delivered": stats.measured_delivered,
            },
            "latency_us": base64.b64encode(stats.latency_us.tobytes()).decode(),
            "received_ms": base64.b64encode(stats.received_ms.tobytes()).decode(),
        }


def _split(total: int | None, parts: int) -> list[int | None]:
    """`total` shared out as evenly as possible (None stays None for every part)."""
    if total is None:
        return [None] * parts
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


class _Control(LineReceiver):
    """The coordinator's side of stdin/stdout."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self) -> None:
        self.lines: defer.DeferredQueue = defer.DeferredQueue()
        self._closed: defer.Deferred = defer.Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.lines.put(json_loads(line))

    def connectionLost(self, reason: Any = None) -> None:
        # The coordinator is gone: end the run rather than load the server for nobody.
        self.lines.put({"stop": True})
        self._closed.callback(None)

    def send(self, message: dict) -> None:
        self.transport.write(json_dumps(message) + b"\n")

    def finish(self, message: dict) -> defer.Deferred:
        """Send the last message; fires once it is written out, so exiting cannot cut it off."""
        self.send(message)
        self.transport.loseConnection()
        return self._closed


async def _serve(reactor: Any) -> None:
    control = _Control()
    stdio.StandardIO(control, reactor=reactor)
    load = PairLoad(reactor, LoadSpec.from_dict(await control.lines.get()))
    await load.setup()
    control.send({"ready": True})
    go = await control.lines.get()
    if "start" not in go:
        return
    control.lines.get().addCallback(lambda _: load.stop())
    await control.finish(await load.run(go["start"]))


def main() -> None:
    task.react(lambda reactor: defer.ensureDeferred(_serve(reactor)))


if __name__ == "__main__":
    main()
