"""Tests for construct.client.crypto: primitives, bundles, AEAD, padding."""

import base64
import json
from datetime import datetime, timezone

import pytest
from nacl import bindings as nacl_bindings

from construct.client.crypto import (
    MAX_PLAINTEXT,
    NONCE_SIZE,
    PAD_BUCKETS,
    TAG_SIZE,
    CryptoError,
    DecryptionError,
    IdentityKeys,
    InvalidBundle,
    MessageTooLarge,
    OneTimePrekey,
    SignedPrekey,
    aead_decrypt,
    aead_encrypt,
    envelope_context,
    generate_one_time_prekeys,
    hkdf_sha256,
    make_key_bundle,
    pad,
    parse_one_time_prekey,
    safety_number,
    unpad,
    verify_key_bundle,
    x25519,
)

USER = "11111111-2222-4333-8444-555555555555"
PEER = "99999999-8888-4777-8666-555555555555"
WHEN = datetime(2026, 1, 2, 10, 0, 0, tzinfo=timezone.utc)
# A point of order 8 on Curve25519: DH with it yields all zeros.
LOW_ORDER_POINT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def signed_bundle(identity: IdentityKeys, bundle_data: object) -> dict:
    """Sign arbitrary bundleData bytes/JSON with ``identity`` (for rejection tests)."""
    raw = bundle_data if isinstance(bundle_data, bytes) else json.dumps(bundle_data).encode()
    return {
        "masterIdentityKey": b64(identity.master_public),
        "bundleData": b64(raw),
        "signature": b64(identity.sign(raw)),
    }


def non_canonical(text: str) -> str:
    """Same bytes, but with non-zero unused bits in the last base64 character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stem = text.rstrip("=")
    last = alphabet[alphabet.index(stem[-1]) + 1]
    return stem[:-1] + last + text[len(stem):]


def good_bundle_data(identity: IdentityKeys, spk: SignedPrekey, **changes: object) -> dict:
    suite = {"suiteId": 1, "identityKey": b64(identity.dh_public), "signedPrekey": b64(spk.public)}
    data = {"userId": USER, "timestamp": "2026-01-02T10:00:00Z", "supportedSuites": [suite]}
    data.update(changes)
    return data


# -- HKDF --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ikm", "salt", "info", "length", "okm"),
    [
        (
            "0b" * 22,
            "000102030405060708090a0b0c",
            "f0f1f2f3f4f5f6f7f8f9",
            42,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            bytes(range(0x00, 0x50)).hex(),
            bytes(range(0x60, 0xB0)).hex(),
            bytes(range(0xB0, 0x100)).hex(),
            82,
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
            "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
            "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (
            "0b" * 22,
            "",
            "",
            42,
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ],
    ids=["A.1", "A.2", "A.3"],
)
def test_hkdf_rfc5869_vectors(ikm, salt, info, length, okm):
    """HKDF-SHA256 reproduces the RFC 5869 appendix A SHA-256 test vectors."""
    derived = hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length)
    assert derived.hex() == okm


def test_hkdf_rejects_oversized_output():
    """HKDF-SHA256 refuses more than 255 blocks of output."""
    with pytest.raises(ValueError):
        hkdf_sha256(b"k", b"", b"", 255 * 32 + 1)


def test_x25519_rejects_low_order_point():
    """A low-order public key (all-zero DH output) is refused."""
    with pytest.raises(CryptoError):
        x25519(IdentityKeys.generate().dh_private, LOW_ORDER_POINT)
    with pytest.raises(CryptoError):
        x25519(IdentityKeys.generate().dh_private, bytes(32))


# -- keys and bundles ------------------------------------------------------


def test_identity_and_prekeys_round_trip_through_dict():
    """Identity, signed and one-time prekeys survive to_dict/from_dict via JSON."""
    identity, spk = IdentityKeys.generate(), SignedPrekey.generate()
    opk = generate_one_time_prekeys(5, 1)[0][0]
    assert IdentityKeys.from_dict(json.loads(json.dumps(identity.to_dict()))) == identity
    assert SignedPrekey.from_dict(json.loads(json.dumps(spk.to_dict()))) == spk
    assert OneTimePrekey.from_dict(json.loads(json.dumps(opk.to_dict()))) == opk
    assert identity.master_public.hex() in repr(identity)
    assert identity.signing_seed.hex() not in repr(identity)


def test_make_key_bundle_has_the_seed_layout():
    """make_key_bundle produces the seed's UploadableKeyBundle byte for byte."""
    identity, spk = IdentityKeys.generate(), SignedPrekey.generate()
    bundle = make_key_bundle(identity, spk, USER, WHEN)
    assert set(bundle) == {"masterIdentityKey", "bundleData", "signature"}
    raw = base64.b64decode(bundle["bundleData"])
    expected = (
        '{"userId":"%s","timestamp":"2026-01-02T10:00:00Z","supportedSuites":'
        '[{"suiteId":1,"identityKey":"%s","signedPrekey":"%s"}]}'
        % (USER, b64(identity.dh_public), b64(spk.public))
    )
    assert raw == expected.encode()
    assert base64.b64decode(bundle["masterIdentityKey"]) == identity.master_public
    assert len(base64.b64decode(bundle["signature"])) == 64


def test_bundle_round_trip():
    """A bundle made by make_key_bundle verifies and yields its keys."""
    identity, spk = IdentityKeys.generate(), SignedPrekey.generate()
    verified = verify_key_bundle(make_key_bundle(identity, spk, USER), expected_user_id=USER)
    assert verified.user_id == USER
    assert verified.master_key == identity.master_public
    assert verified.identity_key == identity.dh_public
    assert verified.signed_prekey == spk.public
    assert verified.signed_prekey_id == spk.key_id


def test_bundle_accepts_publickeybundle_payload_with_extra_fields():
    """Extra fields (as in a publicKeyBundle payload) are ignored."""
    identity, spk = IdentityKeys.generate(), SignedPrekey.generate()
    payload = dict(make_key_bundle(identity, spk, USER), username="bob", oneTimePrekey=None)
    assert verify_key_bundle(payload, USER).signed_prekey == spk.public


def _mutations(identity: IdentityKeys, spk: SignedPrekey):
    good = make_key_bundle(identity, spk, USER)
    other = IdentityKeys.generate()
    raw = base64.b64decode(good["bundleData"])
    signature = base64.b64decode(good["signature"])

    def signed(**changes: object) -> dict:
        return signed_bundle(identity, good_bundle_data(identity, spk, **changes))

    def with_suite(**changes: object) -> dict:
        suite = {"suiteId": 1, "identityKey": b64(identity.dh_public)}
        suite.update({"signedPrekey": b64(spk.public)}, **changes)
        return signed(supportedSuites=[{k: v for k, v in suite.items() if v is not None}])

    yield "not a dict", ["x"]
    yield "missing field", {k: v for k, v in good.items() if k != "signature"}
    yield "bad base64 key", dict(good, masterIdentityKey="!!!")
    yield "base64 with newline", dict(good, signature=good["signature"] + "\n")
    yield "non-canonical base64", dict(good, signature=non_canonical(good["signature"]))
    yield "short master key", dict(good, masterIdentityKey=b64(identity.master_public[:31]))
    yield "short signature", dict(good, signature=b64(signature[:63]))
    yield "bad bundleData base64", dict(good, bundleData="%%%")
    yield "signature by another key", dict(good, masterIdentityKey=b64(other.master_public))
    yield "flipped signature", dict(good, signature=b64(bytes([signature[0] ^ 1]) + signature[1:]))
    yield "modified bundleData", dict(good, bundleData=b64(raw + b" "))
    yield "not JSON", signed_bundle(identity, b"\xff not json")
    yield "JSON list", signed_bundle(identity, [1, 2])
    yield "suite 2", with_suite(suiteId=2)
    yield "suite true", with_suite(suiteId=True)
    yield "suite 1.0", with_suite(suiteId=1.0)
    yield "no suites", signed(supportedSuites=[])
    yield "suite not an object", signed(supportedSuites=[1])
    yield "short identity key", with_suite(identityKey=b64(bytes(31)))
    yield "missing signed prekey", with_suite(signedPrekey=None)
    yield "bad timestamp", signed(timestamp="yesterday")
    yield "impossible date", signed(timestamp="2026-02-30T10:00:00Z")
    yield "userId not a string", signed(userId=7)
    yield "userId mismatch", make_key_bundle(identity, spk, PEER)
    yield "empty userId", make_key_bundle(identity, spk, "")


def test_bundle_rejections():
    """verify_key_bundle raises InvalidBundle for every kind of bad bundle."""
    identity, spk = IdentityKeys.generate(), SignedPrekey.generate()
    for name, bundle in _mutations(identity, spk):
        with pytest.raises(InvalidBundle):
            verify_key_bundle(bundle, expected_user_id=USER)
            pytest.fail(f"accepted: {name}")


def test_bundle_without_expected_user_accepts_registration_bundle():
    """With no expected user, the empty-userId registration bundle verifies."""
    identity, spk = IdentityKeys.generate(), SignedPrekey.generate()
    assert verify_key_bundle(make_key_bundle(identity, spk)).user_id == ""


def test_one_time_prekeys_upload_form():
    """generate_one_time_prekeys returns consecutive ids and matching public upload form."""
    keys, upload = generate_one_time_prekeys(10, 3)
    assert [k.key_id for k in keys] == [10, 11, 12]
    assert upload == [{"keyId": k.key_id, "publicKey": b64(k.public)} for k in keys]
    assert parse_one_time_prekey(upload[0]) == (10, keys[0].public)
    with pytest.raises(CryptoError):
        generate_one_time_prekeys(0xFFFFFFFE, 2)
    public = upload[0]["publicKey"]
    for bad in (
        None,
        {"keyId": "1", "publicKey": public},
        {"keyId": True, "publicKey": public},
        {"keyId": 0xFFFFFFFF, "publicKey": public},
        {"keyId": 1, "publicKey": b64(bytes(31))},
    ):
        with pytest.raises(InvalidBundle):
            parse_one_time_prekey(bad)


# -- AEAD ------------------------------------------------------------------------


def test_aead_is_xchacha20_poly1305_with_a_24_byte_nonce():
    """The message AEAD takes a 24-byte nonce (room for random ones) and authenticates the AD."""
    key, nonce = bytes(range(32)), bytes(range(24))
    sealed = aead_encrypt(key, nonce, b"hello", b"ad")
    assert len(sealed) == len(b"hello") + TAG_SIZE and NONCE_SIZE == 24
    assert sealed == nacl_bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"hello", b"ad", nonce, key)
    assert aead_decrypt(key, nonce, sealed, b"ad") == b"hello"
    with pytest.raises(DecryptionError):
        aead_decrypt(key, nonce, sealed, b"ae")
    with pytest.raises(Exception):
        aead_encrypt(key, nonce[:12], b"hello", b"ad")


def test_envelope_context_is_unambiguous():
    """Different envelopes never give the same context bytes."""
    assert envelope_context("ab", "c", "d") != envelope_context("a", "bc", "d")


# -- padding -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "bucket"),
    [(0, 256), (1, 256), (255, 256), (256, 512), (511, 512), (1000, 1024), (4095, 4096),
     (16384, 32768), (MAX_PLAINTEXT, 32768)],
)
def test_pad_bucket_sizes(length, bucket):
    """Plaintexts pad to the smallest bucket that fits them plus the marker."""
    padded = pad(b"\x00" * length)
    assert len(padded) == bucket
    assert padded[length] == 0x80
    assert unpad(padded) == b"\x00" * length


def test_pad_round_trip_every_bucket_edge():
    """unpad(pad(x)) == x at and around every bucket edge, with trailing zeros and 0x80 in data."""
    for bucket in PAD_BUCKETS:
        for length in (bucket - 2, bucket - 1):
            data = (b"\x80\x00" * bucket)[:length]
            assert unpad(pad(data)) == data


def test_pad_too_large():
    """A plaintext over 32767 bytes raises MessageTooLarge."""
    with pytest.raises(MessageTooLarge):
        pad(b"a" * (MAX_PLAINTEXT + 1))


def test_unpad_rejects_malformed_padding():
    """Padding without a marker, with a non-bucket size or with garbage after the marker fails."""
    no_marker, not_bucket, extra_zero = bytes(256), pad(b"x")[:-1], pad(b"x") + b"\x00"
    for bad in (no_marker, b"a" * 256, not_bucket, extra_zero, b"x\x80" + b"\x01" * 254):
        with pytest.raises(DecryptionError):
            unpad(bad)


# -- safety numbers ---------------------------------------------------------------


def test_safety_number_matches_signal_vector():
    """The construction reproduces libsignal's displayable fingerprint test vector."""
    alice = bytes.fromhex("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
    bob = bytes.fromhex("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")
    number = safety_number("+14152222222", alice, "+14153333333", bob)
    assert number.replace(" ", "") == "300354477692869396892869876765458257569162576843440918079131"


def test_safety_number_symmetric_and_formatted():
    """Both parties compute the same 12 groups of 5 digits."""
    alice, bob = IdentityKeys.generate(), IdentityKeys.generate()
    mine = safety_number(USER, alice.master_public, PEER, bob.master_public)
    theirs = safety_number(PEER, bob.master_public, USER, alice.master_public)
    assert mine == theirs
    groups = mine.split(" ")
    assert len(groups) == 12 and all(len(g) == 5 and g.isdigit() for g in groups)


def test_safety_number_changes_with_key_or_user():
    """Replacing either key, or a user id, changes the safety number."""
    alice, bob, mallory = IdentityKeys.generate(), IdentityKeys.generate(), IdentityKeys.generate()
    base = safety_number(USER, alice.master_public, PEER, bob.master_public)
    assert safety_number(USER, alice.master_public, PEER, mallory.master_public) != base
    assert safety_number(USER, mallory.master_public, PEER, bob.master_public) != base
    assert safety_number(USER, alice.master_public, USER, bob.master_public) != base
