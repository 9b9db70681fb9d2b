"""Key bundles (the seed's UploadableKeyBundle, verified before it is stored) and X3DH one-time prekeys."""

from __future__ import annotations

import base64
import json
from typing import Any, Mapping

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from twisted.internet.interfaces import IReactorTime

from construct.core.abuse import AbuseLimits
from construct.core.sealed import parse_access_update
from construct.core.validation import canonical_uuid, decode_base64
from construct.errors import ConstructError, user_not_found_error
from construct.storage.keys import KeyStore, OneTimePrekeyRecord, PublishedBundle, StoredBundle

MAX_BUNDLE_DATA_BYTES = 16384
MAX_SUITES = 8
MAX_BUNDLE_ONE_TIME_PREKEYS = 100
SUPPORTED_SUITES = (1,)
MAX_PREKEYS_PER_UPLOAD = 100
# Per user: enough for many first contacts while the owner is offline, bounded against abuse.
MAX_WAITING_PREKEYS = 1000
# 0xFFFFFFFF is reserved: the X3DH header uses it to say "no one-time prekey".
MAX_PREKEY_ID = 2**32 - 2


def _bad(message: str) -> ConstructError:
    return ConstructError("INVALID_KEY_BUNDLE", message)


def validate_bundle(raw: Any, account_id: str | None) -> StoredBundle:
    """Check an UploadableKeyBundle and its Ed25519 signature; return it unchanged.

    `account_id` is None at registration, where `userId` inside bundleData must be empty;
    afterwards it must name the account.
    """
    if not isinstance(raw, dict):
        raise _bad("The key bundle must be an object with masterIdentityKey, bundleData and signature")
    master = decode_base64(raw.get("masterIdentityKey"), "masterIdentityKey", "INVALID_KEY_BUNDLE", 32)
    signature = decode_base64(raw.get("signature"), "signature", "INVALID_KEY_BUNDLE", 64)
    bundle_data = raw.get("bundleData")
    if isinstance(bundle_data, str) and len(bundle_data) > MAX_BUNDLE_DATA_BYTES:
        raise _bad("'bundleData' is too large")
    data = decode_base64(bundle_data, "bundleData", "INVALID_KEY_BUNDLE")
    try:
        VerifyKey(master).verify(data, signature)
    except (BadSignatureError, ValueError):
        raise _bad("The signature does not verify against masterIdentityKey") from None
    _check_bundle_data(data, account_id)
    return StoredBundle(raw["masterIdentityKey"], bundle_data, raw["signature"])


def _check_bundle_data(data: bytes, account_id: str | None) -> None:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        raise _bad("'bundleData' is not base64 of UTF-8 JSON") from None
    if not isinstance(parsed, dict):
        raise _bad("'bundleData' must hold a JSON object")
    user_id = parsed.get("userId")
    if not isinstance(user_id, str):
        raise _bad("BundleData 'userId' must be a string")
    if account_id is None:
        if user_id:
            raise _bad("BundleData 'userId' must be empty at registration")
    elif canonical_uuid(user_id, "userId", "INVALID_KEY_BUNDLE") != account_id:
        raise _bad("BundleData 'userId' must be the account's id")
    if not isinstance(parsed.get("timestamp"), str):
        raise _bad("BundleData 'timestamp' must be an RFC 3339 string")
    suites = parsed.get("supportedSuites")
    if not isinstance(suites, list) or not 1 <= len(suites) <= MAX_SUITES:
        raise _bad(f"BundleData 'supportedSuites' must list 1 to {MAX_SUITES} suites")
    for suite in suites:
        _check_suite(suite)


def _check_suite(suite: Any) -> None:
    if not isinstance(suite, dict):
        raise _bad("Each suite must be an object")
    if suite.get("suiteId") not in SUPPORTED_SUITES or isinstance(suite.get("suiteId"), bool):
        raise _bad(f"Unsupported suiteId {suite.get('suiteId')!r}")
    decode_base64(suite.get("identityKey"), "identityKey", "INVALID_KEY_BUNDLE", 32)
    decode_base64(suite.get("signedPrekey"), "signedPrekey", "INVALID_KEY_BUNDLE", 32)
    prekeys = suite.get("oneTimePrekeys", [])
    if not isinstance(prekeys, list) or len(prekeys) > MAX_BUNDLE_ONE_TIME_PREKEYS:
        raise _bad(f"'oneTimePrekeys' must be a list of at most {MAX_BUNDLE_ONE_TIME_PREKEYS} keys")
    for prekey in prekeys:
        decode_base64(prekey, "oneTimePrekeys[]", "INVALID_KEY_BUNDLE", 32)


def parse_one_time_prekeys(raw: Any) -> list[OneTimePrekeyRecord]:
    """`[{"keyId": int, "publicKey": b64 of 32 bytes}, ...]`, 1 to 100 entries with distinct ids."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PREKEYS_PER_UPLOAD:
        raise _bad(f"'prekeys' must be a list of 1 to {MAX_PREKEYS_PER_UPLOAD} one-time prekeys")
    records: list[OneTimePrekeyRecord] = []
    seen: set[int] = set()
    for index, entry in enumerate(raw):
        where = f"prekeys[{index}]"
        if not isinstance(entry, dict):
            raise _bad(f"'{where}' must be an object with keyId and publicKey")
        key_id = entry.get("keyId")
        if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= MAX_PREKEY_ID:
            raise _bad(f"'{where}.keyId' must be an integer from 0 to {MAX_PREKEY_ID}")
        if key_id in seen:
            raise _bad(f"keyId {key_id} appears more than once")
        seen.add(key_id)
        public_key = decode_base64(entry.get("publicKey"), f"{where}.publicKey", "INVALID_KEY_BUNDLE", 32)
        # Stored and served in canonical base64, which is all clients accept.
        records.append(OneTimePrekeyRecord(key_id, base64.b64encode(public_key).decode("ascii")))
    return records


def first_suite_keys(bundle: StoredBundle) -> tuple[str, str]:
    """(identityKey, signedPrekey) of the first suite of a bundle that was validated on upload."""
    suite = json.loads(base64.b64decode(bundle.bundle_data))["supportedSuites"][0]
    return suite["identityKey"], suite["signedPrekey"]


class KeyService:
    def __init__(self, store: KeyStore, clock: IReactorTime, limits: AbuseLimits) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits

    async def rotate(self, user_id: str, raw_bundle: Any, access_fields: Mapping[str, Any] = {}) -> None:
        """Replace the user's own bundle, and the unidentified access registered with it (read
        from `access_fields`, the request's); the identity key itself never changes."""
        bundle = validate_bundle(raw_bundle, user_id)
        access = parse_access_update(access_fields)
        current = await self._store.get_bundle(user_id)
        if current is not None and current.bundle.master_identity_key != bundle.master_identity_key:
            raise _bad("masterIdentityKey cannot change; register a new account for a new identity")
        await self._store.put_bundle(user_id, bundle, int(self._clock.seconds() * 1000), access)

    async def get(self, user_id: str, requester_id: str, wants_prekey: bool = True) -> PublishedBundle:
        """The user's bundle. For another user's fetch it also carries one of the owner's
        one-time prekeys, deleted as it is handed out; fetching your own bundle burns none.

        Fetches with a prekey are limited per requester and target, and so are the prekeys
        handed out, per owner, requester and pair: past a budget the bundle comes without one,
        so nobody can drain a pool. Fetches without one (`wants_prekey` False) have a limit of their own."""
        claim = False
        if requester_id != user_id and wants_prekey:
            await self._limits.check_key_fetch(requester_id, user_id)
            claim = await self._limits.may_serve_prekey(requester_id, user_id)
        elif requester_id != user_id:
            await self._limits.check_bundle_check(requester_id)
        published = await self._store.get_bundle(user_id, claim_one_time_prekey=claim)
        if published is None:
            raise user_not_found_error()
        return published

    async def upload_one_time_prekeys(self, user_id: str, raw_prekeys: Any) -> int:
        """Add the owner's prekeys (a keyId already waiting is replaced); return how many wait now."""
        prekeys = parse_one_time_prekeys(raw_prekeys)
        now_ms = int(self._clock.seconds() * 1000)
        return await self._store.add_one_time_prekeys(user_id, prekeys, now_ms, MAX_WAITING_PREKEYS)

    async def count_one_time_prekeys(self, user_id: str) -> int:
        return await self._store.count_one_time_prekeys(user_id)
