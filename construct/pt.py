"""Tor's pluggable-transport managed-proxy protocol: running obfs4proxy from Twisted.

The parent says what it wants in `TOR_PT_*` environment variables and the proxy answers one
line at a time on its stdout: `VERSION 1`, then one `SMETHOD` (server) or `CMETHOD` (client)
line per transport it opened, or `SMETHOD-ERROR`/`CMETHOD-ERROR`, then `SMETHODS DONE` or
`CMETHODS DONE`; `ENV-ERROR` and `VERSION-ERROR` report a bad environment. With
`TOR_PT_EXIT_ON_STDIN_CLOSE=1` the proxy exits when its stdin closes, so it never outlives
its parent, however the parent ends. Both the server (`construct.obfs4`) and the reference
client (`construct.client.obfs4`) use this module.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

OBFS4 = "obfs4"
PROTOCOL_VERSION = "1"
# The most of a proxy's stderr one log event carries.
STDERR_EXCERPT = 500
# Lines the proxy writes that say its setup failed.
ERROR_KEYWORDS = ("ENV-ERROR", "VERSION-ERROR", "SMETHOD-ERROR", "CMETHOD-ERROR", "PROXY-ERROR")

_UNESCAPED_COMMA = re.compile(r"(?<!\\),")


def find_executable(name: str) -> str | None:
    """The proxy's path: `name` itself if it is a path to an executable, else looked up on PATH."""
    return shutil.which(name)


def base_environment(state_dir: str) -> dict[str, str]:
    """What every managed proxy gets, and nothing else: none of the parent's settings or secrets."""
    env = {
        "TOR_PT_MANAGED_TRANSPORT_VER": PROTOCOL_VERSION,
        "TOR_PT_STATE_LOCATION": state_dir,
        "TOR_PT_EXIT_ON_STDIN_CLOSE": "1",
    }
    for name in ("PATH", "LANG", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def escape(value: str) -> str:
    """A value for the proxy's k=v lists, where `\\`, `=`, `;` and `,` are backslash-escaped."""
    return re.sub(r"([\\=;,])", r"\\\1", value)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def socks_arguments(args: dict[str, str]) -> str:
    """Per-connection arguments as a client hands them to the proxy (in the SOCKS5 credentials)."""
    return ";".join(f"{escape(key)}={escape(value)}" for key, value in args.items())


def parse_method_options(text: str) -> dict[str, str]:
    """The `ARGS:` of an SMETHOD line, `cert=…,iat-mode=0`, as a dict."""
    options: dict[str, str] = {}
    for item in _UNESCAPED_COMMA.split(text):
        key, equals, value = item.partition("=")
        if equals:
            options[_unescape(key)] = _unescape(value)
    return options


def split_address(text: str) -> tuple[str, int]:
    """`127.0.0.1:443` or `[::1]:443` as (host, port)."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"not an address: {text!r}")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ManagedProxy(ProcessProtocol):
    """One proxy process: each stdout line to `on_line(keyword, words)`, its end to `on_ended`."""

    log = Logger()

    def __init__(self, name: str, on_line: Callable[[str, list[str]], None], on_ended: Callable[[Failure], None]) -> None:
        self.name = name
        self._on_line = on_line
        self._on_ended = on_ended
        self._partial = b""
        self._waiting: list[Deferred] = []
        self.ended = False

    @property
    def pid(self) -> int | None:
        return None if self.transport is None else self.transport.pid

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            words = line.decode("utf-8", "replace").strip().split(" ")
            if not words[0]:
                continue
            try:
                self._on_line(words[0], words[1:])
            except Exception:
                self.log.failure("handling a line of {name} failed", name=self.name)

    def errReceived(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace").strip()
        if text:
            self.log.warn("{name}: {text}", name=self.name, text=text[:STDERR_EXCERPT])

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        try:
            self._on_ended(reason)
        except Exception:
            self.log.failure("handling the end of {name} failed", name=self.name)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    async def stop(self, clock: Any, timeout: float) -> None:
        """Ask it to exit (it watches its stdin), kill it if it has not after `timeout`, and wait."""
        if self.ended or self.transport is None:
            return
        ended: Deferred = Deferred()
        self._waiting.append(ended)
        self.transport.closeStdin()
        timer = clock.callLater(timeout, self.kill)
        await ended
        if timer.active():
            timer.cancel()

    def kill(self) -> None:
        if not self.ended and self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except Exception:  # it ended meanwhile
                pass


def spawn(reactor: Any, executable: str, env: dict[str, str], proxy: ManagedProxy) -> None:
    reactor.spawnProcess(proxy, executable, [executable], env=env)


def exit_description(reason: Failure) -> str:
    value = reason.value
    if getattr(value, "signal", None):
        return f"killed by signal {value.signal}"
    return f"exit status {getattr(value, 'exitCode', '?')}"
