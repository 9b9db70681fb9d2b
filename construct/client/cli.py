"""`construct-chat`: chat from a terminal with end-to-end encryption, or script it.

    construct-chat [--server URL] [--state PATH] [--json] COMMAND ...

Commands: register USERNAME, login USERNAME, whoami, send USERNAME TEXT (TEXT "-" reads stdin),
listen [--count N] [--timeout S], fingerprint USERNAME, trust USERNAME, history USERNAME,
export FILE.

Secrets never come from the command line: the state file's passphrase from
CONSTRUCT_CHAT_PASSPHRASE or a prompt, the account password from CONSTRUCT_CHAT_PASSWORD or a
prompt. Everything that can be checked without the server (the username, the state file, the
passphrase, the password's rules, the message's size) is checked right after it is typed,
before anything else is asked or sent. With --json every result is one JSON object per line
on stdout, and an error one JSON object on stderr.

Exit status: see EXIT_CODES.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import signal
import sys
from datetime import datetime
from typing import Any, NoReturn

from nacl import pwhash
from twisted.internet import defer, task, threads
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from construct.client.account import (
    IdentityChanged,
    NoSuchContact,
    NotRegistered,
    SelfMessage,
    SenderUnverified,
    account as stored_account,
)
from construct.client.crypto import MAX_PLAINTEXT, InvalidBundle, MessageTooLarge
from construct.client.messenger import NOT_NOW_CODES, AccountDeleted, Messenger, UnusableUsername, normalize_username
from construct.client.state import KdfParams, WrongPassphrase, load_state_with_key
from construct.client.store import StateBusy, StateExists, StateStore
from construct.client.transport import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionClosed,
    RequestTimeout,
    ServerAddress,
    ServerError,
)
from construct.core.validation import check_password_strength
from construct.errors import ConstructError
from construct.protocol import codec

PROGRAM = "construct-chat"
DEFAULT_SERVER = "ws://127.0.0.1:8080/ws"
DEFAULT_STATE = os.path.join("~", ".construct", "state.json")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_AUTH = 2
EXIT_NETWORK = 3
EXIT_SECURITY = 4
EXIT_NO_SUCH_USER = 5
EXIT_TIMEOUT = 6
EXIT_INTERRUPTED = 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "bad usage, or any other error",
    EXIT_AUTH: "authentication: wrong passphrase or password, the session is dead (log in again), "
    "or the account was deleted",
    EXIT_NETWORK: "the server cannot be reached, is unavailable or says not now; a message being sent "
    "stays in the outbox",
    EXIT_SECURITY: "a contact's identity changed (see trust), or their key bundle does not verify",
    EXIT_NO_SUCH_USER: "no account has that username, or no contact has that name (history)",
    EXIT_TIMEOUT: "listen --timeout passed before --count messages arrived",
    EXIT_INTERRUPTED: "stopped by Ctrl-C (or SIGTERM)",
}
AUTH_CODES = frozenset({"INVALID_CREDENTIALS", "INVALID_TOKEN", "SESSION_EXPIRED", "AUTH_REQUIRED"})
NETWORK_CODES = frozenset({"SERVICE_UNAVAILABLE", "SERVER_ERROR"})

# libsodium's Argon2id presets for the state file's key, chosen when the file is created.
KDF_COSTS = {
    "interactive": KdfParams(pwhash.argon2id.OPSLIMIT_INTERACTIVE, pwhash.argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": KdfParams(pwhash.argon2id.OPSLIMIT_MODERATE, pwhash.argon2id.MEMLIMIT_MODERATE),
    "sensitive": KdfParams(pwhash.argon2id.OPSLIMIT_SENSITIVE, pwhash.argon2id.MEMLIMIT_SENSITIVE),
}

# Terminal control characters (and bidi overrides) in a message must not reach the terminal.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class UsageError(Exception):
    """Bad arguments or input; exit status 1."""


class ListenTimeout(Exception):
    """`listen --timeout` passed before `--count` messages arrived; exit status 6."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _common_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Global options, accepted before or after the command."""
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--server", default=default(None),
        help=f"server address: ws://host:port/ws, wss://…, tcp://host:port or tcps://… (env CONSTRUCT_CHAT_SERVER; "
        f"default: the one registered with, else {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--state", default=default(None),
        help=f"the account's encrypted state file (env CONSTRUCT_CHAT_STATE; default {DEFAULT_STATE})",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="one JSON object per line")
    parser.add_argument(
        "--encoding", choices=(codec.MSGPACK, codec.JSON), default=default(codec.MSGPACK),
        help="WebSocket encoding (default msgpack; TCP is always JSON)",
    )
    parser.add_argument(
        "--kdf-cost", choices=sorted(KDF_COSTS), default=default(None),
        help="Argon2id cost of the state file's key when register creates it "
        "(env CONSTRUCT_CHAT_KDF_COST; default moderate: 256 MiB, 3 passes)",
    )
    parser.add_argument(
        "--ca-file", default=default(None),
        help="PEM file of the certificate authorities to trust for wss:// and tcps:// instead of the "
        "system's, e.g. a self-hosted server's own certificate (env CONSTRUCT_CHAT_CA_FILE)",
    )
    parser.add_argument(
        "--keep-messages", type=_count, default=default(None),
        help="how many messages the history keeps (the newest), from now on; remembered in the state "
        "file (env CONSTRUCT_CHAT_KEEP_MESSAGES; default 10000; 0 keeps none)",
    )


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status:\n" + "\n".join(f"  {code:3}  {meaning}" for code, meaning in EXIT_CODES.items())
    parser = _Parser(
        prog=PROGRAM,
        description="End-to-end-encrypted chat through a Construct server.",
        epilog=epilog + "\n\nsecrets: CONSTRUCT_CHAT_PASSPHRASE (state file), CONSTRUCT_CHAT_PASSWORD (account); "
        "prompted for when unset",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _common_options(sub, defaults=False)
        return sub

    command("register", "create an account and its keys (password: CONSTRUCT_CHAT_PASSWORD or prompt)").add_argument(
        "username"
    )
    command("login", "open a new session for the account in the state file").add_argument("username")
    command("whoami", "show the account in the state file")
    send = command("send", "send an encrypted message")
    send.add_argument("username")
    send.add_argument("text", help='the message, or "-" to read it from standard input')
    listen = command("listen", "print incoming messages as they arrive")
    listen.add_argument("--count", type=_positive_int, help="stop after this many messages")
    listen.add_argument("--once", action="store_true", help="stop after one message (--count 1)")
    listen.add_argument("--timeout", type=_positive_float, help="stop after this many seconds")
    command("fingerprint", "show the safety number to compare with a contact out of band").add_argument("username")
    trust = command(
        "trust", "accept a contact's new identity (another key, or another account under their name) "
        "after comparing the safety numbers",
    )
    trust.add_argument("username")
    trust.add_argument("--yes", action="store_true", help="accept without asking (after comparing out of band)")
    command("history", "show the messages exchanged with a contact").add_argument("username")
    command(
        "export", "write the account and its history to one key file (same passphrase), for the web client's "
        "\"Use a key file\"; use the account in one place at a time",
    ).add_argument("file", help="the key file to write (must not exist yet)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


# Input, before the reactor runs (prompts block)


def _secret(variable: str, prompt: str) -> str:
    value = os.environ.get(variable)
    if value:
        return value
    if not _terminal_available():
        raise UsageError(f"set {variable} or run in a terminal to be asked for it")
    value = getpass.getpass(prompt)
    if not value:
        raise UsageError("an empty secret is not allowed")
    return value


def _confirmed(variable: str, first: str) -> None:
    """The second entry of a new secret (none when it came from the environment)."""
    if not os.environ.get(variable) and getpass.getpass("Again: ") != first:
        raise UsageError("the two entries differ")


def _terminal_available() -> bool:
    """getpass asks on the controlling terminal, which exists even when stdin is a pipe (`send -`)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR))
    except OSError:
        return sys.stdin.isatty()
    return True


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command needs from the user, each checked as soon as it is known."""
    state = os.path.expanduser(args.state or os.environ.get("CONSTRUCT_CHAT_STATE") or DEFAULT_STATE)
    inputs: dict[str, Any] = {"state": state, "known_key": None}
    if args.command in ("register", "login", "send", "fingerprint", "trust", "history"):
        inputs["username"] = _checked_username(args.username)
    if args.command == "send":
        inputs["text"] = _message_text(args)
    kdf_cost = args.kdf_cost or os.environ.get("CONSTRUCT_CHAT_KDF_COST") or "moderate"
    if kdf_cost not in KDF_COSTS:
        raise UsageError(f"CONSTRUCT_CHAT_KDF_COST must be one of {', '.join(sorted(KDF_COSTS))}")
    inputs["kdf"] = KDF_COSTS[kdf_cost]
    inputs["keep"] = _keep_messages(args)
    inputs["trust"] = _ca_file(args)
    if args.command == "register":
        if os.path.exists(state):
            raise StateExists(f"{state} already exists; pass another --state for a new account")
        passphrase = _secret("CONSTRUCT_CHAT_PASSPHRASE", "New passphrase for the state file: ")
        _confirmed("CONSTRUCT_CHAT_PASSPHRASE", passphrase)
        inputs["passphrase"] = passphrase
        password = _secret("CONSTRUCT_CHAT_PASSWORD", f"Password for {inputs['username']}: ")
        try:
            check_password_strength(password)
        except ConstructError as e:
            raise UsageError(f"{e.message}: the server takes 10 to 72 bytes with an upper-case letter, "
                             "a lower-case letter and a digit") from None
        _confirmed("CONSTRUCT_CHAT_PASSWORD", password)
        inputs["password"] = password
        return inputs
    if not os.path.exists(state):
        raise FileNotFoundError(2, "no state file", state)
    if args.command == "export" and os.path.exists(os.path.expanduser(args.file)):
        raise StateExists(f"{args.file} already exists; choose another file")
    inputs["passphrase"] = _secret("CONSTRUCT_CHAT_PASSPHRASE", f"Passphrase for {state}: ")
    # Argon2id now, so a wrong passphrase is said at once (the store reuses the key).
    data, inputs["known_key"] = load_state_with_key(state, inputs["passphrase"])
    if args.command == "login":
        holder = stored_account(data)["username"]
        if holder != inputs["username"]:
            raise UsageError(f"{state} holds the account {holder!r}, not {inputs['username']!r}")
        inputs["password"] = _secret("CONSTRUCT_CHAT_PASSWORD", f"Password for {inputs['username']}: ")
    return inputs


def _checked_username(text: str) -> str:
    try:
        return normalize_username(text)
    except UnusableUsername as e:
        raise UsageError(str(e)) from None


def _message_text(args: argparse.Namespace) -> str:
    text = sys.stdin.read() if args.text == "-" else args.text
    text = text[:-1] if args.text == "-" and text.endswith("\n") else text
    if not text:
        raise UsageError("the message is empty")
    if len(text.encode("utf-8")) > MAX_PLAINTEXT:
        raise UsageError(f"the message is {len(text.encode('utf-8'))} bytes; at most {MAX_PLAINTEXT} fit in one")
    return text


def _keep_messages(args: argparse.Namespace) -> int | None:
    if args.keep_messages is not None:
        return args.keep_messages
    text = os.environ.get("CONSTRUCT_CHAT_KEEP_MESSAGES")
    if text is None:
        return None
    try:
        return _count(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise UsageError(f"CONSTRUCT_CHAT_KEEP_MESSAGES must be a count of 0 or more, not {text!r}") from None


def _ca_file(args: argparse.Namespace) -> bytes | None:
    path = args.ca_file or os.environ.get("CONSTRUCT_CHAT_CA_FILE")
    if not path:
        return None
    try:
        with open(os.path.expanduser(path), "rb") as handle:
            return handle.read()
    except OSError as e:
        raise UsageError(f"cannot read the CA file {path}: {e.strerror}") from None


# Output


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, human: str, machine: dict) -> None:
        print(json.dumps(machine, ensure_ascii=False) if self.as_json else human, flush=True)

    def warning(self, text: str) -> None:
        if self.as_json:
            print(json.dumps({"warning": text}, ensure_ascii=False), file=sys.stderr, flush=True)
        else:
            print(f"{PROGRAM}: warning: {printable(text)}", file=sys.stderr, flush=True)

    def status(self, event: str, detail: str) -> None:
        """The connection: lost (reconnecting) or back."""
        if self.as_json:
            record = {"event": "connectionLost", "reason": detail} if event == "lost" else {"event": "reconnected"}
            print(json.dumps(record, ensure_ascii=False), file=sys.stderr, flush=True)
        elif event == "lost":
            print(f"{PROGRAM}: connection lost ({printable(detail)}); reconnecting", file=sys.stderr, flush=True)
        else:
            print(f"{PROGRAM}: reconnected", file=sys.stderr, flush=True)

    def error(self, code: str, text: str) -> None:
        if self.as_json:
            print(json.dumps({"error": {"code": code, "message": text}}, ensure_ascii=False), file=sys.stderr, flush=True)
        else:
            print(f"{PROGRAM}: {printable(text)}", file=sys.stderr, flush=True)

    def message(self, entry: dict) -> None:
        """One history entry: a message received (or sent, in `history`)."""
        name = entry.get("peerName") or entry["peer"]
        text = entry.get("text") or ""
        if self.as_json:
            record = {
                "event": "message", "id": entry["id"], "direction": entry["direction"], "peer": name,
                "peerUserId": entry["peer"], "text": text, "timestamp": entry.get("timestamp"),
                "status": entry.get("status"),
            }
            if entry.get("reason"):
                record["reason"] = entry["reason"]
            if entry.get("sealed"):
                record["sealed"] = True
            print(json.dumps(record, ensure_ascii=False), flush=True)
            return
        speaker = "me" if entry["direction"] == "out" else printable(name)
        note = {"failed": f" [not sent: {entry.get('reason', '')}]", "pending": " [waiting in the outbox]"}.get(
            entry.get("status"), ""
        )
        body = printable(text).replace("\n", "\n    ")
        print(f"[{_local_time(entry.get('timestamp'))}] {speaker}{printable(note)}: {body}", flush=True)


def _local_time(timestamp: Any) -> str:
    """The sender's clock, which may say anything."""
    try:
        return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def printable(text: str) -> str:
    return _UNPRINTABLE.sub("\N{REPLACEMENT CHARACTER}", text)


def _describe_failure(error: BaseException, args: argparse.Namespace) -> tuple[int, str, str]:
    """(exit status, code, message) for an error that ends the command."""
    if isinstance(error, ServerError):
        return _describe_server_error(error, args)
    table: list[tuple[type | tuple[type, ...], int, str]] = [
        (WrongPassphrase, EXIT_AUTH, "WRONG_PASSPHRASE"),
        (AccountDeleted, EXIT_AUTH, "ACCOUNT_DELETED"),
        (AuthenticationFailed, EXIT_AUTH, "SESSION_EXPIRED"),
        ((ConnectFailed, RequestTimeout, ConnectionClosed), EXIT_NETWORK, "NETWORK"),
        ((IdentityChanged, SenderUnverified), EXIT_SECURITY, "IDENTITY_CHANGED"),
        (InvalidBundle, EXIT_SECURITY, "INVALID_KEY_BUNDLE"),
        (NoSuchContact, EXIT_NO_SUCH_USER, "NO_SUCH_CONTACT"),
        ((UsageError, UnusableUsername, SelfMessage, MessageTooLarge, ValueError), EXIT_ERROR, "USAGE"),
        ((NotRegistered, StateBusy, StateExists, RuntimeError), EXIT_ERROR, "STATE"),
    ]
    for kinds, status, code in table:
        if isinstance(error, kinds):
            message = str(error)
            if isinstance(error, WrongPassphrase):
                message = "wrong passphrase for the state file (or the file is damaged)"
            elif isinstance(error, InvalidBundle):
                message = f"the contact's key bundle does not verify: {error}"
            elif isinstance(error, (ConnectFailed, RequestTimeout, ConnectionClosed)):
                message = f"{error}{_queued_note(args)}"
            return status, code, message
    if isinstance(error, FileNotFoundError):
        return EXIT_ERROR, "NO_STATE", f"no state file at {error.filename}; register first (or pass --state)"
    return EXIT_ERROR, "ERROR", f"unexpected error: {type(error).__name__}: {error}"


def _describe_server_error(error: ServerError, args: argparse.Namespace) -> tuple[int, str, str]:
    if error.code == "INVALID_CREDENTIALS":
        return EXIT_AUTH, error.code, (
            f"wrong password, or there is no account {getattr(args, 'username', '')} on this server "
            "(it may have been deleted)"
        )
    if error.code in AUTH_CODES:
        return EXIT_AUTH, error.code, f"{error.message} ({error.code})"
    if error.code == "USER_NOT_FOUND":
        return EXIT_NO_SUCH_USER, error.code, "no account has that username"
    if error.code in NETWORK_CODES:
        return EXIT_NETWORK, error.code, f"the server could not do it now, try again later ({error.code}){_queued_note(args)}"
    if error.code in NOT_NOW_CODES:
        wait = f" for {error.retry_after:g} s" if error.retry_after else ""
        return EXIT_NETWORK, error.code, f"the server refuses this{wait}: {error.message} ({error.code}){_queued_note(args)}"
    return EXIT_ERROR, error.code, f"{error.message} ({error.code})"


def _queued_note(args: argparse.Namespace) -> str:
    if args.command != "send":
        return ""
    return "; the message waits in the outbox, and the next send or listen sends it"


# Commands, on the reactor


async def _run(reactor: Any, args: argparse.Namespace, inputs: dict[str, Any], output: Output) -> None:
    store = StateStore(inputs["state"], inputs["passphrase"], inputs["kdf"], inputs["known_key"])
    server = args.server or os.environ.get("CONSTRUCT_CHAT_SERVER")
    if server is None:
        # An account belongs to the server it was registered with.
        server = DEFAULT_SERVER if args.command == "register" else await store.read(lambda data: data["server"])
    address = ServerAddress.parse(server, inputs["trust"])
    messenger = Messenger(reactor, store, address, args.encoding)
    messenger.on_warning = output.warning
    messenger.on_status = output.status
    try:
        if args.command != "register":
            await messenger.open(inputs["keep"])
        await _command(reactor, args, inputs, output, messenger, str(address))
    finally:
        await messenger.close()


async def _command(
    reactor: Any, args: argparse.Namespace, inputs: dict[str, Any], output: Output, messenger: Messenger, server: str
) -> None:
    if args.command == "register":
        info = await messenger.register(server, inputs["username"], inputs["password"], inputs["keep"])
        output.result(
            f"Registered {info['username']} ({info['userId']}) on {server}.\n"
            f"Your keys are in {inputs['state']}: keep that file and its passphrase safe, they are your account.",
            {"event": "registered", "username": info["username"], "userId": info["userId"], "server": server},
        )
    elif args.command == "login":
        info = await messenger.login(inputs["username"], inputs["password"])
        output.result(
            f"Logged in as {info['username']}.",
            {"event": "loggedIn", "username": info["username"], "userId": info["userId"], "expires": info["expires"]},
        )
    elif args.command == "whoami":
        info = await messenger.whoami()
        output.result(
            f"{info['username']}\n  user id: {info['userId']}\n  server: {info['server']}\n"
            f"  session valid until: {_local_time(info['sessionExpires'])}\n"
            f"  identity key: {info['masterIdentityKey']}\n  history keeps: {info['keepMessages']} messages",
            info,
        )
    elif args.command == "send":
        sent = await messenger.send(inputs["username"], inputs["text"])
        output.result(
            f"Sent to {sent.username} ({sent.status}).",
            {"event": "sent", "id": sent.message_id, "to": sent.username, "toUserId": sent.user_id,
             "status": sent.status, "timestamp": sent.timestamp},
        )
    elif args.command == "listen":
        await _listen(reactor, args, output, messenger)
    elif args.command == "fingerprint":
        info = await messenger.safety_number(inputs["username"])
        output.result(
            f"Safety number with {info['username']}:\n{_grouped(info['safetyNumber'])}\n"
            f"Compare it with {info['username']} in person or over another channel; if it matches, "
            "nobody sits between you.",
            info,
        )
    elif args.command == "trust":
        await _trust(args, inputs, output, messenger)
    elif args.command == "history":
        for entry in await messenger.history(inputs["username"]):
            output.message(entry)
    elif args.command == "export":
        path = os.path.abspath(os.path.expanduser(args.file))
        count = await messenger.export(path)
        output.result(
            f"Wrote {path}: the account with its keys, contacts and {count} message(s), under this state file's "
            "passphrase.\nUse the account in one place at a time: once the key file is in use elsewhere, stop "
            f"using {inputs['state']} (two copies that both send break the conversations).",
            {"event": "exported", "path": path, "messages": count},
        )


def _grouped(number: str) -> str:
    groups = number.split(" ")
    return "\n".join("  " + " ".join(groups[i:i + 4]) for i in range(0, len(groups), 4))


async def _trust(args: argparse.Namespace, inputs: dict[str, Any], output: Output, messenger: Messenger) -> None:
    async def confirm(info: dict) -> bool:
        pinned = info["pinned"]
        if not output.as_json:
            if pinned is None:
                print(f"Nothing is pinned for {info['username']} yet.", file=sys.stderr)
            else:
                print(f"Pinned until now for {pinned['username']} (user id {pinned['userId']}):\n"
                      f"{_grouped(pinned['safetyNumber'])}", file=sys.stderr)
            print(f"The server now gives for {info['username']} (user id {info['userId']}):\n"
                  f"{_grouped(info['safetyNumber'])}\n"
                  f"Compare the new number with {info['username']} in person or over another channel.",
                  file=sys.stderr, flush=True)
        if args.yes:
            return True
        if output.as_json or not _terminal_available():
            raise UsageError(f"pass --yes to trust the new identity of {info['username']} without being asked")
        answer = await threads.deferToThread(_ask, f"Trust the new identity of {info['username']}? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    info = await messenger.trust(inputs["username"], confirm)
    record = {"event": "trust", "username": info["username"], "userId": info["userId"],
              "safetyNumber": info["safetyNumber"], "pinned": info["pinned"], "trusted": info["trusted"]}
    if not info["changed"]:
        output.result(f"Nothing to do: {info['username']} is already trusted with this identity.", record)
    elif info["trusted"]:
        output.result(f"Trusted: {info['username']} is now user id {info['userId']} with the new safety number.",
                      record)
    else:
        output.result(f"Nothing changed: {info['username']} keeps the identity pinned before.", record)


def _ask(question: str) -> str:
    with open("/dev/tty", "r+") as terminal:
        terminal.write(question)
        terminal.flush()
        return terminal.readline()


async def _listen(reactor: Any, args: argparse.Namespace, output: Output, messenger: Messenger) -> None:
    count = 1 if args.once else args.count

    def ready() -> None:
        if output.as_json:
            print(json.dumps({"event": "listening", "count": count}), file=sys.stderr, flush=True)
        else:
            print(f"Listening{'' if count is None else f' for {count} message(s)'}; Ctrl-C to stop.",
                  file=sys.stderr, flush=True)

    listening = defer.ensureDeferred(messenger.listen(output.message, count, ready))
    if args.timeout is None:
        await listening
        return
    listening.addTimeout(args.timeout, reactor)
    try:
        await listening
    except defer.TimeoutError:
        if count is not None:
            raise ListenTimeout(f"{count} message(s) did not arrive within {args.timeout:g} s") from None


async def _main(reactor: Any, args: argparse.Namespace, inputs: dict[str, Any], output: Output) -> None:
    running = defer.ensureDeferred(_run(reactor, args, inputs, output))
    interrupted: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        # Cancelled, the command closes its connection politely (and listen stops) on the way out.
        interrupted.append(signum)
        reactor.callFromThread(running.cancel)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        await running
    except defer.CancelledError:
        if not interrupted:
            raise
        how = "Ctrl-C" if interrupted[0] == signal.SIGINT else "SIGTERM"
        note = "; if the message was not sent yet, it waits in the outbox for the next send or listen"
        output.error("INTERRUPTED", f"stopped ({how}){note if args.command == 'send' else ''}")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except ListenTimeout as e:
        output.error("TIMEOUT", str(e))
        raise SystemExit(EXIT_TIMEOUT) from None
    except Exception as e:
        status, code, message = _describe_failure(e, args)
        output.error(code, message)
        raise SystemExit(status) from None


def main(argv: list[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    output = Output(args.json)
    try:
        inputs = _inputs(args)
    except (KeyboardInterrupt, EOFError):
        output.error("INTERRUPTED", "stopped (Ctrl-C)")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        status, code, message = _describe_failure(e, args)
        output.error(code, message)
        raise SystemExit(status) from None
    # Our warnings (such as "reconnecting") go to stderr, never stdout; the libraries' only when
    # they are errors.
    levels = LogLevelFilterPredicate(LogLevel.error)
    levels.setLogLevelForNamespace("construct", LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [levels])], redirectStandardIO=False
    )
    task.react(_main, (args, inputs, output))
