"""Load generator: pairs of users exchange messages through a running server over TCP JSON lines.

    python tools/loadgen.py --port 8081 --pairs 20 --messages 250

Each pair registers (use a server started with a low --bcrypt-cost, or registration dominates),
then every sender pushes its messages as fast as the server acknowledges them while its partner
receives and acknowledges each one. Prints one JSON line: messages, seconds, messages per second,
and the median and 99th percentile of send-to-receive latency.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
import uuid

from nacl.signing import SigningKey
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

PASSWORD = "LoadTest-Password-1"


def _bundle() -> dict:
    key = SigningKey.generate()
    data = json.dumps(
        {
            "userId": "",
            "timestamp": "2026-01-01T00:00:00Z",
            "supportedSuites": [
                {
                    "suiteId": 1,
                    "identityKey": base64.b64encode(os.urandom(32)).decode(),
                    "signedPrekey": base64.b64encode(os.urandom(32)).decode(),
                }
            ],
        }
    ).encode()
    return {
        "masterIdentityKey": base64.b64encode(bytes(key.verify_key)).decode(),
        "bundleData": base64.b64encode(data).decode(),
        "signature": base64.b64encode(key.sign(data).signature).decode(),
    }


class Client(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def connectionMade(self) -> None:
        self.replies: defer.DeferredQueue = defer.DeferredQueue()
        self.pushes: defer.DeferredQueue = defer.DeferredQueue()

    def lineReceived(self, line: bytes) -> None:
        frame = json.loads(line)
        (self.pushes if frame["type"] == "message" else self.replies).put(frame)

    def send(self, message_type: str, payload: dict) -> None:
        self.sendLine(json.dumps({"type": message_type, "payload": payload}).encode())

    async def request(self, message_type: str, payload: dict) -> dict:
        self.send(message_type, payload)
        return await self.replies.get()


async def _user(reactor, port: int, name: str) -> tuple[Client, str]:
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Client))
    reply = await client.request("register", {"username": name, "password": PASSWORD, "publicKey": _bundle()})
    if reply["type"] != "registerSuccess":
        raise SystemExit(f"registration failed: {reply}")
    return client, reply["payload"]["userId"]


async def _pair(reactor, port: int, messages: int, size: int, latencies: list[float]) -> None:
    tag = uuid.uuid4().hex[:8]
    (sender, sender_id), (receiver, receiver_id) = [await _user(reactor, port, f"load{tag}{side}") for side in "ab"]
    content = base64.b64encode(os.urandom(size)).decode()
    sent_at: dict[str, float] = {}

    async def receive() -> None:
        for _ in range(messages):
            message = (await receiver.pushes.get())["payload"]
            latencies.append(time.perf_counter() - sent_at[message["id"]])
            receiver.send("ackMessage", {"messageIds": [message["id"]]})

    receiving = defer.ensureDeferred(receive())
    for number in range(messages):
        message_id = str(uuid.uuid4())
        sent_at[message_id] = time.perf_counter()
        reply = await sender.request(
            "sendMessage",
            {
                "id": message_id, "from": sender_id, "to": receiver_id, "messageNumber": number,
                "ephemeralPublicKey": base64.b64encode(os.urandom(32)).decode(), "content": content,
                "timestamp": int(time.time()),
            },
        )
        if reply["type"] != "ack":
            raise SystemExit(f"send failed: {reply}")
    await receiving
    for client in (sender, receiver):
        client.transport.loseConnection()


async def main(reactor, arguments: argparse.Namespace) -> None:
    latencies: list[float] = []
    started = time.perf_counter()
    await defer.gatherResults(
        [defer.ensureDeferred(_pair(reactor, arguments.port, arguments.messages, arguments.size, latencies))
         for _ in range(arguments.pairs)],
        consumeErrors=True,
    )
    seconds = time.perf_counter() - started
    latencies.sort()
    print(json.dumps({
        "messages": len(latencies),
        "seconds": round(seconds, 3),
        "messagesPerSecond": round(len(latencies) / seconds, 1),
        "latencyMedianMs": round(statistics.median(latencies) * 1000, 2),
        "latencyP99Ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8081, help="the server's TCP JSON-lines port")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--messages", type=int, default=200, help="messages per pair")
    parser.add_argument("--size", type=int, default=256, help="ciphertext bytes per message")
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args(sys.argv[1:]))))
