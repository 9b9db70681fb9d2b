"""`--obfs4`: obfs4proxy as a managed server transport in front of the TCP or WebSocket listener.

    client --obfs4--> obfs4proxy (--obfs4 address) --Extended ORPort--> this process (loopback)

The service opens a loopback port speaking the Extended ORPort (construct.protocol.extorport)
for the listener's factory, then runs obfs4proxy with the pluggable-transport environment:
bind address, transport options (`iat-mode`), the handover port and its cookie file, and a state
directory under the data directory. obfs4proxy keeps its identity keys there, so the bridge line
it prints (`SMETHOD obfs4 <address> ARGS:cert=…,iat-mode=…`) is the same after every restart.
The service logs the line, writes it as a client address (`obfs4://host:port?cert=…&iat-mode=…`)
to `<data-dir>/obfs4/bridge-line.txt`, and restarts obfs4proxy if it dies.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct import pt
from construct.protocol.extorport import ExtOrPortFactory, write_cookie_file

STATE_DIRECTORY = "obfs4"
BRIDGE_LINE_FILE = "bridge-line.txt"
COOKIE_FILE = "extended-orport-cookie"
# Restarts of a proxy that keeps dying wait longer each time, up to this.
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
# A proxy that ran this long was healthy: its next death restarts it at the shortest delay.
STABLE_SECONDS = 60.0
STOP_TIMEOUT = 5.0
# Written in the bridge line when obfs4proxy listens on every interface: only the operator
# knows the address clients reach the server at.
PUBLIC_ADDRESS = "<ADDRESS>"
_ENDPOINT_SEPARATOR = re.compile(r"(?<!\\):")


@dataclass(frozen=True)
class BindAddress:
    """Where obfs4proxy listens, from an endpoint string: `tcp:PORT[:interface=IP]` or `tcp6:…`."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "BindAddress":
        parts = [part.replace("\\:", ":") for part in _ENDPOINT_SEPARATOR.split(text.strip())]
        kind, positional, named = parts[0], [], {}
        for part in parts[1:]:
            key, equals, value = part.partition("=")
            if equals:
                named[key] = value
            else:
                positional.append(part)
        port = named.pop("port", positional[0] if positional else "")
        host = named.pop("interface", "::" if kind == "tcp6" else "0.0.0.0")
        if kind not in ("tcp", "tcp6") or not port.isdigit() or not 0 <= int(port) <= 65535 or named or positional[1:]:
            raise ValueError(f"must be tcp:PORT or tcp:PORT:interface=IP (obfs4proxy listens itself), not {text!r}")
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            raise ValueError(f"interface must be an IP address, not {host!r}") from None
        if (version == 6) != (kind == "tcp6"):
            raise ValueError(f"use tcp6: with an IPv6 interface and tcp: with an IPv4 one, not {text!r}")
        return cls(host, int(port))

    def at_port(self, port: int) -> "BindAddress":
        return BindAddress(self.host, port)

    def __str__(self) -> str:
        return pt.join_address(self.host, self.port)


@dataclass(frozen=True)
class Bridge:
    """What a client needs: where obfs4proxy listens, its certificate and its timing mode."""

    host: str
    port: int
    cert: str
    iat_mode: str

    def url(self) -> str:
        """The `--server` a client gives construct-chat (the reference client parses this form)."""
        public = PUBLIC_ADDRESS if ipaddress.ip_address(self.host).is_unspecified else self.host
        host = f"[{public}]" if ":" in public else public
        return f"obfs4://{host}:{self.port}?cert={self.cert}&iat-mode={self.iat_mode}"


def bridge_from_smethod(words: list[str]) -> Bridge:
    """`obfs4 127.0.0.1:8443 ARGS:cert=…,iat-mode=0` (the words after SMETHOD) as a Bridge."""
    if len(words) < 3 or not words[2].startswith("ARGS:"):
        raise ValueError(f"an SMETHOD line without the bridge's arguments: {' '.join(words)!r}")
    host, port = pt.split_address(words[1])
    options = pt.parse_method_options(words[2][len("ARGS:"):])
    if "cert" not in options:
        raise ValueError("an SMETHOD line without cert=")
    return Bridge(host, port, options["cert"], options.get("iat-mode", "0"))


class Obfs4Service(Service):
    """Runs and watches obfs4proxy for one listener's factory."""

    log = Logger()

    def __init__(
        self, reactor: Any, executable: str, bind: BindAddress, state_dir: str, iat_mode: int, target: Any,
    ) -> None:
        """`target`: the factory obfs4 clients reach (the TCP JSON-lines factory or the HTTP site)."""
        self._reactor = reactor
        self._executable = executable
        self._bind = bind
        self._state_dir = state_dir
        self._iat_mode = iat_mode
        self._target = target
        self._port: Any = None
        self._proxy: pt.ManagedProxy | None = None
        self._started_at = 0.0
        self._failures = 0
        self._restart: Any = None

    def startService(self) -> None:
        super().startService()
        # Once, at startup, before anything is served: the directory for the proxy's keys and the
        # cookie it authenticates with (a new one per run; the proxy rereads it per connection).
        os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
        self._cookie_path = os.path.join(self._state_dir, COOKIE_FILE)
        cookie = write_cookie_file(self._cookie_path)
        handover = ExtOrPortFactory(self._target, cookie, self._reactor)
        endpoint = TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1")
        endpoint.listen(handover).addCallbacks(self._handover_listening, self._handover_failed)

    def _handover_listening(self, port: Any) -> None:
        self._port = port
        if self.running:
            self._spawn()

    def _handover_failed(self, failure: Failure) -> None:
        self.log.error("obfs4 cannot open its loopback handover port: {error}", error=failure.value)

    def _environment(self) -> dict[str, str]:
        env = pt.base_environment(self._state_dir)
        env.update({
            "TOR_PT_SERVER_TRANSPORTS": pt.OBFS4,
            "TOR_PT_SERVER_BINDADDR": f"{pt.OBFS4}-{self._bind}",
            "TOR_PT_SERVER_TRANSPORT_OPTIONS": f"{pt.OBFS4}:iat-mode={self._iat_mode}",
            "TOR_PT_EXTENDED_SERVER_PORT": f"127.0.0.1:{self._port.getHost().port}",
            "TOR_PT_AUTH_COOKIE_FILE": self._cookie_path,
        })
        return env

    def _spawn(self) -> None:
        self._restart = None
        self._proxy = pt.ManagedProxy("obfs4proxy", self._line, self._proxy_ended)
        self._started_at = self._reactor.seconds()
        try:
            pt.spawn(self._reactor, self._executable, self._environment(), self._proxy)
        except OSError as e:
            self.log.error("obfs4proxy could not be started: {error}", error=e)
            self._proxy = None
            self._schedule_restart()
            return
        self.log.info("obfs4proxy started (pid {pid})", pid=self._proxy.pid)

    def _line(self, keyword: str, words: list[str]) -> None:
        if keyword == "SMETHOD" and words[:1] == [pt.OBFS4]:
            self._serving(bridge_from_smethod(words))
        elif keyword in pt.ERROR_KEYWORDS:
            self.log.error("obfs4proxy: {keyword} {detail}", keyword=keyword, detail=" ".join(words))

    def _serving(self, bridge: Bridge) -> None:
        # Port 0 asked for any port: a restarted proxy keeps the one it got, and the bridge line with it.
        self._bind = self._bind.at_port(bridge.port)
        self.log.info("obfs4 listening on {host}:{port}", host=bridge.host, port=bridge.port)
        self.log.info("obfs4 bridge line: {url}", url=bridge.url())
        path = os.path.join(self._state_dir, BRIDGE_LINE_FILE)
        deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _write_text, path, bridge.url() + "\n") \
            .addErrback(lambda failure: self.log.error("cannot write {path}: {error}", path=path, error=failure.value))

    def _proxy_ended(self, reason: Failure) -> None:
        self._proxy = None
        if not self.running:
            return  # stopped by stopService
        self.log.warn("obfs4proxy ended ({how}); restarting it", how=pt.exit_description(reason))
        if self._reactor.seconds() - self._started_at >= STABLE_SECONDS:
            self._failures = 0
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        if not self.running:
            return
        delay = RESTART_DELAYS[min(self._failures, len(RESTART_DELAYS) - 1)]
        self._failures += 1
        self._restart = self._reactor.callLater(delay, self._spawn)

    def stopService(self) -> Any:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """After the listeners' connections were closed: stop the handover port, then the proxy."""
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        if self._port is not None:
            await maybeDeferred(self._port.stopListening)
        if self._proxy is not None:
            await self._proxy.stop(self._reactor, STOP_TIMEOUT)


def _write_text(path: str, text: str) -> None:
    with open(path + ".new", "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(path + ".new", path)
