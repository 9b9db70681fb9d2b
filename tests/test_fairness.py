"""The hashing threads' turns between client addresses (construct.core.fairness), and the
password hasher's use of them: deterministic, with the jobs' completions in the test's hands."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from construct.core.accounts import PasswordHasher
from construct.core.fairness import FairShare


class Workers:
    """A stand-in for the thread pool: records what starts, finishes it when told."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running: list[defer.Deferred] = []

    def run(self, fn, *args) -> defer.Deferred:
        self.started.append(args[0])
        done: defer.Deferred = defer.Deferred()
        self.running.append(done)
        return done

    def finish_first(self, result="done") -> None:
        self.running.pop(0).callback(result)


def test_a_client_with_many_jobs_waiting_does_not_make_another_wait_behind_all_of_them():
    workers = Workers()
    share = FairShare(workers.run, slots=2)
    attacker = [share.run("203.0.113.9", str, f"attacker-{i}") for i in range(18)]
    honest = share.run("198.51.100.7", str, "honest")
    assert workers.started == ["attacker-0", "attacker-1"]
    # A FIFO would start attacker-2 … attacker-17 first; the honest job waits for one slot only.
    workers.finish_first()
    assert workers.started[-1] == "honest"
    workers.finish_first()
    workers.finish_first()
    assert honest.called and attacker[0].called and attacker[1].called
    assert workers.started == ["attacker-0", "attacker-1", "honest", "attacker-2", "attacker-3"]


def test_waiting_owners_take_turns_one_job_each():
    workers = Workers()
    share = FairShare(workers.run, slots=1)
    for owner, count in (("a", 3), ("b", 2), ("c", 1)):
        for i in range(count):
            share.run(owner, str, f"{owner}{i}")
    while workers.running:
        workers.finish_first()
    assert workers.started == ["a0", "b0", "c0", "a1", "b1", "a2"]


def test_results_and_failures_reach_their_callers_and_free_the_slot():
    workers = Workers()
    share = FairShare(workers.run, slots=1)
    first, second = share.run("a", str, "one"), share.run("a", str, "two")
    workers.running.pop(0).errback(ValueError("bcrypt failed"))
    failures: list = []
    first.addErrback(failures.append)
    assert failures and failures[0].check(ValueError)
    assert workers.started == ["one", "two"]
    workers.finish_first("hashed")
    assert second.result == "hashed"


def test_at_least_one_slot():
    with pytest.raises(ValueError):
        FairShare(defer.maybeDeferred, slots=0)


@pytest.mark.parametrize("slots", [1, 3])
def test_the_password_hasher_runs_no_more_than_its_slots_and_takes_turns_by_address(slots):
    started: list[bytes] = []
    running: list[defer.Deferred] = []

    def run_blocking(fn, password, hashed) -> defer.Deferred:
        started.append(password)
        running.append(defer.Deferred())
        return running[-1]

    hasher = PasswordHasher(4, run_blocking, slots)
    checks = [
        defer.ensureDeferred(hasher.verify(f"attacker-{i}", None, "203.0.113.9")) for i in range(slots + 5)
    ] + [defer.ensureDeferred(hasher.verify("honest", None, "198.51.100.7"))]
    assert len(running) == slots
    running.pop(0).callback(False)
    assert started[-1] == b"honest" and len(running) == slots
    assert checks[0].called
