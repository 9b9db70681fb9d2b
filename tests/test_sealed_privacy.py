"""For a sealed message, no byte of its sender's id, username or identity keys is anywhere the
server keeps it: the recipient's stored envelope, SQL, Redis, or the log (as JSON lines).

The messages are real: sealed by the reference client's code with a certificate the server
issued to the sender, and sent over a connection that never authenticated.
"""

from __future__ import annotations

import json
import random
import uuid

import pytest_twisted
from twisted.logger import globalLogPublisher

from construct.client import account
from construct.client.crypto import b64decode, verify_key_bundle
from construct.logs import _json_line, redact_event
from tests.helpers import PASSWORD, MemoryClient
from tests.privacy_scan import redis_client, redis_dump, redis_entries_mentioning, sql_rows_mentioning
from tests.test_client_account import NOW

# The sender's own account: these rows are about the sender, not about any message.
ACCOUNT_TABLES = {"users", "sessions", "key_bundles", "one_time_prekeys", "unidentified_access"}


async def _registered(core, name: str, access: bool) -> tuple[dict, MemoryClient]:
    state = account.new_state("memory", NOW)
    client = MemoryClient(core, address="203.0.113.9")
    payload = {"username": name, "password": PASSWORD, "publicKey": account.registration_bundle(state)}
    if access:
        payload["unidentifiedAccessKey"] = state["accessKey"]
    reply = await client.request("register", payload)
    assert reply["type"] == "registerSuccess", reply
    account.set_account(state, reply["payload"])
    return state, client


def _forms(user_id: str, username: str, state: dict) -> list[str]:
    """Every form the sender's id, name and keys could be written in."""
    keys = account.identity(state)
    forms = [user_id, user_id.replace("-", ""), uuid.UUID(user_id).bytes.hex(), username]
    for key in (keys.master_public, keys.dh_public):
        forms += [account.b64encode(key), key.hex()]
    return forms


@pytest_twisted.ensureDeferred
async def test_a_sealed_message_leaves_no_trace_of_its_sender(core_factory, backend, tmp_path, request, redis_prefix):
    """Eight sealed messages of various sizes from one sender: the server keeps the recipient's id
    and each ciphertext, and not one form of the sender's id, name or keys outside the sender's
    own account records, nor anything pairing the two."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        # As the server writes it: through the privacy filter, as a JSON line.
        written = dict(event)
        redact_event(written, False)
        lines.append(_json_line(written))

    globalLogPublisher.addObserver(observe)
    try:
        core = await core_factory()
        tag = uuid.uuid4().hex[:8]
        alice_name, bob_name = f"alice-{tag}", f"bob-{tag}"
        alice, alice_client = await _registered(core, alice_name, access=False)
        bob, _ = await _registered(core, bob_name, access=True)
        alice_id, bob_id = alice["account"]["userId"], bob["account"]["userId"]
        certificate = await alice_client.request("getSenderCertificate")
        account.set_certificate(alice, certificate["payload"])
        bob_bundle = account.PeerBundle(
            bob_name, verify_key_bundle(account.signed_prekey_to_publish(bob, NOW), bob_id), None, bob["accessKey"]
        )
        anonymous = MemoryClient(core, address="198.51.100.20")
        rng = random.Random(17)
        sent = {}
        for size in (1, 200, 255, 256, 1000, 5000, 20000, 32767):
            text = "".join(rng.choice("abcdefghij ") for _ in range(size))
            entry = account.queue_outgoing(alice, bob_name, text, NOW)
            account.resolve_outgoing(alice, entry["id"], bob_id)
            account.encrypt_outgoing(alice, entry["id"], bob_bundle, NOW)
            content = account.seal_outgoing(alice, entry["id"], NOW)
            ack = await anonymous.request(
                "sendSealed", {"id": entry["id"], "to": bob_id, "content": content, "accessKey": bob["accessKey"]}
            )
            assert ack["type"] == "ack", ack
            sent[entry["id"]] = content
        needles = _forms(alice_id, alice_name, alice)

        stored = await core.messaging.pending(bob_id, 100)
        assert {entry.message_id for entry in stored} == set(sent)
        for entry in stored:
            envelope = json.loads(entry.envelope)
            assert envelope == {"id": entry.message_id, "to": bob_id, "sealed": True,
                                "content": sent[entry.message_id], "acceptedAt": int(NOW)}
            assert not any(needle.lower() in entry.envelope.lower() for needle in needles)
            # The size the server sees: the padded bucket, sealed.
            assert len(b64decode(envelope["content"])) > 256

        database = (str(tmp_path / "construct.sqlite3") if backend == "sqlite"
                    else request.getfixturevalue("postgres_url"))
        rows = sql_rows_mentioning(database, *needles)
        assert rows and {table for table, _ in rows} <= ACCOUNT_TABLES, rows
        assert not [row for _, row in rows if bob_id in str(row)], rows
        if backend != "redis":
            inbox = sql_rows_mentioning(database, bob_id)
            assert len([row for table, row in inbox if table == "inbox"]) == len(sent)
            # The duplicate-send records keep a digest in place of a sender.
            digests = [row[2] for table, row in inbox if table == "sent_messages"]
            assert len(digests) == len(sent) and all(len(d) == 32 and int(d, 16) >= 0 for d in digests)
        else:
            redis = await redis_client()
            try:
                dump = await redis_dump(redis, redis_prefix)
            finally:
                await redis.stop()
            mentioning = redis_entries_mentioning(dump, *needles)
            assert all(f"{{{alice_id}}}" in key for key in mentioning), mentioning
            assert not redis_entries_mentioning(mentioning, bob_id), mentioning
            assert redis_entries_mentioning(dump, bob_id)
    finally:
        globalLogPublisher.removeObserver(observe)
    log = "".join(lines)
    assert not [needle for needle in needles if needle.lower() in log.lower()], log
