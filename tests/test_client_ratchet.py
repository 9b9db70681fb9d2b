"""Tests for construct.client.x3dh and construct.client.ratchet."""

import base64
import json
import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from construct.client import x3dh
from construct.client.crypto import (
    MAX_PLAINTEXT,
    CryptoError,
    DecryptionError,
    IdentityKeys,
    InvalidBundle,
    MessageTooLarge,
    OneTimePrekey,
    ReplayError,
    SignedPrekey,
    TooManySkipped,
    VerifiedBundle,
    envelope_context,
    generate_one_time_prekeys,
    make_key_bundle,
    verify_key_bundle,
)
from construct.client.ratchet import (
    MAX_SKIP,
    MAX_SKIPPED_TOTAL,
    VERSION_INITIAL,
    VERSION_NORMAL,
    Session,
    is_ratchet_content,
)

ALICE_ID = "11111111-2222-4333-8444-555555555555"
BOB_ID = "99999999-8888-4777-8666-555555555555"
LOW_ORDER_POINT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


@dataclass
class Party:
    user_id: str
    identity: IdentityKeys = field(default_factory=IdentityKeys.generate)
    signed_prekeys: dict[int, SignedPrekey] = field(default_factory=dict)
    one_time_prekeys: dict[int, OneTimePrekey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spk = SignedPrekey.generate()
        self.signed_prekeys[spk.key_id] = spk
        keys, self.upload = generate_one_time_prekeys(1, 5)
        self.one_time_prekeys.update({key.key_id: key for key in keys})
        bundle = make_key_bundle(self.identity, spk, self.user_id)
        self.bundle = verify_key_bundle(bundle, self.user_id)


@dataclass(frozen=True)
class Wire:
    """A ChatMessage as the server relays it (only the fields the crypto uses)."""

    sender: str
    recipient: str
    message_id: str
    ratchet_public: bytes
    number: int
    content: str

    @property
    def context(self) -> bytes:
        return envelope_context(self.sender, self.recipient, self.message_id)


_counter = iter(range(10**9))


def send(session: Session, sender: str, recipient: str, plaintext: bytes) -> Wire:
    message_id = f"m{next(_counter)}"
    ratchet_public, number, content = session.encrypt(
        plaintext, envelope_context(sender, recipient, message_id)
    )
    return Wire(sender, recipient, message_id, ratchet_public, number, content)


def receive(session: Session, wire: Wire) -> bytes:
    return session.decrypt(wire.ratchet_public, wire.number, wire.content, wire.context)


def accept(bob: Party, wire: Wire) -> tuple[Session, bytes]:
    """Bob's handling of a first message: build the session, burn the OPK."""
    session, plaintext, opk_id = Session.from_initial(
        bob.identity, bob.signed_prekeys, bob.one_time_prekeys,
        wire.ratchet_public, wire.number, wire.content, wire.context,
    )
    if opk_id is not None:
        del bob.one_time_prekeys[opk_id]
    return session, plaintext


def version(wire: Wire) -> int:
    return base64.b64decode(wire.content)[0]


def pair(use_opk: bool = True) -> tuple[Party, Party, Session, Session]:
    """Alice and Bob with an established session (one message exchanged)."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    a = Session.initiate(alice.identity, bob.bundle, bob.upload[0] if use_opk else None)
    b, plaintext = accept(bob, send(a, ALICE_ID, BOB_ID, b"hello bob"))
    assert plaintext == b"hello bob"
    return alice, bob, a, b


def snapshot(session: Session) -> str:
    return json.dumps(session.to_dict(), sort_keys=True)


# -- X3DH ----------------------------------------------------------------------


@pytest.mark.parametrize("use_opk", [True, False])
def test_x3dh_agrees(use_opk):
    """Initiator and responder derive the same secret and AD, with and without an OPK."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    opk = bob.upload[2] if use_opk else None
    secret, ad, header = x3dh.initiate(alice.identity, bob.bundle, opk)
    header = x3dh.InitialHeader.from_bytes(header.to_bytes())
    assert header.one_time_prekey_id == (3 if use_opk else None)
    responded = x3dh.respond(bob.identity, bob.signed_prekeys, bob.one_time_prekeys, header)
    assert responded == (secret, ad, header.one_time_prekey_id)
    assert len(secret) == 32
    assert ad == (alice.identity.dh_public + bob.identity.dh_public
                  + alice.identity.master_public + bob.identity.master_public)


def test_x3dh_opk_changes_secret():
    """The one-time prekey contributes DH4: the secret differs when it is left out."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    _, _, header = x3dh.initiate(alice.identity, bob.bundle, bob.upload[0])
    with_opk = x3dh.respond(bob.identity, bob.signed_prekeys, bob.one_time_prekeys, header)[0]
    without = x3dh.InitialHeader(header.identity_key, header.master_key, header.ephemeral_key,
                                 header.signed_prekey_id, None)
    assert x3dh.respond(bob.identity, bob.signed_prekeys, {}, without)[0] != with_opk


def test_x3dh_opk_reuse_rejected():
    """A second initial message naming an already-used one-time prekey raises ReplayError."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    a = Session.initiate(alice.identity, bob.bundle, bob.upload[0])
    first = send(a, ALICE_ID, BOB_ID, b"one")
    accept(bob, first)
    assert 1 not in bob.one_time_prekeys
    with pytest.raises(ReplayError):
        accept(bob, first)
    other = Session.initiate(Party(ALICE_ID).identity, bob.bundle, bob.upload[0])
    with pytest.raises(ReplayError):
        accept(bob, send(other, ALICE_ID, BOB_ID, b"reuse"))


def test_x3dh_unknown_signed_prekey_rejected():
    """A header naming a signed prekey the responder does not hold fails."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    _, _, header = x3dh.initiate(alice.identity, bob.bundle, None)
    with pytest.raises(DecryptionError):
        x3dh.respond(bob.identity, {}, bob.one_time_prekeys, header)


def test_x3dh_rejects_low_order_remote_keys():
    """A bundle or one-time prekey with a low-order point raises InvalidBundle."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    bad = VerifiedBundle(BOB_ID, "2026-01-02T10:00:00Z", bob.bundle.master_key,
                         bob.bundle.identity_key, LOW_ORDER_POINT)
    with pytest.raises(InvalidBundle):
        x3dh.initiate(alice.identity, bad, None)
    with pytest.raises(InvalidBundle):
        x3dh.initiate(alice.identity, bob.bundle,
                      {"keyId": 1, "publicKey": base64.b64encode(LOW_ORDER_POINT).decode()})


def test_failed_first_message_does_not_burn_opk():
    """A tampered initial message fails without consuming Bob's one-time prekey."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    a = Session.initiate(alice.identity, bob.bundle, bob.upload[0])
    wire = send(a, ALICE_ID, BOB_ID, b"hi")
    with pytest.raises(DecryptionError):
        accept(bob, replace(wire, message_id="forged-id"))
    assert 1 in bob.one_time_prekeys
    assert accept(bob, wire)[1] == b"hi"


# -- session set-up ------------------------------------------------------------


def test_initial_header_sent_until_reply():
    """Alice sends 0x20 messages until she has decrypted Bob's reply, then 0x21."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    a = Session.initiate(alice.identity, bob.bundle, bob.upload[0])
    first, second = send(a, ALICE_ID, BOB_ID, b"1"), send(a, ALICE_ID, BOB_ID, b"2")
    assert version(first) == version(second) == VERSION_INITIAL
    b, _ = accept(bob, second)
    assert b.knows_initial(first.content)
    assert receive(b, first) == b"1"
    reply = send(b, BOB_ID, ALICE_ID, b"3")
    assert version(reply) == VERSION_NORMAL
    assert receive(a, reply) == b"3"
    assert version(send(a, ALICE_ID, BOB_ID, b"4")) == VERSION_NORMAL
    assert b.remote_master_key == alice.identity.master_public
    assert b.remote_identity_key == alice.identity.dh_public
    assert a.remote_master_key == bob.identity.master_public


def test_initial_message_of_other_session_is_not_known():
    """A 0x20 message from a fresh session of the same peer is not taken for the old one."""
    alice, bob, a, b = pair()
    fresh = Session.initiate(alice.identity, bob.bundle, None)
    wire = send(fresh, ALICE_ID, BOB_ID, b"after reinstall")
    assert not b.knows_initial(wire.content)
    with pytest.raises(DecryptionError):
        receive(b, wire)
    assert accept(bob, wire)[1] == b"after reinstall"


def test_from_initial_rejects_normal_message():
    """from_initial refuses a 0x21 message."""
    alice, bob, a, b = pair()
    wire = send(b, BOB_ID, ALICE_ID, b"x")
    with pytest.raises(DecryptionError):
        Session.from_initial(alice.identity, alice.signed_prekeys, alice.one_time_prekeys,
                             wire.ratchet_public, wire.number, wire.content, wire.context)


def test_is_ratchet_content():
    """Ratchet contents are recognised by their version byte; garbage is not."""
    alice, bob, a, b = pair()
    assert is_ratchet_content(send(a, ALICE_ID, BOB_ID, b"x").content)
    assert is_ratchet_content(send(b, BOB_ID, ALICE_ID, b"x").content)
    # The retired 0x10/0x11 versions (derived nonce) are neither produced nor accepted.
    for content in ("", "!!", base64.b64encode(b"\x12" + bytes(400)).decode(),
                    base64.b64encode(b"\x21" + bytes(10)).decode(),
                    base64.b64encode(b"\x11" + bytes(400)).decode(),
                    base64.b64encode(b"\x10" + bytes(600)).decode()):
        assert not is_ratchet_content(content)


def test_contents_carry_a_random_24_byte_nonce():
    """Version, header, a 24-byte nonce, ciphertext and tag: 29 + bucket bytes, 133 + bucket initially."""
    _, _, a, b = pair()
    initial = base64.b64decode(send(a, ALICE_ID, BOB_ID, b"x").content)
    normal = base64.b64decode(send(b, BOB_ID, ALICE_ID, b"x").content)
    assert (initial[0], len(initial)) == (0x20, 1 + 4 + 104 + 24 + 256 + 16)
    assert (normal[0], len(normal)) == (0x21, 1 + 4 + 24 + 256 + 16)
    nonces = {base64.b64decode(send(b, BOB_ID, ALICE_ID, b"x").content)[5:29] for _ in range(20)}
    assert len(nonces) == 20


def test_a_restored_state_never_reuses_a_key_and_nonce():
    """Sending again from an old copy of the state reuses a message key, never its nonce: the XOR
    of the two ciphertexts is not the XOR of the plaintexts, and the receiver reads the first."""
    _, _, a, b = pair()
    receive(a, send(b, BOB_ID, ALICE_ID, b"reply"))
    backup = a.to_dict()
    first = send(a, ALICE_ID, BOB_ID, b"attack at dawn!!")
    restored = Session.from_dict(backup)
    second = send(restored, ALICE_ID, BOB_ID, b"retreat at nine!")
    assert (first.ratchet_public, first.number) == (second.ratchet_public, second.number)
    raw_first, raw_second = base64.b64decode(first.content), base64.b64decode(second.content)
    assert raw_first[5:29] != raw_second[5:29]
    xor = bytes(x ^ y for x, y in zip(raw_first[29:45], raw_second[29:45]))
    assert xor != bytes(x ^ y for x, y in zip(b"attack at dawn!!", b"retreat at nine!"))
    assert receive(b, first) == b"attack at dawn!!"
    with pytest.raises(ReplayError):
        receive(b, second)


# -- conversations ---------------------------------------------------------------


def test_alternating_conversation_200_turns():
    """200 alternating messages each decrypt on the other side (a DH step every turn)."""
    _, _, a, b = pair()
    for turn in range(200):
        sender, receiver = (a, b) if turn % 2 else (b, a)
        wire = send(sender, "s", "r", f"turn {turn}".encode())
        assert receive(receiver, wire) == f"turn {turn}".encode()


def test_bursty_conversation():
    """Bursts of 1-20 messages per side, 60 rounds, all decrypt in order."""
    rng = random.Random(7)
    _, _, a, b = pair(use_opk=False)
    for burst in range(60):
        sender, receiver = (a, b) if burst % 2 else (b, a)
        wires = [send(sender, "s", "r", f"{burst}/{i}".encode()) for i in range(rng.randint(1, 20))]
        for i, wire in enumerate(wires):
            assert receive(receiver, wire) == f"{burst}/{i}".encode()


def test_out_of_order_within_chain():
    """Messages of one chain decrypt in any order."""
    _, _, a, b = pair()
    wires = [send(a, "s", "r", bytes([i])) for i in range(6)]
    for i in (4, 0, 5, 2, 1, 3):
        assert receive(b, wires[i]) == bytes([i])


def test_out_of_order_across_dh_step():
    """A late message of an older chain decrypts after the next chain started."""
    _, _, a, b = pair()
    a1, a2 = send(a, "s", "r", b"a1"), send(a, "s", "r", b"a2")
    assert receive(b, a1) == b"a1"
    assert receive(a, send(b, "s", "r", b"b1")) == b"b1"
    a3 = send(a, "s", "r", b"a3")  # new chain, PN = 3
    assert a3.ratchet_public != a2.ratchet_public
    assert receive(b, a3) == b"a3"
    assert receive(b, a2) == b"a2"


def test_lost_messages_do_not_block():
    """Messages never delivered do not stop later ones, on either side."""
    _, _, a, b = pair()
    wires = [send(a, "s", "r", bytes([i])) for i in range(10)]
    assert receive(b, wires[3]) == bytes([3])
    assert receive(b, wires[9]) == bytes([9])
    lost_reply = send(b, "s", "r", b"lost")
    assert lost_reply.number == 0
    reply = send(b, "s", "r", b"kept")
    assert receive(a, reply) == b"kept"
    assert receive(b, send(a, "s", "r", b"next")) == b"next"


def test_replay_rejected_and_state_usable():
    """Decrypting a message twice fails (current chain: ReplayError) and the session goes on."""
    _, _, a, b = pair()
    w0, w1, w2 = (send(a, "s", "r", bytes([i])) for i in range(3))
    receive(b, w1)
    receive(b, w0)  # from the skipped store
    with pytest.raises(ReplayError):
        receive(b, w1)
    with pytest.raises(ReplayError):
        receive(b, w0)
    assert receive(b, w2) == b"\x02"
    receive(a, send(b, "s", "r", b"r"))
    receive(b, send(a, "s", "r", b"new chain"))
    with pytest.raises((ReplayError, DecryptionError)):
        receive(b, w2)  # an older chain
    assert receive(a, send(b, "s", "r", b"still fine")) == b"still fine"


def flip(data: bytes, index: int, bit: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[index] ^= bit
    return bytes(changed)


def _tampered_wires(wire: Wire):
    """Every single-field corruption of ``wire`` an attacker (or the server) could make."""
    raw = base64.b64decode(wire.content)
    for index in range(len(raw)):
        for bit in (0x01, 0x80):
            yield replace(wire, content=base64.b64encode(flip(raw, index, bit)).decode())
    yield replace(wire, content=base64.b64encode(raw[:-1]).decode())
    yield replace(wire, content=base64.b64encode(raw + b"\x00").decode())
    yield replace(wire, ratchet_public=flip(wire.ratchet_public, 0))
    yield replace(wire, ratchet_public=flip(wire.ratchet_public, 31))
    yield replace(wire, ratchet_public=LOW_ORDER_POINT)
    yield replace(wire, number=wire.number + 1)
    yield replace(wire, number=wire.number + 2**31)
    yield replace(wire, sender=wire.recipient, recipient=wire.sender)
    yield replace(wire, message_id=wire.message_id + "x")


@pytest.mark.parametrize("initial", [True, False])
def test_tamper_on_every_field_rejected(initial):
    """Any tampered content bit, ratchet key, number or envelope fails and changes nothing."""
    _, _, a, b = pair()
    if initial:
        wire = send(a, "s", "r", b"secret")  # still a 0x20 message
        receiver = b
    else:
        receive(a, send(b, "s", "r", b"reply"))
        wire = send(a, "s", "r", b"secret")
        receiver = b
    assert version(wire) == (VERSION_INITIAL if initial else VERSION_NORMAL)
    before = snapshot(receiver)
    for bad in _tampered_wires(wire):
        with pytest.raises((DecryptionError, TooManySkipped)):
            receive(receiver, bad)
        assert snapshot(receiver) == before
    assert receive(receiver, wire) == b"secret"


def test_tampered_first_message_rejected():
    """Every bit flip in a first (0x20) message makes from_initial fail."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    a = Session.initiate(alice.identity, bob.bundle, bob.upload[0])
    wire = send(a, ALICE_ID, BOB_ID, b"first")
    for bad in _tampered_wires(wire):
        with pytest.raises(CryptoError):
            accept(bob, bad)
    assert accept(bob, wire)[1] == b"first"


def test_max_skip_exceeded_leaves_state_usable():
    """A gap over MAX_SKIP raises TooManySkipped, changes nothing, and later messages still work."""
    _, _, a, b = pair()
    wires = [send(a, "s", "r", str(i).encode()) for i in range(MAX_SKIP + 2)]
    before = snapshot(b)
    with pytest.raises(TooManySkipped):
        receive(b, wires[MAX_SKIP + 1])
    assert snapshot(b) == before
    assert receive(b, wires[MAX_SKIP]) == str(MAX_SKIP).encode()  # exactly MAX_SKIP ahead is fine
    assert receive(b, wires[MAX_SKIP + 1]) == str(MAX_SKIP + 1).encode()
    assert receive(b, wires[5]) == b"5"


def test_skipped_store_is_bounded():
    """The store of skipped keys never exceeds MAX_SKIPPED_TOTAL; the oldest are evicted."""
    _, _, a, b = pair()
    oldest = None
    newest = None
    for _ in range(3):
        wires = [send(a, "s", "r", str(i).encode()) for i in range(MAX_SKIP)]
        oldest = oldest or wires[0]
        newest = wires[-2]
        receive(b, wires[-1])
        receive(a, send(b, "s", "r", b"turn"))
        assert len(b.to_dict()["skipped"]) <= MAX_SKIPPED_TOTAL
    assert len(b.to_dict()["skipped"]) == MAX_SKIPPED_TOTAL
    with pytest.raises(DecryptionError):
        receive(b, oldest)
    assert receive(b, newest) == str(MAX_SKIP - 2).encode()


def test_too_large_plaintext_leaves_session_unchanged():
    """encrypt raises MessageTooLarge without advancing the chain."""
    _, _, a, b = pair()
    before = snapshot(a)
    with pytest.raises(MessageTooLarge):
        a.encrypt(b"x" * (MAX_PLAINTEXT + 1))
    assert snapshot(a) == before
    assert receive(b, send(a, "s", "r", b"x" * MAX_PLAINTEXT)) == b"x" * MAX_PLAINTEXT


def test_content_is_padded():
    """Short and long plaintexts of one bucket give contents of the same length."""
    _, _, a, _ = pair()
    assert len(send(a, "s", "r", b"").content) == len(send(a, "s", "r", b"y" * 255).content)


def test_serialisation_round_trip_mid_conversation():
    """Sessions restored from JSON continue, including pending skipped keys."""
    _, _, a, b = pair()
    receive(a, send(b, "s", "r", b"r1"))
    pending = [send(a, "s", "r", bytes([i])) for i in range(4)]
    receive(b, pending[3])
    a = Session.from_dict(json.loads(json.dumps(a.to_dict())))
    b = Session.from_dict(json.loads(json.dumps(b.to_dict())))
    assert snapshot(Session.from_dict(b.to_dict())) == snapshot(b)
    assert receive(b, pending[1]) == b"\x01"
    with pytest.raises(ReplayError):
        receive(b, pending[3])
    assert receive(a, send(b, "s", "r", b"r2")) == b"r2"
    assert receive(b, send(a, "s", "r", b"a2")) == b"a2"
    assert receive(b, pending[0]) == b"\x00"


def test_from_dict_rejects_malformed_state():
    """A damaged session dict raises CryptoError, not a random exception."""
    _, _, a, _ = pair()
    good = a.to_dict()
    for bad in ({}, dict(good, version=2), dict(good, ns=-1), dict(good, rootKey="x"),
                dict(good, skipped=[["a"]]), dict(good, sendInitial="yes"), dict(good, dhr=5)):
        with pytest.raises(CryptoError):
            Session.from_dict(bad)


# -- property ------------------------------------------------------------------------

# Weighted so that most runs hold long conversations in both directions.
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["send_a"] * 3 + ["send_b"] * 4 + ["deliver"] * 6 + ["drop", "replay", "persist"]
        ),
        st.integers(0, 10_000),
    ),
    min_size=40,
    max_size=160,
)


@settings(max_examples=50, deadline=None)
@given(use_opk=st.booleans(), ops=OPS)
def test_random_interleavings_deliver_exactly_once(use_opk, ops):
    """Random sends, reorders, drops and replays: each delivered message decrypts exactly once."""
    alice, bob = Party(ALICE_ID), Party(BOB_ID)
    sessions: dict[str, Session | None] = {
        ALICE_ID: Session.initiate(alice.identity, bob.bundle, bob.upload[0] if use_opk else None),
        BOB_ID: None,
    }
    in_flight: list[tuple[Wire, bytes]] = []
    delivered: list[Wire] = []

    def deliver(wire: Wire) -> bytes:
        session = sessions[wire.recipient]
        if wire.recipient == BOB_ID and version(wire) == VERSION_INITIAL and (
            session is None or not session.knows_initial(wire.content)
        ):
            sessions[BOB_ID], plaintext = accept(bob, wire)
            return plaintext
        assert session is not None
        return receive(session, wire)

    for op, pick in ops:
        if op in ("send_a", "send_b"):
            sender, recipient = (ALICE_ID, BOB_ID) if op == "send_a" else (BOB_ID, ALICE_ID)
            session = sessions[sender]
            if session is not None:
                plaintext = f"{sender[:1]}{len(in_flight) + len(delivered)}:{pick}".encode()
                in_flight.append((send(session, sender, recipient, plaintext), plaintext))
        elif op in ("deliver", "drop") and in_flight:
            wire, plaintext = in_flight.pop(pick % len(in_flight))
            if op == "deliver":
                assert deliver(wire) == plaintext
                delivered.append(wire)
        elif op == "replay" and delivered:
            with pytest.raises((ReplayError, DecryptionError)):
                deliver(delivered[pick % len(delivered)])
        elif op == "persist":
            sessions = {
                user: None if s is None else Session.from_dict(json.loads(json.dumps(s.to_dict())))
                for user, s in sessions.items()
            }
    for wire, plaintext in in_flight:
        assert deliver(wire) == plaintext
