"""What the censorship-resistance features cost: obfs4 against plain TCP, padded WebSocket against plain.

    construct-bench obfs4 --pairs 10 --duration 10          # TCP direct, through a tunnel, through obfs4
    construct-bench obfs4 --rate 1000 --no-direct           # latency at a fixed rate
    construct-bench ws-padding --pairs 10 --duration 10     # ws-msgpack with and without --ws-padding

The load generator speaks only plain TCP and WebSocket, so obfs4 is reached through a `Tunnel`:
a loopback port in this process that forwards each connection through obfs4proxy in client
mode to the server's `--obfs4` port. The same tunnel forwarding to the plain TCP port is the
baseline that tells obfs4's cost from the tunnel's, and its byte counts give the bytes on the
wire per message. Each run starts its own server (`--server embedded` or `production`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from twisted.internet import task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from construct.bench import report
from construct.bench.clients import BenchError, Target
from construct.bench.report import load_figures
from construct.bench.scenarios import LoadOptions, _report as scenario_report
from construct.bench.server import LOOPBACK, RunningServer, ServerPlan, construct_servers
from construct.bench.wire import TCP, WS_MSGPACK
from construct.bench.workers import run_load
from construct.client.obfs4 import ClientProxy, Obfs4Address, Obfs4Endpoint
from construct.obfs4 import BRIDGE_LINE_FILE, STATE_DIRECTORY

SCENARIOS = ("obfs4", "ws-padding")
CONNECT_TIMEOUT = 30
BRIDGE_TIMEOUT = 10


@dataclass
class Passage:
    """One forwarded connection: bytes each way, and the first `keep` of them."""

    keep: int
    upstream: int = 0
    downstream: int = 0
    first_up: bytearray = field(default_factory=bytearray)
    first_down: bytearray = field(default_factory=bytearray)

    def went_up(self, data: bytes) -> None:
        self.upstream += len(data)
        self.first_up += data[: max(0, self.keep - len(self.first_up))]

    def came_down(self, data: bytes) -> None:
        self.downstream += len(data)
        self.first_down += data[: max(0, self.keep - len(self.first_down))]


class _Outbound(Protocol):
    def __init__(self, inbound: "_Inbound") -> None:
        self._inbound = inbound

    def dataReceived(self, data: bytes) -> None:
        self._inbound.passage.came_down(data)
        self._inbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self._inbound.transport.loseConnection()


class _Inbound(Protocol):
    outbound: Any = None

    def __init__(self, tunnel: "Tunnel") -> None:
        self._tunnel = tunnel
        self.passage = Passage(tunnel.keep)
        self._early: list[bytes] = []

    def connectionMade(self) -> None:
        self._tunnel.passages.append(self.passage)
        connecting = self._tunnel.endpoint.connect(Factory.forProtocol(lambda: _Outbound(self)))
        connecting.addCallbacks(self._connected, lambda failure: self.transport.abortConnection())

    def _connected(self, outbound: Any) -> None:
        self.outbound = outbound
        # Each side stops reading while the other cannot keep up.
        self.transport.registerProducer(outbound.transport, True)
        outbound.transport.registerProducer(self.transport, True)
        for data in self._early:
            self._forward(data)
        self._early = []

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is None:
            self._early.append(data)
        else:
            self._forward(data)

    def _forward(self, data: bytes) -> None:
        self.passage.went_up(data)
        self.outbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.outbound is not None:
            self.outbound.transport.loseConnection()


class Tunnel:
    """A loopback port whose connections go on through `endpoint` (plain TCP, or obfs4)."""

    def __init__(self, reactor: Any, endpoint: Any, keep: int = 0) -> None:
        """`keep`: how many of the first bytes of each connection to keep, each way (for inspection)."""
        self._reactor = reactor
        self.endpoint = endpoint
        self.keep = keep
        self.passages: list[Passage] = []
        self._port: Any = None

    async def start(self) -> int:
        factory = Factory.forProtocol(lambda: _Inbound(self))
        factory.noisy = False
        self._port = await TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1").listen(factory)
        return self._port.getHost().port

    async def stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()

    def totals(self) -> int:
        """Bytes forwarded so far, both ways."""
        return sum(p.upstream + p.downstream for p in self.passages)


def _server_proxy_pid(server_pid: int | None) -> int | None:
    """The server's obfs4proxy: its only child process."""
    if not server_pid:
        return None
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as children:
        pids = [int(pid) for pid in children.read().split()]
    return pids[0] if pids else None


async def _bridge(reactor: Any, state_dir: Path) -> Obfs4Address:
    """The bridge line the server writes once obfs4proxy listens."""
    path = state_dir / STATE_DIRECTORY / BRIDGE_LINE_FILE
    deadline = time.monotonic() + BRIDGE_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"the server wrote no bridge line to {path} in {BRIDGE_TIMEOUT:.0f} s")
        await task.deferLater(reactor, 0.05, lambda: None)
    return Obfs4Address.parse(path.read_text())


def _socket_bytes(pid: int | None) -> int:
    """Bytes a process has read and written through system calls (its sockets, for a proxy)."""
    if not pid:
        return 0
    with open(f"/proc/{pid}/io") as io:
        counts = dict(line.split(": ") for line in io.read().splitlines())
    return int(counts["rchar"]) + int(counts["wchar"])


async def _measure(reactor: Any, load: LoadOptions, server: RunningServer, target: Target, tunnel: Tunnel | None,
                   proxies: dict[str, int | None] | None = None) -> dict:
    """One load run; with a tunnel, the bytes on the wire per message, and with proxies, their CPU.

    Behind obfs4 the wire is the client proxy's other side: all it reads and writes, less what
    passed through the tunnel to it.
    """
    proxies = proxies or {}
    spec = load.spec([(target, target) for _ in range(load.pairs)])
    client_pid = proxies.get("obfs4proxy_client")
    tunnel_before, proxy_before = (tunnel.totals() if tunnel else 0), _socket_bytes(client_pid)
    outcome = await run_load(reactor, spec, load.processes, [server.pid, *(pid for pid in proxies.values() if pid)])
    figures = load_figures(outcome, [server.pid], [server.rss()])
    by_pid = (outcome["cpu"] or {"processes": {}})["processes"]
    for name, pid in proxies.items():
        figures[f"{name}_cpu_percent"] = None if by_pid.get(pid) is None else round(by_pid[pid], 1)
    if tunnel is not None and outcome["delivered"]:
        plain = tunnel.totals() - tunnel_before
        wire = _socket_bytes(client_pid) - proxy_before - plain if client_pid else plain
        # Every message: the send and its ack on one connection, the push and its ack on another.
        figures["wire_bytes_per_message"] = round(wire / outcome["delivered"], 1)
    return figures


async def obfs4(reactor: Any, plan: ServerPlan, load: LoadOptions, direct: bool = True) -> dict:
    """TCP JSON lines: straight to the port, through a tunnel, and through the tunnel and obfs4."""
    if plan.mode == "external":
        raise BenchError("the obfs4 scenario starts its own server with --obfs4: use --server embedded or production")
    load = replace(load, transport=TCP)
    results: dict[str, Any] = {}
    proxy = ClientProxy(reactor, "obfs4proxy")
    tunnels: list[Tunnel] = []
    with tempfile.TemporaryDirectory(prefix="construct-bench-obfs4-", dir=plan.run_dir) as state_dir:
        # The data directory given last wins: there the server keeps its obfs4 state and bridge line.
        extra = ("--obfs4", LOOPBACK, "--data-dir", state_dir)
        async with construct_servers(reactor, plan, extra=extra) as servers:
            server = servers[0]
            try:
                bridge = await _bridge(reactor, Path(state_dir))
                host, ws_port = server.target.host, server.target.ws_port
                if direct:
                    results["direct"] = await _measure(reactor, load, server, server.target, None)
                plain = Tunnel(reactor, TCP4ClientEndpoint(reactor, host, server.target.tcp_port, timeout=CONNECT_TIMEOUT))
                hidden = Tunnel(reactor, Obfs4Endpoint(reactor, proxy, bridge.host, bridge.port, bridge.arguments()))
                tunnels += [plain, hidden]
                port = await plain.start()
                results["tunnel"] = await _measure(reactor, load, server, Target(host, ws_port, port), plain)
                port = await hidden.start()
                await proxy.socks_address()
                proxies = {"obfs4proxy_server": _server_proxy_pid(server.pid), "obfs4proxy_client": proxy.pid}
                results["obfs4"] = await _measure(reactor, load, server, Target(host, ws_port, port), hidden, proxies)
                described = [server.describe()]
            finally:
                for tunnel in tunnels:
                    await tunnel.stop()
                await proxy.stop()
    if results["tunnel"]["delivered_per_s"]:
        results["obfs4_ratio"] = round(results["obfs4"]["delivered_per_s"] / results["tunnel"]["delivered_per_s"], 4)
    return scenario_report("obfs4", plan, {**load.settings(), "iat_mode": bridge.iat_mode}, described, results)


async def ws_padding(reactor: Any, plan: ServerPlan, load: LoadOptions) -> dict:
    """WebSocket through a counting tunnel, to a server without and then with --ws-padding."""
    if plan.mode == "external":
        raise BenchError("the ws-padding scenario starts its own servers: use --server embedded or production")
    load = replace(load, transport=WS_MSGPACK if load.transport == TCP else load.transport)
    results: dict[str, Any] = {}
    described = []
    for name, extra in (("unpadded", ()), ("padded", ("--ws-padding",))):
        async with construct_servers(reactor, plan, extra=extra) as servers:
            server = servers[0]
            target = server.target
            tunnel = Tunnel(reactor, TCP4ClientEndpoint(reactor, target.host, target.ws_port, timeout=CONNECT_TIMEOUT))
            try:
                port = await tunnel.start()
                results[name] = await _measure(reactor, load, server, Target(target.host, port, None), tunnel)
            finally:
                await tunnel.stop()
            described.append(server.describe())
    if results["unpadded"]["delivered_per_s"]:
        results["padded_ratio"] = round(results["padded"]["delivered_per_s"] / results["unpadded"]["delivered_per_s"], 4)
    return scenario_report("ws-padding", plan, load.settings(), described, results)


ROWS: list[tuple[str, Callable[[dict], str]]] = [
    ("wire bytes per message", lambda f: report._number(f.get("wire_bytes_per_message"), 1)),
    ("obfs4proxy server CPU %", lambda f: report._number(f.get("obfs4proxy_server_cpu_percent"))),
    ("obfs4proxy client CPU %", lambda f: report._number(f.get("obfs4proxy_client_cpu_percent"))),
]
COLUMNS = {
    "direct": "TCP direct", "tunnel": "TCP via tunnel", "obfs4": "obfs4 via tunnel",
    "unpadded": "ws-msgpack", "padded": "ws-msgpack padded",
}
RATIOS = {"obfs4_ratio": "obfs4 / TCP via tunnel", "padded_ratio": "padded / unpadded"}


def _render(result: dict) -> list[str]:
    results = result["results"]
    columns = {title: results[key] for key, title in COLUMNS.items() if key in results}
    rows = report.LOAD_ROWS + (ROWS if result["scenario"] == "obfs4" else ROWS[:1])
    lines = report._table(["", *columns], [[label, *(show(f) for f in columns.values())] for label, show in rows])
    for key, text in RATIOS.items():
        if results.get(key) is not None:
            lines.append(f"{text}: {results[key]:.1%} of the message rate")
    return lines


report.RENDERERS.update({name: _render for name in SCENARIOS})


def add_parsers(commands: Any, server: argparse.ArgumentParser, load: Callable[[], argparse.ArgumentParser]) -> None:
    """The scenarios' subcommands, with the usual server and load options."""
    obfs4_command = commands.add_parser(
        "obfs4", parents=[server, load()], help="TCP through obfs4 against plain TCP (throughput, latency, CPU, bytes)",
    )
    obfs4_command.add_argument("--no-direct", dest="direct", action="store_false",
                               help="skip the run straight to the TCP port")
    commands.add_parser("ws-padding", parents=[server, load()],
                        help="WebSocket with and without --ws-padding (throughput, latency, bytes)")


async def run(reactor: Any, name: str, plan: ServerPlan, load: LoadOptions, arguments: argparse.Namespace) -> dict:
    if name == "obfs4":
        return await obfs4(reactor, plan, load, arguments.direct)
    return await ws_padding(reactor, plan, load)
