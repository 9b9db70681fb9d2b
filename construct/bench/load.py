"""The message load of one load-generator process: sender/recipient pairs.

Run as `python -m construct.bench.load` by `construct.bench.workers`. Over stdin and stdout, one
JSON object a line: it reads its `LoadSpec`, registers its pairs, writes `{"ready": true}`,
waits for `{"start": <monotonic seconds>}` (every process starts at the same instant; the
monotonic clock is shared by the processes of a machine), runs, and writes its result. A
`{"stop": true}` line ends a run that has no duration or message count of its own.

Two ways to load a server:

- **Open loop** (`rate` set): message *i* is due at `start + i / rate`, dealt round-robin over
  the senders, so consecutive messages go to different recipients, as many users each sending a
  little do. A message goes out when it is due whatever the server has answered so far (what a
  slow server cannot take waits in the sender's socket, then in this process), and its latency is
  counted from when it was due: time a server makes senders wait is never hidden.
- **Closed loop** (no rate): each sender keeps `window` sends without their ack, for the ceiling.

The connections run on `construct.bench.engine` (raw sockets on epoll), not on Twisted.
"""

from __future__ import annotations

import base64
import os
import sys
import time
import uuid
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

from construct.bench.clients import Target
from construct.bench.engine import Link, Loop, connect, requests
from construct.bench.wire import CODECS, NUMBER_BASE, PASSWORD, SendFrames, json_dumps, json_loads, key_bundle, \
    sent_ns_of

SETUP_BATCH = 64
SETUP_TIMEOUT = 120.0
ACK_BATCH = 1000
# Deliveries may trail the last ack by this long before the missing ones count as lost.
SETTLE_SECONDS = 10.0
# Longest poll while paced sends are due or a run is settling.
POLL_SECONDS = 0.001
IDLE_POLL_SECONDS = 0.02


@dataclass
class LoadSpec:
    transport: str
    # (sender's server, recipient's server) of each pair
    pairs: list[tuple[Target, Target]]
    content_bytes: int = 256
    window: int = 64
    rate: float | None = None  # messages/s offered by this process (open loop); None: closed loop
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
        # Open loop: how late this process wrote each measured send, after it was due (µs).
        self.send_lag_us = array("i")

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
            self.latency_us.append(min((now - sent_ns) // 1000, 2**31 - 1))
            self.received_ms.append((now - self.started_ns) // 1_000_000)


class Sender:
    """Sends sendMessage frames: when due (open loop), or keeping `window` unanswered (closed)."""

    def __init__(self, link: Any, frames: SendFrames, stats: Stats, window: int, quota: int | None) -> None:
        self.link = link
        self._frames = frames
        self._stats = stats
        self._window = window
        self.quota = quota
        self.sent = 0
        self.replied = 0
        self.open = False  # sending allowed
        self.paced = False  # the pacer decides when to send; otherwise every reply makes room

    def can_send(self) -> bool:
        return self.open and self.sent - self.replied < self._window and (self.quota is None or self.sent < self.quota)

    def send_one(self, stamp_ns: int | None = None) -> None:
        """Send the next message; its latency counts from `stamp_ns` (default: now)."""
        self.link.send_frame(self._frames.frame(self.sent, time.monotonic_ns() if stamp_ns is None else stamp_ns))
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
    """Registers this process's pairs, then runs the load and reports what happened (blocking)."""

    def __init__(self, spec: LoadSpec) -> None:
        self._spec = spec
        self._codec = CODECS[spec.transport]
        self.loop = Loop()
        self.stats = Stats()
        self.stats.on_connection_lost = self.stop
        self.senders: list[Sender] = []
        self.recipients: list[Recipient] = []
        self._stopped = False

    def setup(self) -> None:
        spec = self._spec
        quotas = _split(spec.messages, len(spec.pairs))
        for start in range(0, len(spec.pairs), SETUP_BATCH):
            batch = spec.pairs[start:start + SETUP_BATCH]
            links = [(self._link(sender), self._link(recipient)) for sender, recipient in batch]
            flat = [link for pair in links for link in pair]
            accounts = requests(self.loop, [(link, "register", _registration()) for link in flat], "registerSuccess",
                                SETUP_TIMEOUT)
            for index, (sender_link, recipient_link) in enumerate(links):
                sender_id, recipient_id = accounts[2 * index]["userId"], accounts[2 * index + 1]["userId"]
                frames = SendFrames(self._codec, sender_id, recipient_id, spec.content_bytes)
                sender = Sender(sender_link, frames, self.stats, spec.window, quotas[start + index])
                sender.paced = spec.rate is not None
                recipient = Recipient(recipient_link, self.stats)
                sender_link.party, recipient_link.party = sender, recipient
                self.senders.append(sender)
                self.recipients.append(recipient)

    def _link(self, target: Target) -> Link:
        return connect(self.loop, self._codec, target.host, target.port_for(self._codec))

    def stop(self) -> None:
        self._stopped = True

    def _control_readable(self, fd: int) -> None:
        """Any line from the coordinator, or its going away, stops the run."""
        if not os.read(fd, 4096):
            self.loop.unwatch(fd)
        self.stop()

    def run(self, start: float, control_fd: int | None = None) -> dict:
        spec = self._spec
        if control_fd is not None:
            self.loop.watch(control_fd, lambda: self._control_readable(control_fd))
        while time.monotonic() < start:
            time.sleep(min(0.01, start - time.monotonic()))
        stats = self.stats
        stats.started_ns = time.monotonic_ns()
        measure_from = start + spec.warmup
        stop_at = None if spec.duration is None else measure_from + spec.duration
        for sender in self.senders:
            sender.open = True
        if spec.rate is None:
            for sender in self.senders:
                sender.fill()
        pacer = _Pacer(self.senders, stats, start, spec.rate) if spec.rate is not None else None

        def tick() -> float | None:
            now = time.monotonic()
            if not stats.measuring and now >= measure_from:
                stats.measuring = True
            if self._stopped or (stop_at is not None and now >= stop_at):
                return None
            if spec.messages is not None and self._complete():
                return None
            if pacer is not None:
                return pacer.send_due(now)
            return IDLE_POLL_SECONDS

        self.loop.run(tick)
        measured_until = time.monotonic()
        stats.measuring = False
        for sender in self.senders:
            sender.open = False
        self._settle()
        for recipient in self.recipients:
            recipient.running = False
        self.loop.close()
        return self._result(measured_from=measure_from, measured_until=measured_until)

    def _all_answered(self) -> bool:
        return all(sender.replied == sender.sent for sender in self.senders)

    def _caught_up(self) -> bool:
        return self.stats.delivered >= self.stats.accepted

    def _complete(self) -> bool:
        """With a message count, the run ends once everything is sent, answered and delivered."""
        quotas_met = all(sender.sent == sender.quota for sender in self.senders)
        return quotas_met and self._all_answered() and self._caught_up()

    def _settle(self) -> None:
        deadline = time.monotonic() + self._spec.settle

        def tick() -> float | None:
            if (self._all_answered() and self._caught_up()) or time.monotonic() > deadline:
                return None
            return IDLE_POLL_SECONDS

        self.loop.run(tick)

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
            "latency_us": _encoded(stats.latency_us),
            "received_ms": _encoded(stats.received_ms),
            "send_lag_us": _encoded(stats.send_lag_us),
        }


class _Pacer:
    """Open loop: sends every message when it is due, round-robin over the senders."""

    def __init__(self, senders: list[Sender], stats: Stats, start: float, rate: float) -> None:
        self._senders = [sender for sender in senders if sender.quota != 0]
        self._stats = stats
        self._start = start
        self._interval = 1.0 / rate
        self._scheduled = 0
        self._next = 0

    def send_due(self, now: float) -> float:
        """Send what is due by `now`; returns how long to wait for the next one."""
        senders, stats, interval = self._senders, self._stats, self._interval
        if not senders:
            return IDLE_POLL_SECONDS
        now_ns = time.monotonic_ns()
        while self._start + self._scheduled * interval <= now:
            due = self._start + self._scheduled * interval
            self._scheduled += 1
            sender = senders[self._next]
            self._next = (self._next + 1) % len(senders)
            if not sender.open or (sender.quota is not None and sender.sent >= sender.quota):
                continue
            due_ns = int(due * 1e9)  # time.monotonic() is time.monotonic_ns() in seconds
            sender.send_one(due_ns)
            if stats.measuring:
                stats.send_lag_us.append(min((now_ns - due_ns) // 1000, 2**31 - 1))
        return min(POLL_SECONDS, max(0.0, self._start + self._scheduled * interval - time.monotonic()))


def _registration() -> dict:
    return {"username": f"bench-{uuid.uuid4().hex[:24]}", "password": PASSWORD, "publicKey": key_bundle()}


def _encoded(samples: array) -> str:
    return base64.b64encode(samples.tobytes()).decode()


def _split(total: int | None, parts: int) -> list[int | None]:
    """`total` shared out as evenly as possible (None stays None for every part)."""
    if total is None:
        return [None] * parts
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def _write(message: dict) -> None:
    sys.stdout.buffer.write(json_dumps(message) + b"\n")
    sys.stdout.buffer.flush()


def main() -> None:
    control = sys.stdin.buffer
    load = PairLoad(LoadSpec.from_dict(json_loads(control.readline())))
    load.setup()
    _write({"ready": True})
    go = json_loads(control.readline() or b"{}")
    if "start" not in go:
        return
    # Any later line (or the coordinator going away) stops the run.
    _write(load.run(go["start"], control.fileno()))


if __name__ == "__main__":
    main()
