"""`construct-chat` as a newcomer meets it: the real command against a real server process.

Each test walks one of the ways the client used to hang, lose a message or say the wrong thing:
a server that is down or restarts, a username taken over by another account, a mistyped
passphrase or weak password, Ctrl-C, a deleted account, TLS on the raw TCP listener.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import PASSWORD
from tests.processes import REPO, ServerProcess, process_env
from tests.test_chat_e2e import PASSPHRASE, Chat
from tests.test_tls import make_certificates

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FixedPortServer(ServerProcess):
    """An embedded server on ports that stay the same across a restart (clients keep their URL)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.fixed = {name: free_port() for name in ("http", "tcp", "health")}
        super().__init__(
            tmp_path, "--data-dir", "data", "--bcrypt-cost", "4",
            "--listen", f"tcp:{self.fixed['http']}:interface=127.0.0.1",
            "--tcp", f"tcp:{self.fixed['tcp']}:interface=127.0.0.1",
            "--health", f"tcp:{self.fixed['health']}:interface=127.0.0.1", *args,
        )

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.fixed['http']}/ws"


def error(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stderr.strip().splitlines()[-1])["error"]


def listening(chat: Chat, *args: str) -> subprocess.Popen:
    """`listen` in the background; returns once it is connected and listening."""
    command = [sys.executable, "-m", "construct.client", "--server", chat.server, "--state", str(chat.state),
               *args, "listen"]
    process = subprocess.Popen(command, env=chat.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    assert "istening" in process.stderr.readline()
    return process


def finished(process: subprocess.Popen, timeout: float = 20) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def test_a_message_sent_while_the_server_is_down_waits_and_a_listener_rides_out_the_restart(tmp_path):
    """`send` with the server down exits 3 and keeps the message; after the restart the next send
    delivers both, in order, to a listener that stayed up: it reconnected and said so."""
    server = FixedPortServer(tmp_path).start()
    # Bob on TCP: a server stopping with WebSockets open waits for their close handshakes.
    alice, bob = Chat(tmp_path, "alice", server.ws), Chat(tmp_path, "bob", f"tcp://127.0.0.1:{server.fixed['tcp']}")
    try:
        alice.ok("register", "alice")
        bob.ok("register", "bob")
        listener = listening(bob, "--json")
        server.stop()
        down = alice.run("send", "bob", "written while the server was down")
        assert down.returncode == 3 and "waits in the outbox" in error(down)["message"], down.stderr
        history = alice.ok("history", "bob")
        assert [(m["text"], m["status"]) for m in history] == [("written while the server was down", "pending")]
        server.start()
        assert alice.ok("send", "bob", "written after")[0]["status"] == "sealed"
        received = [json.loads(listener.stdout.readline())["text"] for _ in range(2)]
        assert received == ["written while the server was down", "written after"]
        assert [(m["text"], m["status"]) for m in alice.ok("history", "bob")] == [
            ("written while the server was down", "sent"), ("written after", "sent")
        ]
        listener.send_signal(signal.SIGINT)
        status, _, stderr = finished(listener)
        events = [json.loads(line).get("event") for line in stderr.splitlines() if line.startswith("{")]
        assert status == 130 and "connectionLost" in events and "reconnected" in events, stderr
    finally:
        server.stop()


def test_register_and_login_check_what_they_can_before_asking_more(tmp_path):
    """Bad usernames, weak passwords and existing state files are refused before any prompt
    or network call, and a failed registration leaves no state file; a wrong passphrase is
    said before the password is asked for."""
    unreachable = Chat(tmp_path, "alice", "ws://127.0.0.1:1/ws")
    unreachable.env["CONSTRUCT_CHAT_PASSWORD"] = "weakpassword"
    weak = unreachable.run("register", "alice")
    assert (weak.returncode, error(weak)["code"]) == (1, "USAGE") and "upper-case" in error(weak)["message"]
    assert not unreachable.state.exists()
    bad_name = unreachable.run("register", "a")
    assert bad_name.returncode == 1 and "not a username" in error(bad_name)["message"]

    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    try:
        alice = Chat(tmp_path, "alice", f"ws://127.0.0.1:{server.ports['http']}/ws")
        alice.ok("register", "alice")
        again = alice.run("register", "alice")
        assert again.returncode == 1 and "already exists" in error(again)["message"]
        taken = Chat(tmp_path, "alice-again", alice.server)
        refused = taken.run("register", "alice")
        assert (refused.returncode, error(refused)["code"]) == (1, "USERNAME_TAKEN")
        assert not taken.state.exists() and not Path(f"{taken.state}.history").exists()

        alice.env["CONSTRUCT_CHAT_PASSPHRASE"] = "not the passphrase"
        del alice.env["CONSTRUCT_CHAT_PASSWORD"]
        wrong = alice.run("login", "alice")
        assert (wrong.returncode, error(wrong)["code"]) == (2, "WRONG_PASSPHRASE")
        alice.env["CONSTRUCT_CHAT_PASSPHRASE"] = PASSPHRASE
        alice.env["CONSTRUCT_CHAT_PASSWORD"] = "Wrong-password-42"
        bad_password = alice.run("login", "alice")
        assert bad_password.returncode == 2 and "it may have been deleted" in error(bad_password)["message"]
    finally:
        server.stop()


def test_a_reused_username_is_an_identity_change_until_trust(tmp_path):
    """Bob's account is deleted and someone registers `bob` again: Alice's `send bob` exits 4
    (not "sent" to the newcomer), the newcomer's messages are refused, until `trust bob` has
    shown both safety numbers and been confirmed."""
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    try:
        url = f"ws://127.0.0.1:{server.ports['http']}/ws"
        alice, bob = Chat(tmp_path, "alice", url), Chat(tmp_path, "bob", url)
        alice.ok("register", "alice")
        bob.ok("register", "bob")
        alice.ok("send", "bob", "for the real bob")
        assert [m["text"] for m in bob.ok("listen", "--once", "--timeout", "30")] == ["for the real bob"]
        pinned = alice.ok("fingerprint", "bob")[0]["safetyNumber"]
        deleted = subprocess.run(
            [sys.executable, "-m", "construct.admin", "user", "delete", "--yes", "bob"], cwd=tmp_path,
            env=process_env(CONSTRUCT_DATA_DIR=str(tmp_path / "data")), capture_output=True, text=True, timeout=30,
        )
        assert deleted.returncode == 0, deleted.stderr
        newcomer = Chat(tmp_path, "newcomer", url)
        newcomer.ok("register", "bob")

        refused = alice.run("send", "bob", "meant for the real bob")
        assert (refused.returncode, error(refused)["code"]) == (4, "IDENTITY_CHANGED"), refused.stderr
        assert "construct-chat trust bob" in error(refused)["message"]
        assert newcomer.ok("send", "alice", "hi, I am bob")
        quiet = alice.run("listen", "--once", "--timeout", "4")
        assert quiet.returncode == 6 and "trust bob" in quiet.stderr and quiet.stdout == ""

        unconfirmed = alice.run("trust", "bob")
        assert unconfirmed.returncode == 1 and "--yes" in error(unconfirmed)["message"]
        trusted = alice.ok("trust", "bob", "--yes")[0]
        assert trusted["trusted"] and trusted["pinned"]["safetyNumber"] == pinned
        assert trusted["safetyNumber"] != pinned and trusted["userId"] != trusted["pinned"]["userId"]
        assert alice.ok("send", "bob", "welcome, new bob")[0]["status"] == "sealed"
        # The first message the newcomer ever gets: nothing meant for the real bob reached them.
        assert [m["text"] for m in newcomer.ok("listen", "--once", "--timeout", "30")] == ["welcome, new bob"]
        history = [(m["text"], m["status"]) for m in alice.ok("history", "bob")]
        assert history == [("for the real bob", "sent"), ("meant for the real bob", "failed"),
                           ("welcome, new bob", "sent")]
    finally:
        server.stop()


def test_what_the_listener_says_when_stopped_or_when_the_account_goes(tmp_path):
    """Ctrl-C stops `listen` with exit 130 and says so (no "reconnecting"); a deleted account
    ends it with exit 2 saying the account is gone; history of a stranger and sending to
    oneself are refused with a reason."""
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    try:
        url = f"tcp://127.0.0.1:{server.ports['tcp']}"
        bob = Chat(tmp_path, "bob", url)
        bob.ok("register", "bob")
        unknown = bob.run("history", "carol")
        assert (unknown.returncode, error(unknown)["code"]) == (5, "NO_SUCH_CONTACT")
        itself = Chat(tmp_path, "bob", "ws://127.0.0.1:1/ws").run("send", "bob", "note to self")
        assert itself.returncode == 1 and "yourself" in error(itself)["message"]

        listener = listening(bob)
        listener.send_signal(signal.SIGINT)
        status, _, stderr = finished(listener)
        assert status == 130 and "stopped (Ctrl-C)" in stderr and "reconnecting" not in stderr, stderr

        listener = listening(bob)
        with socket.create_connection(("127.0.0.1", server.ports["tcp"]), timeout=10) as raw:
            lines = raw.makefile("rw")
            for request in ({"type": "login", "payload": {"username": "bob", "password": PASSWORD}},
                            {"type": "deleteAccount", "payload": {"password": PASSWORD}}):
                lines.write(json.dumps(request) + "\n")
                lines.flush()
                assert json.loads(lines.readline())["type"] in ("loginSuccess", "accountDeleted")
        status, _, stderr = finished(listener)
        assert status == 2 and "the account was deleted" in stderr, stderr
    finally:
        server.stop()


def test_tcps_speaks_json_lines_over_verified_tls(tmp_path):
    """tcps:// with --ca-file reaches a TLS TCP listener; a client that does not trust its CA is refused."""
    ca_pem, other_ca_pem = make_certificates(tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "other.pem").write_bytes(other_ca_pem)
    tls = f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'server.key'}:certKey={tmp_path / 'server.crt'}"
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4", "--tcp", tls).start()
    try:
        url = f"tcps://localhost:{server.ports['tcp']}"
        alice, bob = Chat(tmp_path, "alice", url), Chat(tmp_path, "bob", url)
        for chat in (alice, bob):
            chat.env["CONSTRUCT_CHAT_CA_FILE"] = str(tmp_path / "ca.pem")
            chat.ok("register", chat.name)
        assert alice.ok("send", "bob", "over TLS")[0]["status"] == "sealed"
        assert [m["text"] for m in bob.ok("listen", "--once", "--timeout", "30")] == ["over TLS"]
        bob.env["CONSTRUCT_CHAT_CA_FILE"] = str(tmp_path / "other.pem")
        untrusted = bob.run("listen", "--once", "--timeout", "30")
        assert untrusted.returncode == 3 and "certificate verify failed" in untrusted.stderr
    finally:
        server.stop()


README = REPO / "README.md"


def _sh_blocks(section: str) -> list[list[str]]:
    """The ```sh blocks of a README section, each as its command lines."""
    text = README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [[line for line in block.split("```", 1)[0].splitlines() if line.strip()]
            for block in text.split("```sh\n")[1:]]


class Terminal:
    """One terminal of the README: its shell lines run one by one with the exports made so far."""

    def __init__(self, tmp_path: Path, env: dict) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.exports: list[str] = []

    def script(self, line: str) -> list[str]:
        if line.startswith("export "):
            self.exports.append(line)
        return ["bash", "-c", "\n".join(["set -e", *self.exports, line])]

    def run(self, line: str, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(self.script(line), env=self.env, cwd=self.tmp_path, capture_output=True, text=True,
                                timeout=timeout, start_new_session=True)
        assert result.returncode == 0, (line, result.returncode, result.stdout, result.stderr)
        return result

    def start(self, line: str) -> subprocess.Popen:
        return subprocess.Popen(self.script(line), env=self.env, cwd=self.tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)


def _interrupt(process: subprocess.Popen) -> tuple[str, str]:
    """Ctrl-C, as a terminal sends it: to the whole foreground process group."""
    os.killpg(process.pid, signal.SIGINT)
    return process.communicate(timeout=30)


def test_the_readme_walkthrough_works_across_a_server_restart(tmp_path):
    """The README's commands, literally: the server, Bob's terminal (register, listen), the
    server restarted while Bob listens, Alice's terminal (register, send), Bob's answer and
    Alice's listen, and both fingerprints."""
    ports = {name: free_port() for name in ("LISTEN", "TCP", "HEALTH")}
    env = process_env(
        HOME=str(tmp_path), CONSTRUCT_CHAT_PASSPHRASE=PASSPHRASE, CONSTRUCT_CHAT_PASSWORD=PASSWORD,
        CONSTRUCT_CHAT_KDF_COST="interactive", CONSTRUCT_CHAT_SERVER=f"ws://127.0.0.1:{ports['LISTEN']}/ws",
        CONSTRUCT_BCRYPT_COST="4", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **{f"CONSTRUCT_{name}": f"tcp:{port}:interface=127.0.0.1" for name, port in ports.items()},
    )
    (install_and_run,) = _sh_blocks("Install and run")
    assert install_and_run[1] == "twistd -n construct"
    bob_lines, alice_lines, _ = _sh_blocks("Chatting from the terminal")
    prose = README.read_text()
    for said in ('construct-chat send alice "Hi!"', "construct-chat listen", "construct-chat fingerprint alice",
                 "construct-chat fingerprint bob", "`[2026-03-01 09:30:00] alice: Hi Bob, it's Alice`", "reconnected"):
        assert said in prose

    server_terminal = Terminal(tmp_path, env)
    server = server_terminal.start(install_and_run[1])
    _wait_for_port(ports["LISTEN"])
    bob, alice = Terminal(tmp_path, dict(env)), Terminal(tmp_path, dict(env))
    try:
        assert [line.split("#")[0].strip() for line in bob_lines[1:]] == ["construct-chat register bob",
                                                                           "construct-chat listen"]
        bob.run(bob_lines[0])
        assert "Registered bob" in bob.run(bob_lines[1]).stdout
        bob_listening = bob.start(bob_lines[2])
        assert "Listening" in bob_listening.stderr.readline()

        # The server restarts while Bob listens.
        _interrupt(server)
        server = server_terminal.start(install_and_run[1])
        _wait_for_port(ports["LISTEN"])

        alice.run(alice_lines[0])
        assert "Registered alice" in alice.run(alice_lines[1]).stdout
        assert "Sent to bob" in alice.run(alice_lines[2]).stdout
        shown = bob_listening.stdout.readline()
        assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] alice: Hi Bob, it's Alice\n", shown), shown
        _, bob_said = _interrupt(bob_listening)
        assert "reconnected" in bob_said, bob_said

        bob.run('construct-chat send alice "Hi!"')
        alice_listening = alice.start("construct-chat listen")
        assert "Listening" in alice_listening.stderr.readline()
        assert alice_listening.stdout.readline().endswith("] bob: Hi!\n")
        _interrupt(alice_listening)
        numbers = [re.findall(r"\d{5}", terminal.run(f"construct-chat fingerprint {name}").stdout)
                   for terminal, name in ((alice, "bob"), (bob, "alice"))]
        assert len(numbers[0]) == 12 and numbers[0] == numbers[1]
    finally:
        if server.poll() is None:
            _interrupt(server)


def _wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
