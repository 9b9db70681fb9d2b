"""The client's state store: transactions on a thread, shared safely by several processes."""

from __future__ import annotations

import multiprocessing
from functools import partial

import pytest
import pytest_twisted
from nacl.pwhash import argon2id
from twisted.internet import defer

from construct.client import state as state_module
from construct.client.crypto import b64encode
from construct.client.state import KdfParams, WrongPassphrase, load_state, load_state_with_key, save_state
from construct.client.store import StateExists, StateStore

FAST = KdfParams(argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN)


def _count_derivations(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = state_module._derive_key

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(state_module, "_derive_key", counting)
    return calls


def test_keyed_saves_reuse_the_salt_and_skip_argon2id(tmp_path, monkeypatch):
    """load_state_with_key returns a key that later loads of the same file reuse without Argon2id."""
    path = tmp_path / "state.json"
    save_state(path, "pw", {"n": 1}, kdf=FAST)
    data, key = load_state_with_key(path, "pw")
    calls = _count_derivations(monkeypatch)
    state_module.save_state_with_key(path, key, {"n": 2})
    assert load_state_with_key(path, "pw", key)[0] == {"n": 2}
    assert calls == []
    assert load_state(path, "pw") == {"n": 2} and calls == [1]
    with pytest.raises(WrongPassphrase):
        load_state_with_key(path, "wrong")


@pytest_twisted.ensureDeferred
async def test_update_saves_and_a_failing_update_changes_nothing(tmp_path):
    """update() saves what the function did; when it raises, neither the file nor memory changes."""
    path = tmp_path / "state.json"
    store = StateStore(str(path), "pw", FAST)
    await store.create({"items": []})
    with pytest.raises(StateExists):
        await store.create({"items": []})
    assert await store.update(lambda data: data["items"].append(1) or len(data["items"])) == 1

    def broken(data):
        data["items"].append(2)
        raise ValueError("no")

    with pytest.raises(ValueError):
        await store.update(broken)
    assert await store.read(lambda data: data["items"]) == [1]
    assert load_state(path, "pw") == {"items": [1]}


@pytest_twisted.ensureDeferred
async def test_history_rows_are_written_with_their_change_and_never_without_it(tmp_path):
    """What a transaction adds to the history file is there once it returns, nothing of it when it
    raises, and the file keeps no readable text; a second process's store sees it."""
    path = tmp_path / "state.json"
    store = StateStore(str(path), "pw", FAST)
    await store.create({"historyKey": b64encode(bytes(range(32))), "keepMessages": 10, "n": 0})

    def received(data, history, text, fail=False):
        history.mark_seen(text)
        history.add_message({"id": text, "direction": "in", "peer": "p", "text": f"the text {text}"})
        data["n"] += 1
        if fail:
            raise ValueError("no")

    await store.transact(partial(received, text="first-message-id"))
    with pytest.raises(ValueError):
        await store.transact(partial(received, text="two", fail=True))
    other = StateStore(str(path), "pw", FAST)
    seen = await other.transact(lambda data, history: (history.seen("first-message-id"), history.seen("two")), save=False)
    assert seen == (True, False)
    assert [m["text"] for m in await other.transact(lambda data, history: history.messages(), save=False)] == [
        "the text first-message-id"
    ]
    assert await other.read(lambda data: data["n"]) == 1
    stored = b"".join(file.read_bytes() for file in tmp_path.glob("state.json.history*"))
    assert b"first-message-id" not in stored and b"the text" not in stored and len(stored) > 0
    for each in (store, other):
        await each.close()


@pytest_twisted.ensureDeferred
async def test_a_copy_is_sealed_under_the_same_passphrase_and_never_overwrites(tmp_path):
    """write_copy (construct-chat export) writes a new state file the same passphrase opens, and
    refuses a path where a state file or a history file already is."""
    store = StateStore(str(tmp_path / "state.json"), "pw", FAST)
    await store.create({"n": 1})
    await store.read(lambda data: data["n"])
    copy = tmp_path / "copy.json"
    await store.write_copy(str(copy), {"n": 1, "history": []})
    assert load_state(copy, "pw") == {"n": 1, "history": []}
    (tmp_path / "other.json.history").write_bytes(b"")
    for taken in (copy, tmp_path / "other.json"):
        with pytest.raises(StateExists):
            await store.write_copy(str(taken), {"n": 2})
    assert load_state(copy, "pw") == {"n": 1, "history": []} and not (tmp_path / "other.json").exists()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_file_see_each_others_changes(tmp_path):
    """A second store (another process, in real life) reloads what the first saved, and the reverse."""
    path = str(tmp_path / "state.json")
    first, second = StateStore(path, "pw", FAST), StateStore(path, "pw", FAST)
    await first.create({"items": []})
    await second.update(lambda data: data["items"].append("second"))
    await first.update(lambda data: data["items"].append("first"))
    assert await second.read(lambda data: data["items"]) == ["second", "first"]
    # Concurrent updates in one process are serialised too.
    await defer.gatherResults(
        [defer.ensureDeferred(first.update(lambda data, i=i: data["items"].append(i))) for i in range(10)]
    )
    assert len(await second.read(lambda data: data["items"])) == 12


def _append_in_child(path: str, count: int) -> None:
    from twisted.internet import reactor

    store = StateStore(path, "pw", FAST)

    async def run():
        for i in range(count):
            await store.update(lambda data, i=i: data["items"].append(i))

    defer.ensureDeferred(run()).addBoth(lambda _: reactor.stop())
    reactor.run()


def test_processes_do_not_lose_each_others_updates(tmp_path):
    """Two processes appending to one state file at the same time lose nothing (the file lock)."""
    path = str(tmp_path / "state.json")
    save_state(path, "pw", {"items": []}, kdf=FAST)
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_append_in_child, args=(path, 20)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert len(load_state(path, "pw")["items"]) == 40
