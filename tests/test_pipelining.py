"""Overlapping sends on one connection: stores keep the order sent, replies the order of the frames."""

from __future__ import annotations

from twisted.internet import defer, task

from construct.core.abuse import AbuseLimits, AbuseSettings
from construct.core.accounts import Identity
from construct.core.admission import Admission
from construct.core.limits import MemoryCounters
from construct.core.messaging import MessageService, SendResult
from construct.delivery.types import Accepted
from construct.metrics import Metrics
from construct.protocol import codec
from construct.protocol.connection import MAX_IN_FLIGHT, ClientConnection
from construct.protocol.timeouts import ConnectionLimits
from tests.helpers import chat_message

ALICE = "3f2b8c1e-7a4d-4e2b-9c61-0d5e8f7a1b2c"
BOB = "9a7c4e12-5b3f-4d8e-a1c6-2f0b9d8e7c65"
CAROL = "0b5e9d7c-1a2b-4c3d-8e9f-a0b1c2d3e4f5"


class OrderedInbox:
    """Records the order stores are issued in; each one is answered when the test says."""

    def __init__(self) -> None:
        self.stored: list[str] = []
        self.answers: list[defer.Deferred] = []

    def put(self, submission) -> defer.Deferred:
        self.stored.append(submission.message_id)
        answer: defer.Deferred = defer.Deferred()
        self.answers.append(answer)
        return answer


class Quiet:
    """WakeUps that wake nobody."""

    def stored(self, recipient_id, accepted, message) -> None:
        pass


def test_a_slow_recipient_lookup_does_not_let_a_later_send_store_first():
    """Send 1 waits for its recipient lookup, send 2 (known recipient) starts meanwhile: 2 is stored after 1."""
    lookups: dict[str, defer.Deferred] = {}

    def recipient_exists(user_id: str) -> defer.Deferred:
        return lookups.setdefault(user_id, defer.Deferred()) if user_id == BOB else defer.succeed(True)

    def nobody_online(user_id: str) -> bool:
        return False

    inbox = OrderedInbox()
    service = MessageService(
        inbox, nobody_online, Quiet(), task.Clock(), AbuseLimits(MemoryCounters(task.Clock()), AbuseSettings()),
        recipient_exists=recipient_exists,
    )
    first, second = chat_message(ALICE, BOB), chat_message(ALICE, CAROL)
    sending = [defer.ensureDeferred(service.send(ALICE, message)) for message in (first, second)]
    assert inbox.stored == [], "send 2 must wait for send 1's turn"
    lookups[BOB].callback(True)
    assert inbox.stored == [first["id"], second["id"]]
    for answer in inbox.answers:
        answer.callback(Accepted(False, 1000, duplicate=False, seq=1))
    assert all(result.called for result in sending)


class ScriptedMessaging:
    def __init__(self) -> None:
        self.sends: list[defer.Deferred] = []

    def send(self, user_id: str, payload: dict) -> defer.Deferred:
        answer: defer.Deferred = defer.Deferred()
        self.sends.append(answer)
        return answer.addCallback(
            lambda accepted: SendResult(payload["id"], "queued", accepted.expires_at_ms, accepted.duplicate)
        )


class Recorder:
    """A connection's Transport that hands each frame written to `write`."""

    def __init__(self, write) -> None:
        self.write_frame = write

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        pass


class ScriptedCore:
    def __init__(self) -> None:
        self.messaging = ScriptedMessaging()
        self.metrics = Metrics()
        self.admission = Admission(task.Clock())


def _alice_connected() -> tuple[ScriptedCore, ClientConnection, list]:
    """A connection authenticated as alice on a scripted core, and the frames written to it."""
    core = ScriptedCore()
    written: list = []
    connection = ClientConnection(
        core, "memory", Recorder(lambda data, encoding: written.append(codec.decode(data, encoding))), 1 << 16,
        "192.0.2.1", ConnectionLimits(), task.Clock(),
    )
    connection.identity = Identity(ALICE, "alice", "token-hash")
    return core, connection, written


def test_replies_keep_frame_order_and_other_operations_wait_for_sends_in_flight():
    core, connection, written = _alice_connected()
    messages = [chat_message(ALICE, BOB) for _ in range(3)]
    for number, message in enumerate(messages):
        connection.frame_received(codec.encode("sendMessage", message, f"r{number}", codec.JSON), codec.JSON)
    connection.frame_received(codec.encode("ping", {}, "p", codec.JSON), codec.JSON)
    assert len(core.messaging.sends) == 3, "all three sends started before any was answered"

    core.messaging.sends[2].callback(Accepted(False, 5000, duplicate=False))
    core.messaging.sends[1].errback(Exception("the inbox broke"))
    assert written == [], "nothing is answered before the first frame"
    core.messaging.sends[0].callback(Accepted(True, 5000, duplicate=False))
    assert [(frame.type, frame.request_id) for frame in written] == [
        ("ack", "r0"), ("error", "r1"), ("ack", "r2"), ("pong", "p"),
    ]
    assert written[1].payload["code"] == "SERVER_ERROR"


def test_an_unreadable_frame_is_answered_in_its_place_and_at_most_32_sends_run_at_once():
    core, connection, written = _alice_connected()
    connection.frame_received(codec.encode("sendMessage", chat_message(ALICE, BOB), "first", codec.JSON), codec.JSON)
    connection.frame_received(b"{not json", codec.JSON)
    for number in range(MAX_IN_FLIGHT + 5):
        message = chat_message(ALICE, BOB)
        connection.frame_received(codec.encode("sendMessage", message, f"r{number}", codec.JSON), codec.JSON)
    assert len(core.messaging.sends) == 1, "nothing after the bad frame starts before it is answered"
    core.messaging.sends[0].callback(Accepted(False, 5000, duplicate=False))
    assert [(frame.type, frame.request_id) for frame in written] == [("ack", "first"), ("error", None)]
    assert written[1].payload["code"] == "INVALID_FORMAT"
    assert len(core.messaging.sends) == 1 + MAX_IN_FLIGHT, "the rest wait for room"
    core.messaging.sends[1].callback(Accepted(False, 5000, duplicate=False))
    assert len(core.messaging.sends) == 2 + MAX_IN_FLIGHT, "one answered, one more started"
    answered = 2
    while answered < len(core.messaging.sends):
        core.messaging.sends[answered].callback(Accepted(False, 5000, duplicate=False))
        answered += 1
    assert answered == 1 + MAX_IN_FLIGHT + 5
    assert [frame.request_id for frame in written[2:]] == [f"r{number}" for number in range(MAX_IN_FLIGHT + 5)]


def test_a_reply_that_cannot_be_written_does_not_hold_back_the_ones_after_it():
    core = ScriptedCore()
    written: list = []

    def write(data: bytes, encoding: str) -> None:
        frame = codec.decode(data, encoding)
        if frame.request_id == "r0":
            raise OSError("the transport refused this one")
        written.append(frame)

    connection = ClientConnection(core, "memory", Recorder(write), 1 << 16, "192.0.2.1", ConnectionLimits(), task.Clock())
    connection.identity = Identity(ALICE, "alice", "token-hash")
    for number in range(3):
        connection.frame_received(codec.encode("sendMessage", chat_message(ALICE, BOB), f"r{number}", codec.JSON), codec.JSON)
    for send in reversed(core.messaging.sends):
        send.callback(Accepted(False, 5000, duplicate=False))
    assert [frame.request_id for frame in written] == ["r1", "r2"]
    connection.frame_received(codec.encode("ping", {}, "p", codec.JSON), codec.JSON)
    assert written[-1].type == "pong", "the connection goes on"


def test_a_busy_server_answers_new_sends_at_once_in_their_place_and_still_takes_acks():
    """While admission sheds, a send is refused with SERVER_BUSY without reaching the inbox; the
    refusal waits behind the replies before it, and an ack goes on as usual."""
    core, connection, written = _alice_connected()
    acks: list = []
    core.messaging.ack = lambda user_id, ids: acks.append(ids) or defer.succeed([1.0])
    connection.frame_received(codec.encode("sendMessage", chat_message(ALICE, BOB), "taken", codec.JSON), codec.JSON)
    core.admission.busy = True
    connection.frame_received(codec.encode("sendMessage", chat_message(ALICE, BOB), "shed", codec.JSON), codec.JSON)
    connection.frame_received(codec.encode("ackMessage", {"messageIds": ["m"]}, "ack", codec.JSON), codec.JSON)
    assert len(core.messaging.sends) == 1 and acks == [["m"]]
    assert written == [], "the refusal waits for the send before it"
    core.messaging.sends[0].callback(Accepted(False, 5000, duplicate=False))
    assert [(frame.type, frame.request_id) for frame in written] == [("ack", "taken"), ("error", "shed")]
    assert written[1].payload == {"code": "SERVER_BUSY", "message": "The server is busy; retry after 1 s", "retryAfter": 1}
    assert core.admission.in_flight == 0
