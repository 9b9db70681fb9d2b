"""The parts of a client connection, each alone: reply order, backpressure, timeouts, admission."""

from __future__ import annotations

from twisted.internet import defer, task

from construct.core.admission import MAX_DELAY_SECONDS, MAX_LAG_SECONDS, MIN_IN_FLIGHT, TICK_SECONDS, Admission
from construct.protocol.backpressure import MIN_STALLED_BYTES, PAUSE_BACKLOG, RESUME_BACKLOG, Backpressure
from construct.protocol.connection import ConnectionTracker
from construct.protocol.replies import NO_REPLY, ReplyOrder
from construct.protocol.timeouts import AUTH_TIMEOUT, IDLE, STOPPED_READING, ConnectionLimits, overdue


def test_replies_go_out_in_the_order_of_their_frames_whatever_order_they_are_answered_in():
    sent: list[str] = []
    order = ReplyOrder(lambda kind, payload, request_id, encoding: sent.append(request_id))
    first, second, third = (order.take(name, "json") for name in ("r1", "r2", "r3"))
    answered = order.all_answered()
    order.answer(third, ("ack", {}, "r3", "json"))
    order.answer(second, NO_REPLY)
    assert sent == [] and not answered.called and order.waiting == 3
    order.answer(first, ("ack", {}, "r1", "json"))
    assert sent == ["r1", "r3"], "a frame with no reply takes its place and sends nothing"
    assert answered.called and order.waiting == 0 and order.all_answered().called


def test_a_reply_that_cannot_be_sent_does_not_hold_back_the_rest():
    sent: list[str] = []

    def send(kind, payload, request_id, encoding):
        if request_id == "bad":
            raise OSError("refused")
        sent.append(request_id)

    order = ReplyOrder(send)
    bad, good = order.take("bad", "json"), order.take("good", "json")
    order.answer(good, ("ack", {}, "good", "json"))
    order.answer(bad, ("ack", {}, "bad", "json"))
    assert sent == ["good"] and order.waiting == 0


class _Reading:
    def __init__(self) -> None:
        self.changes: list[bool] = []

    def pause_reading(self) -> None:
        self.changes.append(False)

    def resume_reading(self) -> None:
        self.changes.append(True)


def _flow() -> tuple[Backpressure, list[bool], task.Clock]:
    transport, clock = _Reading(), task.Clock()
    return Backpressure(transport, 1024, clock), transport.changes, clock


def test_a_long_backlog_stops_reading_until_it_is_short_again():
    flow, reading, _ = _flow()
    flow.backlog(PAUSE_BACKLOG - 1)
    assert reading == []
    flow.backlog(PAUSE_BACKLOG)
    assert reading == [False]
    flow.backlog(RESUME_BACKLOG + 1)
    assert reading == [False], "no flapping between the two marks"
    flow.backlog(RESUME_BACKLOG)
    assert reading == [False, True]


def test_a_client_that_stops_reading_is_not_read_and_is_cut_off_past_its_allowance():
    flow, reading, clock = _flow()
    clock.advance(7)
    assert not flow.over_allowance(10 * MIN_STALLED_BYTES), "nothing counts while the client reads"
    flow.stalled()
    assert reading == [False] and not flow.writable and flow.stalled_since == 7
    flow.backlog(PAUSE_BACKLOG)
    flow.backlog(0)
    assert reading == [False], "a shorter backlog does not resume reading a stalled client"
    assert not flow.over_allowance(MIN_STALLED_BYTES)
    assert flow.over_allowance(1)
    assert flow.unstalled() and reading == [False, True] and flow.writable
    assert not flow.unstalled()


def test_overdue_says_which_limit_a_connection_outstayed():
    limits = ConnectionLimits(auth_timeout=60, idle_timeout=300, slow_client_timeout=30)
    assert overdue(limits, 59, 0, 59, False, None, pings=False) is None
    assert overdue(limits, 61, 0, 61, False, None, pings=False) == AUTH_TIMEOUT
    assert overdue(limits, 400, 0, 99, True, None, pings=False) == IDLE
    assert overdue(limits, 400, 0, 99, True, None, pings=True) is None, "WebSocket pings find dead peers instead"
    assert overdue(limits, 100, 0, 100, True, 69, pings=True) == STOPPED_READING
    assert overdue(ConnectionLimits(0, 0, 0, 0, 0), 10**6, 0, 0, False, 0, pings=False) is None


def _run(coroutine) -> None:
    """Run a coroutine that awaits nothing (Admission.tick) to its end."""
    assert defer.ensureDeferred(coroutine).called


def test_admission_sheds_while_the_reactor_is_late_and_recovers_with_hysteresis():
    clock = task.Clock()
    admission = Admission(clock)
    _run(admission.tick())
    clock.advance(TICK_SECONDS + MAX_LAG_SECONDS * 0.9)
    _run(admission.tick())
    assert not admission.busy
    clock.advance(TICK_SECONDS + MAX_LAG_SECONDS * 1.5)
    _run(admission.tick())
    assert admission.busy
    clock.advance(TICK_SECONDS + MAX_LAG_SECONDS * 0.7)
    _run(admission.tick())
    assert admission.busy, "not yet under half the limit"
    clock.advance(TICK_SECONDS + MAX_LAG_SECONDS * 0.4)
    _run(admission.tick())
    assert not admission.busy


def test_admission_sheds_when_more_sends_are_in_flight_than_complete_in_the_delay_allowed():
    clock = task.Clock()
    admission = Admission(clock)
    _run(admission.tick())
    # A steady 20,000 completions a second for a while: the limit follows the rate.
    for _ in range(40):
        for _ in range(int(20_000 * TICK_SECONDS)):
            admission.started()
            admission.finished()
        clock.advance(TICK_SECONDS)
        _run(admission.tick())
    assert abs(admission.limit() - 20_000 * MAX_DELAY_SECONDS) < 50
    for _ in range(int(admission.limit()) + 10):
        admission.started()
    clock.advance(TICK_SECONDS)
    _run(admission.tick())
    assert admission.busy
    # Nothing completes: the rate falls, but never below the floor.
    for _ in range(100):
        clock.advance(TICK_SECONDS)
        _run(admission.tick())
    assert admission.limit() == MIN_IN_FLIGHT and admission.busy
    while admission.in_flight > MIN_IN_FLIGHT // 2 - 1:
        admission.finished()
    clock.advance(TICK_SECONDS)
    _run(admission.tick())
    assert not admission.busy


class _Lingering:
    """A connection past its auth timeout whose client never reads the goodbye."""

    def __init__(self, tracker: ConnectionTracker) -> None:
        self.tracker, self.events = tracker, []

    def overdue(self, now: float) -> str | None:
        return AUTH_TIMEOUT

    def expire(self, reason: str) -> None:
        self.events.append("expire")

    def abort(self) -> None:
        self.events.append("abort")


def test_a_connection_told_to_go_that_is_still_there_a_sweep_later_is_aborted():
    tracker = ConnectionTracker(task.Clock())
    lingering, gone = _Lingering(tracker), _Lingering(tracker)
    tracker.add(lingering)
    tracker.add(gone)
    defer.ensureDeferred(tracker.sweep())
    assert lingering.events == gone.events == ["expire"], "told why first, politely"
    tracker.discard(gone)  # its client read the goodbye and the connection closed
    defer.ensureDeferred(tracker.sweep())
    assert lingering.events == ["expire", "abort"], "a polite close must not wait forever on a client that never reads"
    assert gone.events == ["expire"]
