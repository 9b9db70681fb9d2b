"""`construct-chat`: chat from a terminal with end-to-end encryption, or script it.

    construct-chat [--server URL] [--state PATH] [--json] COMMAND ...

Commands: register USERNAME, login USERNAME, whoami, send USERNAME TEXT (TEXT "-" reads stdin),
listen [--count N] [--timeout S], fingerprint USERNAME, history USERNAME.

Secrets never come from the command line: the state file's passphrase from
CONSTRUCT_CHAT_PASSPHRASE or a prompt, the account password from CONSTRUCT_CHAT_PASSWORD or a
prompt. With --json every result is one JSON object per line on stdout, and an error one JSON
object on stderr.

Exit status: see EXIT_CODES.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from datetime import datetime
from typing import Any, NoReturn

from nacl import pwhash
from twisted.internet import defer, task
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from construct.client.account import IdentityChanged, NotRegistered, SenderUnverified
from construct.client.crypto import InvalidBundle, MessageTooLarge
from construct.client.messenger import Messenger, SelfMessage, UnusableUsername
from construct.client.state import KdfParams, WrongPassphrase
from construct.client.store import StateBusy, StateStore
from construct.client.transport import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionClosed,
    RequestTimeout,
    ServerAddress,
    ServerError,
)
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
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "bad usage, or any other error",
    EXIT_AUTH: "authentication: wrong passphrase or password, or the session is dead (log in again)",
    EXIT_NETWORK: "the server cannot be reached or is unavailable; a message being sent stays queued",
    EXIT_SECURITY: "a contact's identity key changed, or their key bundle does not verify",
    EXIT_NO_SUCH_USER: "no account has that username",
    EXIT_TIMEOUT: "listen --timeout passed before --count messages arrived",
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
        help=f"server address: ws://host:port/ws, wss://… or tcp://host:port (env CONSTRUCT_CHAT_SERVER; "
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


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())
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
    command("history", "show the messages exchanged with a contact").add_argument("username")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


# Input, before the reactor runs (prompts block)


def _secret(variable: str, prompt: str, confirm: bool) -> str:
    value = os.environ.get(variable)
    if value:
        return value
    if not _terminal_available():
        raise UsageError(f"set {variable} or run in a terminal to be asked for it")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != value:
        raise UsageError("the two entries differ")
    if not value:
        raise UsageError("an empty secret is not allowed")
    return value


def _terminal_available() -> bool:
    """getpass asks on the controlling terminal, which exists even when stdin is a pipe (`send -`)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR))
    except OSError:
        return sys.stdin.isatty()
    return True


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    state = os.path.expanduser(args.state or os.environ.get("CONSTRUCT_CHAT_STATE") or DEFAULT_STATE)
    creating = args.command == "register" and not os.path.exists(state)
    inputs: dict[str, Any] = {
        "state": state,
        "passphrase": _secret(
            "CONSTRUCT_CHAT_PASSPHRASE",
            "New passphrase for the state file: " if creating else f"Passphrase for {state}: ",
            confirm=creating,
        ),
    }
    if args.command in ("register", "login"):
        inputs["password"] = _secret(
            "CONSTRUCT_CHAT_PASSWORD", f"Password for {args.username}: ", confirm=args.command == "register"
        )
    if args.command == "send":
        text = sys.stdin.read() if args.text == "-" else args.text
        text = text[:-1] if args.text == "-" and text.endswith("\n") else text
        if not text:
            raise UsageError("the message is empty")
        inputs["text"] = text
    kdf_cost = args.kdf_cost or os.environ.get("CONSTRUCT_CHAT_KDF_COST") or "moderate"
    if kdf_cost not in KDF_COSTS:
        raise UsageError(f"CONSTRUCT_CHAT_KDF_COST must be one of {', '.join(sorted(KDF_COSTS))}")
    inputs["kdf"] = KDF_COSTS[kdf_cost]
    return inputs


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
            print(json.dumps(record, ensure_ascii=False), flush=True)
            return
        speaker = "me" if entry["direction"] == "out" else printable(name)
        if entry.get("status") in ("rejected", "undecryptable"):
            text = f"[{entry['status']}: {entry.get('reason', '')}]"
        body = printable(text).replace("\n", "\n    ")
        print(f"[{_local_time(entry.get('timestamp'))}] {speaker}: {body}", flush=True)


def _local_time(timestamp: Any) -> str:
    """The sender's clock, which may say anything."""
    try:
        return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def printable(text: str) -> str:
    return _UNPRINTABLE.sub("\N{REPLACEMENT CHARACTER}", text)


def _describe_failure(error: BaseException) -> tuple[int, str, str]:
    """(exit status, code, message) for an error that ends the command."""
    if isinstance(error, ServerError):
        if error.code in AUTH_CODES:
            return EXIT_AUTH, error.code, f"{error.message} ({error.code})"
        if error.code == "USER_NOT_FOUND":
            return EXIT_NO_SUCH_USER, error.code, "no account has that username"
        if error.code in NETWORK_CODES:
            return EXIT_NETWORK, error.code, f"the server could not do it now, try again later ({error.code})"
        return EXIT_ERROR, error.code, f"{error.message} ({error.code})"
    table: list[tuple[type | tuple[type, ...], int, str]] = [
        (WrongPassphrase, EXIT_AUTH, "WRONG_PASSPHRASE"),
        (AuthenticationFailed, EXIT_AUTH, "SESSION_EXPIRED"),
        ((ConnectFailed, RequestTimeout, ConnectionClosed), EXIT_NETWORK, "NETWORK"),
        ((IdentityChanged, SenderUnverified), EXIT_SECURITY, "IDENTITY_CHANGED"),
        (InvalidBundle, EXIT_SECURITY, "INVALID_KEY_BUNDLE"),
        ((UsageError, UnusableUsername, SelfMessage, MessageTooLarge, ValueError), EXIT_ERROR, "USAGE"),
        ((NotRegistered, StateBusy, RuntimeError), EXIT_ERROR, "STATE"),
    ]
    for kinds, status, code in table:
        if isinstance(error, kinds):
            message = str(error)
            if isinstance(error, WrongPassphrase):
                message = "wrong passphrase for the state file (or the file is damaged)"
            elif isinstance(error, InvalidBundle):
                message = f"the contact's key bundle does not verify: {error}"
            elif isinstance(error, MessageTooLarge):
                message = f"the message is too long: {error}"
            return status, code, message
    if isinstance(error, FileNotFoundError):
        return EXIT_ERROR, "NO_STATE", f"no state file at {error.filename}; register first (or pass --state)"
    return EXIT_ERROR, "ERROR", f"unexpected error: {type(error).__name__}: {error}"


# Commands, on the reactor


async def _run(reactor: Any, args: argparse.Namespace, inputs: dict[str, Any], output: Output) -> None:
    store = StateStore(inputs["state"], inputs["passphrase"], inputs["kdf"])
    server = args.server or os.environ.get("CONSTRUCT_CHAT_SERVER")
    if server is None:
        # An account belongs to the server it was registered with.
        server = DEFAULT_SERVER if args.command == "register" else await store.read(lambda data: data["server"])
    address = ServerAddress.parse(server)
    messenger = Messenger(reactor, store, address, args.encoding)
    messenger.on_warning = output.warning
    try:
        await _command(reactor, args, inputs, output, messenger, str(address))
    finally:
        await messenger.close()


async def _command(
    reactor: Any, args: argparse.Namespace, inputs: dict[str, Any], output: Output, messenger: Messenger, server: str
) -> None:
    if args.command == "register":
        info = await messenger.register(server, args.username, inputs["password"])
        output.result(
            f"Registered {info['username']} ({info['userId']}) on {server}.\n"
            f"Your keys are in {inputs['state']}: keep that file and its passphrase safe, they are your account.",
            {"event": "registered", "username": info["username"], "userId": info["userId"], "server": server},
        )
    elif args.command == "login":
        info = await messenger.login(args.username, inputs["password"])
        output.result(
            f"Logged in as {info['username']}.",
            {"event": "loggedIn", "username": info["username"], "userId": info["userId"], "expires": info["expires"]},
        )
    elif args.command == "whoami":
        info = await messenger.whoami()
        output.result(
            f"{info['username']}\n  user id: {info['userId']}\n  server: {info['server']}\n"
            f"  session valid until: {_local_time(info['sessionExpires'])}\n"
            f"  identity key: {info['masterIdentityKey']}",
            info,
        )
    elif args.command == "send":
        sent = await messenger.send(args.username, inputs["text"])
        output.result(
            f"Sent to {sent.username} ({sent.status}).",
            {"event": "sent", "id": sent.message_id, "to": sent.username, "toUserId": sent.user_id,
             "status": sent.status, "timestamp": sent.timestamp},
        )
    elif args.command == "listen":
        await _listen(reactor, args, output, messenger)
    elif args.command == "fingerprint":
        info = await messenger.safety_number(args.username)
        groups = info["safetyNumber"].split(" ")
        lines = "\n".join("  " + " ".join(groups[i:i + 4]) for i in range(0, len(groups), 4))
        output.result(
            f"Safety number with {info['username']}:\n{lines}\n"
            f"Compare it with {info['username']} in person or over another channel; if it matches, "
            "nobody sits between you.",
            info,
        )
    elif args.command == "history":
        for entry in await messenger.history(args.username):
            output.message(entry)


async def _listen(reactor: Any, args: argparse.Namespace, output: Output, messenger: Messenger) -> None:
    count = 1 if args.once else args.count
    if not output.as_json:
        print(f"Listening{'' if count is None else f' for {count} message(s)'}; Ctrl-C to stop.", file=sys.stderr,
              flush=True)
    listening = defer.ensureDeferred(messenger.listen(output.message, count))
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
    try:
        await _run(reactor, args, inputs, output)
    except ListenTimeout as e:
        output.error("TIMEOUT", str(e))
        raise SystemExit(EXIT_TIMEOUT) from None
    except Exception as e:
        status, code, message = _describe_failure(e)
        output.error(code, message)
        raise SystemExit(status) from None


def main(argv: list[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    output = Output(args.json)
    try:
        inputs = _inputs(args)
    except UsageError as e:
        output.error("USAGE", str(e))
        raise SystemExit(EXIT_ERROR) from None
    except (KeyboardInterrupt, EOFError):
        raise SystemExit(EXIT_ERROR) from None
    # Our warnings (such as "reconnecting") go to stderr, never stdout; the libraries' only when
    # they are errors.
    levels = LogLevelFilterPredicate(LogLevel.error)
    levels.setLogLevelForNamespace("construct", LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [levels])], redirectStandardIO=False
    )
    task.react(_main, (args, inputs, output))
