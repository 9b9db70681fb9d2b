"""`twistd construct`: options and the composition root. Wiring only, no protocol or domain code.

Embedded mode (no --redis): the SQL inbox, the in-process hub as presence and event bus, and
the delivery worker's sweeps running in this process. Production mode (--redis): the Redis
inbox and presence, wake-ups over Redis pub/sub, and the sweeps left to `construct-worker`.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from typing import Any, Callable

from construct import pt
from construct.config import Setting, SettingsOptions, boolean, int_between, non_empty
from construct.core.abuse import AbuseLimits, AbuseSettings
from construct.core.accounts import MAX_SESSIONS_PER_USER, AccountService, KnownUsers, PasswordHasher
from construct.core.admission import TICK_SECONDS, Admission
from construct.core.app import Core
from construct.core.certificates import DEFAULT_LIFETIME_SECONDS, CertificateService, ServerKeys
from construct.core.deletion import AccountDeletion
from construct.core.delivery import DEFAULT_LONG_POLLS_PER_USER, DeliveryHub, LocalWakeUps
from construct.core.keys import KeyService
from construct.core.limits import Limit, MemoryCounters
from construct.core.messaging import MessageService
from construct.core.sealed import UnidentifiedAccess
from construct.core.worker import DEFAULT_REDELIVERY_SECONDS, DeliveryWorker, MemoryLeases
from construct.delivery.ports import Inbox, WakeUps
from construct.http.api import DEFAULT_PORTS, HttpApi
from construct.http.camouflage import SiteError, StaticSite, build_camouflaged_site
from construct.http.health import build_health_site
from construct.http.site import build_site
from construct.logs import log_format, use_log_format, user_id_hasher
from construct.metrics import Metrics
from construct.obfs4 import STATE_DIRECTORY, BindAddress, Obfs4Service
from construct.protocol.tcp import JsonLinesFactory
from construct.protocol.ws import DEFAULT_UNFINISHED_BUDGET_BYTES, ConstructWebSocketFactory
from construct.redis.client import RedisAddress, RedisClient, RedisSubscriber, check_reachable
from construct.redis.inbox import RedisInbox
from construct.redis import limits as redis_limits
from construct.redis.presence import HEARTBEAT_SECONDS, InstancePresence
from construct.redis.wakeups import RedisWakeUps
from construct.redis.service import RedisService
from construct.protocol.connection import AddressCounts, ConnectionTracker
from construct.protocol.timeouts import ConnectionLimits
from construct.services import (
    CollectorTuning,
    DatabaseService,
    GuardedTimer,
    HashingThreads,
    ListenerService,
    SequentialMultiService,
    parse_endpoint,
)
from construct.storage.accounts import AccountStore
from construct.storage.database import METADATA_SALT, Database, engine_from_options, prepare_database, server_secret
from construct.storage.inbox import SqlInbox
from construct.storage.keys import KeyStore
from construct.storage.server_keys import KeyFileError, KeyFileWatcher, default_path, load_or_create

PROGRAM = "construct"
SWEEP_INTERVAL_SECONDS = 10
SESSION_CLEANUP_INTERVAL_SECONDS = 600
# How often connections are checked against the auth, idle and slow-client timeouts.
CONNECTION_SWEEP_SECONDS = 5
# Room for the envelope around the largest allowed content (base64 key, ids, JSON quoting).
FRAME_OVERHEAD_BYTES = 16 * 1024
# How often the sender-certificate key file is looked at for a rotation.
KEY_FILE_CHECK_SECONDS = 10


def redis_address(text: str) -> RedisAddress:
    return RedisAddress.parse(text.strip())


def per_period(text: str) -> Limit:
    """COUNT/SECONDS, e.g. 600/60; 0 turns the limit off.

    A count without its period (`5`) is refused rather than guessed: some would read it as per
    second, others per minute or per hour."""
    count_text, slash, seconds_text = text.strip().partition("/")
    malformed = ValueError(f"must be COUNT/SECONDS such as 600/60, or 0 for off, not {text!r}")
    try:
        count = int(count_text)
        period = float(seconds_text) if slash else 0.0
    except ValueError:
        raise malformed from None
    if count > 0 and not slash:
        raise ValueError(f"must be COUNT/SECONDS such as {count}/60 (a count alone has no period), not {text!r}")
    try:
        limit = Limit(count, period)
    except ValueError:
        raise malformed from None
    if limit.count < 0 or (limit.enabled and not 0 < limit.period <= 86400 * 7):
        raise ValueError(f"must be COUNT/SECONDS with a count of 0 or more and 1 to 604800 seconds, not {text!r}")
    return limit


def origins(text: str) -> list[str]:
    """Patterns (* wildcards) for Autobahn, which matches them against scheme://host:port: a
    pattern written without a port, as browsers send it, gets its scheme's default port."""
    patterns = []
    for pattern in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(https?)://[^:/]+", pattern)
        patterns.append(f"{pattern}:{DEFAULT_PORTS[match.group(1)]}" if match else pattern)
    if not all(patterns):
        raise ValueError(f"must be comma-separated origin patterns such as https://chat.example.org or *, not {text!r}")
    return patterns


def ws_path(text: str) -> str:
    """One path segment: /ws, or with --camouflage a secret such as /k3Jd9…"""
    path = text.strip()
    if not re.fullmatch(r"/[A-Za-z0-9._~-]+", path) or path == "/v1":
        raise ValueError(f"must be / and one path segment of letters, digits and ._~- (not /v1), such as /ws, not {text!r}")
    return path


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {text!r}")
        return text.strip()

    return parse


# With --camouflage the WebSocket path is all that tells Construct from the website it poses as.
MIN_SECRET_PATH_CHARACTERS = 16


ABUSE_OPTIONS = {
    "limit-messages": ("messages_per_sender", "messages a user may send"),
    "limit-messages-per-recipient": ("messages_per_pair", "messages a user may send to one recipient"),
    "limit-registrations": ("registrations_per_address", "registrations from one client address"),
    "limit-key-fetches": ("key_fetches_per_pair", "fetches of one user's key bundle by one user"),
    "limit-key-fetches-by-user": ("key_fetches_per_requester", "key bundles one user may fetch, of anyone"),
    "limit-bundle-checks": (
        "bundle_checks_per_requester", "key bundles one user may read without a one-time prekey (sender checks)",
    ),
    "limit-prekeys-served": ("prekeys_served_per_user", "one-time prekeys handed out per user (then bundles come without)"),
    "limit-prekeys-taken": (
        "prekeys_taken_per_requester", "one-time prekeys one user may take, of anyone (then bundles come without)",
    ),
    "limit-prekeys-taken-per-user": (
        "prekeys_taken_per_pair", "one-time prekeys one user may take of one user (then bundles come without)",
    ),
    "limit-lookups": ("lookups_per_user", "username lookups one user may make"),
    "limit-lookups-per-address": ("lookups_per_address", "username lookups from one client address"),
    "limit-login-failures": ("login_failures_per_address", "failed logins from one client address"),
    "limit-login-failures-per-account": ("login_failures_per_account_address", "failed logins on one account from one address"),
    "limit-login-failures-account-wide": (
        "login_failures_per_account", "failed logins on one account, after which each address gets one try per window",
    ),
    "limit-password-checks": ("password_checks_per_address", "password checks (logins, right or wrong) from one client address"),
    "limit-password-checks-per-account": (
        "password_checks_per_account_address", "password checks (logins, right or wrong) on one account from one address",
    ),
    "limit-sealed-per-recipient": ("sealed_per_recipient", "sealed messages one user may be sent"),
    "limit-sealed-per-connection": ("sealed_per_connection", "sealed messages one connection may send"),
    "limit-sealed-per-address": ("sealed_per_address", "sealed messages one client address may send"),
}


class Options(SettingsOptions):
    program = PROGRAM
    settings = (
        Setting("listen", "tcp:8080:interface=127.0.0.1", "HTTP API and WebSocket endpoint", non_empty),
        Setting("tcp", "tcp:8081:interface=127.0.0.1", "raw TCP JSON-lines endpoint", non_empty),
        Setting("health", "tcp:3000:interface=127.0.0.1", "health and metrics endpoint", non_empty),
        Setting("data-dir", "construct-data", "directory of the embedded SQLite database", non_empty),
        Setting("database", None, "postgresql://user@host/db URL: PostgreSQL instead of SQLite", non_empty),
        Setting("database-pool", 10, "most PostgreSQL connections of this process", int_between(1, 200)),
        Setting("redis", None, "redis://host:port/db URL: production mode, inboxes in Redis", redis_address),
        Setting("redis-prefix", "construct:", "prefix of every Redis key and channel", non_empty),
        Setting("instance-id", None, "stable id of this instance (default: host name and listen port)", non_empty),
        Setting("bcrypt-cost", 12, "bcrypt work factor", int_between(4, 31)),
        Setting(
            "hash-threads",
            max(1, (os.cpu_count() or 2) - 1),
            "most passwords hashed at once (default: one less than the CPU count)",
            int_between(1, 64),
        ),
        Setting(
            "max-sessions-per-user", MAX_SESSIONS_PER_USER,
            "live sessions per user; a login past it ends the oldest (0: no limit)", int_between(0, 10**6),
        ),
        Setting("message-ttl", 7 * 24 * 3600, "seconds a message waits for its acknowledgement", int_between(60, 10**8)),
        Setting("inbox-quota", 10_000, "most pending messages per recipient", int_between(1, 10**7)),
        Setting("max-message-bytes", 64 * 1024, "largest message 'content' in bytes", int_between(1024, 2**24)),
        Setting(
            "redelivery-timeout",
            int(DEFAULT_REDELIVERY_SECONDS),
            "seconds before an unacknowledged push is pushed again (embedded mode)",
            int_between(5, 86400),
        ),
        *(
            Setting(name, getattr(AbuseSettings, field), f"{what}, as COUNT/SECONDS (0: no limit)", per_period)
            for name, (field, what) in ABUSE_OPTIONS.items()
        ),
        Setting("max-connections-per-address", ConnectionLimits.per_address, "open connections per client address (0: no limit)", int_between(0, 10**6)),
        Setting("max-connections-per-user", ConnectionLimits.per_user, "open connections per user (0: no limit)", int_between(0, 10**6)),
        Setting(
            "max-long-polls-per-user", DEFAULT_LONG_POLLS_PER_USER,
            "HTTP long-polls one user may have waiting at once; a newer one ends the oldest (0: no limit)",
            int_between(0, 10**6),
        ),
        Setting("auth-timeout", int(ConnectionLimits.auth_timeout), "seconds a connection has to authenticate (0: no limit)", int_between(0, 86400)),
        Setting("idle-timeout", int(ConnectionLimits.idle_timeout), "seconds a TCP connection may send nothing (0: no limit)", int_between(0, 86400)),
        Setting(
            "slow-client-timeout", int(ConnectionLimits.slow_client_timeout),
            "seconds a client may leave the server's output unread (0: no limit)", int_between(0, 86400),
        ),
        Setting(
            "header-timeout", int(ConnectionLimits.header_timeout),
            "seconds an HTTP or WebSocket connection has to send a request's headers, from connecting (0: no limit)",
            int_between(0, 3600),
        ),
        Setting(
            "ws-message-timeout", int(ConnectionLimits.message_timeout),
            "seconds a WebSocket client has to finish a message it began (0: no limit)", int_between(0, 3600),
        ),
        Setting(
            "ws-unfinished-budget", DEFAULT_UNFINISHED_BUDGET_BYTES,
            "bytes all WebSocket messages still arriving may hold in this process (0: no limit)",
            int_between(0, 2**40),
        ),
        Setting("allowed-origins", ["*"], "comma-separated Origin patterns browsers may open a WebSocket or call /v1 from", origins),
        Setting("sender-key-path", None,
                "file of the keys that sign sender certificates, made on first start (default: in --data-dir)",
                non_empty),
        Setting("sender-certificate-lifetime", DEFAULT_LIFETIME_SECONDS, "seconds a sender certificate is valid",
                int_between(300, 7 * 24 * 3600)),
        Setting("log-format", "text", "text, or json for one JSON object a line", log_format),
        Setting("log-salt", None, "secret salt for the hashes of user ids in logs", non_empty, secret=True),
        Setting("log-client-addresses", False, "log client IP addresses (off: never logged)", boolean, flag=True),
        Setting("ws-path", "/ws", "path of the WebSocket (with --camouflage the only one, and the API under it)", ws_path),
        Setting(
            "camouflage", False, "look like an ordinary static website to all but Construct clients (for port 443)",
            boolean, flag=True,
        ),
        Setting("camouflage-site", None, "directory of the website --camouflage shows (default: a placeholder page)",
                non_empty),
        Setting("camouflage-web-client", False, "with --camouflage, serve the web client under --ws-path (<ws-path>/)",
                boolean, flag=True),
        Setting("ws-padding", False, "pad every WebSocket message sent to a size bucket", boolean, flag=True),
        Setting("obfs4", None, "obfs4 endpoint, tcp:PORT:interface=IP: obfs4proxy in front of --obfs4-target",
                BindAddress.parse),
        Setting("obfs4-target", "tcp", "what obfs4 carries: tcp (JSON lines) or websocket", one_of("tcp", "websocket")),
        Setting("obfs4-iat-mode", 0, "obfs4 timing obfuscation: 0 off, 1 on, 2 paranoid", int_between(0, 2)),
        Setting("obfs4proxy", "obfs4proxy", "the obfs4proxy program: a name on PATH or a path", non_empty),
    )

    def postOptions(self) -> None:
        super().postOptions()
        use_log_format(self, self["log-format"])
        if self["instance-id"] is None:
            self["instance-id"] = default_instance_id(self["listen"])
        if self["camouflage"] and len(self["ws-path"]) - 1 < MIN_SECRET_PATH_CHARACTERS:
            raise SystemExit(
                f"{PROGRAM}: --camouflage needs a --ws-path nobody can guess, of at least {MIN_SECRET_PATH_CHARACTERS} "
                f"characters, such as /{secrets.token_urlsafe(18)}"
            )


def default_instance_id(listen: str) -> str:
    """Host name and listen port: stable across restarts, distinct per instance on a host."""
    match = re.search(r"(?:^[a-z0-9]+:|port=)(\d+)\b", listen)
    port = match.group(1) if match else None
    if port is None or port == "0":
        # No fixed port (tests, socket activation by name): nothing to keep stable across restarts.
        port = f"pid{os.getpid()}"
    return f"{socket.gethostname()}-{port}"


def open_database(program: str, database_url: str | None, data_dir: str, pool_size: int, reactor: Any) -> Database:
    """Create or upgrade the schema now, so an unreachable database stops startup with one line."""
    try:
        engine = engine_from_options(database_url, data_dir, pool_size)
    except ValueError as e:
        raise SystemExit(f"{program}: {e}") from None
    try:
        prepare_database(engine)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{program}: cannot use the {engine.describe()}: {reason}") from None
    return Database(engine, reactor)


def require_redis(program: str, address: RedisAddress) -> None:
    """Stop startup with one line when Redis cannot be used, as for the database; once running,
    the connections ride out Redis outages by themselves."""
    try:
        check_reachable(address)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{program}: cannot use Redis at {address.host}:{address.port}: {reason}") from None


def assemble_core(
    db: Database,
    inbox: Inbox,
    hub: DeliveryHub,
    wakeups: WakeUps,
    clock: Any,
    options: Options,
    metrics: Metrics,
    run_blocking: Callable,
    counters: Any,
    server_keys: ServerKeys,
    recipient_exists: Callable | None = None,
    login_counters: Any = None,
) -> Core:
    # Made on first start and kept in the database, so every instance shares it: it hides the
    # limits' keys and the senders in duplicate-send records from whoever reads Redis alone.
    metadata_salt = server_secret(db.engine, METADATA_SALT)
    limits = AbuseLimits(counters, abuse_settings(options), metadata_salt, login_counters)
    keys = KeyStore(db)
    return Core(
        accounts=AccountService(
            AccountStore(db), PasswordHasher(options["bcrypt-cost"], run_blocking, options["hash-threads"]), clock,
            wakeups.sessions_revoked, limits, max_sessions=options["max-sessions-per-user"],
        ),
        keys=KeyService(keys, clock, limits),
        messaging=MessageService(
            inbox,
            hub.holds,
            wakeups,
            clock,
            limits,
            ttl_seconds=options["message-ttl"],
            quota=options["inbox-quota"],
            max_content_bytes=options["max-message-bytes"],
            recipient_exists=recipient_exists,
            access=UnidentifiedAccess(keys.get_access),
            record_salt=metadata_salt,
        ),
        hub=hub,
        metrics=metrics,
        log_id=user_id_hasher(options["log-salt"]),
        deletion=AccountDeletion(AccountStore(db), inbox, wakeups.sessions_revoked),
        admission=Admission(clock),
        certificates=CertificateService(keys, clock, server_keys, options["sender-certificate-lifetime"]),
    )


def abuse_settings(options: Options) -> AbuseSettings:
    return AbuseSettings(**{field: options[name] for name, (field, _) in ABUSE_OPTIONS.items()})


def connection_limits(options: Options) -> ConnectionLimits:
    return ConnectionLimits(
        per_address=options["max-connections-per-address"],
        per_user=options["max-connections-per-user"],
        auth_timeout=options["auth-timeout"],
        idle_timeout=options["idle-timeout"],
        slow_client_timeout=options["slow-client-timeout"],
        header_timeout=options["header-timeout"],
        message_timeout=options["ws-message-timeout"],
    )


def build_embedded(
    db: Database, clock: Any, options: Options, metrics: Metrics, run_blocking: Callable,
    server_keys: ServerKeys | None = None,
) -> tuple[Core, DeliveryWorker]:
    """The core on the SQL inbox, with the hub as presence and bus, and an in-process worker.

    `server_keys` sign sender certificates (default: a new key, kept in memory only)."""
    inbox = SqlInbox(db)
    hub = DeliveryHub(inbox, clock, metrics, options["max-long-polls-per-user"])
    wakeups = LocalWakeUps(hub)
    core = assemble_core(
        db, inbox, hub, wakeups, clock, options, metrics, run_blocking,
        MemoryCounters(clock), server_keys or ServerKeys.generate(clock.seconds()),
        login_counters=MemoryCounters(clock),
    )
    worker = DeliveryWorker(inbox, hub.is_online, wakeups, MemoryLeases(clock), clock, metrics, options["redelivery-timeout"])
    return core, worker


def build_production(
    db: Database, reactor: Any, clock: Any, options: Options, metrics: Metrics, run_blocking: Callable,
    server_keys: ServerKeys | None = None,
) -> tuple[Core, InstancePresence, RedisClient, RedisSubscriber]:
    """The core on the Redis inbox; presence and wake-ups through Redis.

    `reactor` runs the connections; `clock` is what the logic reads time from; `server_keys`
    as for build_embedded.
    """
    address, prefix, instance_id = options["redis"], options["redis-prefix"], options["instance-id"]
    redis = RedisClient(address, reactor, name=f"{prefix}server:{instance_id}")
    known_users = KnownUsers(AccountStore(db).user_exists, clock)
    inbox = RedisInbox(redis, prefix, clock, instance_id, reactor)
    hub = DeliveryHub(inbox, clock, metrics, options["max-long-polls-per-user"])
    presence = InstancePresence(redis, prefix, clock, instance_id, hub)
    hub.listener = presence
    wakeups = RedisWakeUps(redis, prefix, presence, instance_id, hub)
    core = assemble_core(
        db, inbox, hub, wakeups, clock, options, metrics,
        run_blocking, redis_limits.RedisCounters(redis, prefix, reactor),
        server_keys or ServerKeys.generate(clock.seconds()), recipient_exists=known_users.exists,
    )

    def subscribed() -> None:
        wakeups.subscribed()
        presence.refresh()

    subscriber = RedisSubscriber(
        address, reactor, [wakeups.channel], wakeups.event_received, subscribed, name=f"{prefix}subscriber:{instance_id}"
    )
    return core, presence, redis, subscriber


def obfs4_executable(options: Options) -> str | None:
    """The obfs4proxy to run, if --obfs4 asks for one; one line and exit if it is missing."""
    if options["obfs4"] is None:
        return None
    executable = pt.find_executable(options["obfs4proxy"])
    if executable is None:
        raise SystemExit(
            f"{PROGRAM}: --obfs4 needs obfs4proxy, and {options['obfs4proxy']!r} is not installed "
            "(Debian: apt-get install obfs4proxy; or name it with --obfs4proxy)"
        )
    return executable


def camouflage_site(options: Options) -> StaticSite | None:
    if not options["camouflage"]:
        return None
    try:
        if options["camouflage-site"] is None:
            return StaticSite.default()
        return StaticSite.load(options["camouflage-site"])
    except (SiteError, OSError) as e:
        raise SystemExit(f"{PROGRAM}: --camouflage-site: {e}") from None


def makeService(options: Options, reactor: Any = None) -> SequentialMultiService:
    if reactor is None:
        from twisted.internet import reactor
    endpoints = {name: parse_endpoint(reactor, PROGRAM, name, options[name]) for name in ("listen", "tcp", "health")}
    obfs4proxy = obfs4_executable(options)
    camouflage = camouflage_site(options)
    db = open_database(PROGRAM, options["database"], options["data-dir"], options["database-pool"], reactor)
    key_file = options["sender-key-path"] or default_path(options["data-dir"])
    try:
        keys = load_or_create(key_file, reactor.seconds())
    except KeyFileError as e:
        raise SystemExit(f"{PROGRAM}: --sender-key-path: {e}") from None
    metrics = Metrics()
    root = SequentialMultiService()
    CollectorTuning().setServiceParent(root)
    hashing = HashingThreads(options["hash-threads"], reactor)
    hashing.setServiceParent(root)
    run_blocking = hashing.run
    DatabaseService(db).setServiceParent(root)
    checks: dict[str, Callable] = {"database": db.check}
    if options["redis"] is None:
        core, worker = build_embedded(db, reactor, options, metrics, run_blocking, keys)
        GuardedTimer(SWEEP_INTERVAL_SECONDS, "delivery sweep", worker.sweep, reactor).setServiceParent(root)
    else:
        require_redis(PROGRAM, options["redis"])
        core, presence, redis, subscriber = build_production(db, reactor, reactor, options, metrics, run_blocking, keys)
        RedisService(redis, subscriber).setServiceParent(root)
        GuardedTimer(HEARTBEAT_SECONDS, "presence heartbeat", presence.heartbeat, reactor).setServiceParent(root)
        checks["redis"] = redis.ping
    GuardedTimer(
        SESSION_CLEANUP_INTERVAL_SECONDS, "session cleanup", core.accounts.delete_expired_sessions, reactor
    ).setServiceParent(root)
    GuardedTimer(TICK_SECONDS, "load check", core.admission.tick, reactor).setServiceParent(root)
    watcher = KeyFileWatcher(key_file, core.certificates)
    GuardedTimer(KEY_FILE_CHECK_SECONDS, "sender key file check", watcher.check, reactor).setServiceParent(root)

    max_frame = options["max-message-bytes"] * 2 + FRAME_OVERHEAD_BYTES
    limits = connection_limits(options)
    # One count per address over both listeners.
    addresses = AddressCounts(limits.per_address)
    websockets, tcp_connections = ConnectionTracker(reactor), ConnectionTracker(reactor)
    ws_factory = ConstructWebSocketFactory(
        core, max_frame, websockets, addresses, limits, reactor, options["allowed-origins"], options["ws-padding"],
        options["ws-unfinished-budget"],
    )
    api = HttpApi(core, options["allowed-origins"])
    proxied = options["listen"].startswith("haproxy:")
    if camouflage is None:
        site = build_site(ws_factory, api, max_frame, options["ws-path"], proxied)
    else:
        site = build_camouflaged_site(
            camouflage, ws_factory, api, max_frame, options["ws-path"], options["camouflage-web-client"],
            proxied,
        )
    tcp_factory = JsonLinesFactory(
        core, max_frame, tcp_connections, addresses, limits, reactor, proxied=options["tcp"].startswith("haproxy:")
    )
    if obfs4proxy is not None:
        # Before the listeners, so it stops after them: their connections through obfs4 close politely first.
        Obfs4Service(
            reactor, obfs4proxy, options["obfs4"], os.path.join(options["data-dir"], STATE_DIRECTORY),
            options["obfs4-iat-mode"], tcp_factory if options["obfs4-target"] == "tcp" else site,
        ).setServiceParent(root)
    ListenerService(PROGRAM, "http", endpoints["listen"], site, websockets).setServiceParent(root)
    ListenerService(PROGRAM, "tcp", endpoints["tcp"], tcp_factory, tcp_connections).setServiceParent(root)
    for tracker in (websockets, tcp_connections):
        GuardedTimer(CONNECTION_SWEEP_SECONDS, "connection sweep", tracker.sweep, reactor).setServiceParent(root)
    health = build_health_site(checks, metrics, reactor)
    ListenerService(PROGRAM, "health", endpoints["health"], health).setServiceParent(root)
    return root
