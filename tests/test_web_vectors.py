"""The formats both clients share (tests/vectors/formats.json) hold for the Python client, and the
web client's own tests (`node --test webclient/test/`) replay them and ratchet.json in JavaScript.

Running the node tests from here makes `pytest` the one command that checks both sides.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import partial

import pytest
import pytest_twisted

from construct.client import account
from construct.client.crypto import InvalidBundle, verify_key_bundle
from construct.client.state import load_state
from construct.client.store import StateStore
from tests.processes import REPO
from tests.vectors import generate, generate_formats

VECTORS = json.loads(generate_formats.PATH.read_text())
RATCHET = json.loads(generate.PATH.read_text())


def test_the_formats_file_is_what_the_generator_writes():
    """Regenerate with `python -m tests.vectors.generate_formats` after a deliberate format change."""
    assert generate_formats.build() == VECTORS


@pytest_twisted.ensureDeferred
async def test_the_key_file_vector_is_what_construct_chat_exports_and_it_reads_on(tmp_path):
    """construct-chat opens the key file the web client's tests import (its messages move into the
    history file), exports the same document again, and reads the next message of ratchet.json's
    conversation with the session it holds (from the key it skipped)."""
    vector = VECTORS["keyFile"]
    path = tmp_path / "alice.json"
    path.write_text(json.dumps(vector["document"]))
    store = StateStore(str(path), vector["passphrase"])
    await store.transact(account.upgrade)
    assert "history" not in load_state(path, vector["passphrase"])
    assert await store.transact(account.key_file, save=False) == vector["data"]
    message = next(m for m in RATCHET["messages"] if m["plaintext"] == "Two messages,")
    wire = {key: message[key] for key in ("id", "ephemeralPublicKey", "messageNumber", "content", "timestamp")}
    wire.update({"from": RATCHET["parties"]["bob"]["userId"], "to": RATCHET["parties"]["alice"]["userId"]})
    now = RATCHET["timeline"][-1]["now"]
    outcome = await store.transact(partial(account.accept_incoming, message=wire, sender=None, now=now))
    assert (outcome.status, outcome.entry["text"]) == ("received", "Two messages,")
    await store.close()


def test_the_state_file_vector_is_a_construct_chat_state_file(tmp_path):
    """construct-chat opens the state file the web client's format tests seal byte for byte."""
    vector = VECTORS["stateFile"]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(vector["document"]))
    assert load_state(path, vector["passphrase"]) == vector["data"]


@pytest.mark.parametrize("case", VECTORS["bundles"]["rejected"], ids=lambda case: case["name"])
def test_the_rejected_bundles_are_rejected(case):
    """Every bundle the web client must refuse, construct-chat refuses too."""
    with pytest.raises(InvalidBundle):
        verify_key_bundle(case["bundle"], expected_user_id=VECTORS["bundles"]["userId"])


def test_the_web_client_passes_its_node_tests():
    """The JavaScript crypto, formats and client logic, against the same vectors (Node 20 or newer)."""
    node = shutil.which("node")
    assert node, "node is not installed (.ci/run installs it)"
    result = subprocess.run(
        [node, "--test", "webclient/test/"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    summary = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", result.stdout, re.MULTILINE))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert int(summary["fail"]) == 0 and int(summary["pass"]) >= 10, summary
