"""`construct-bench`: measure a Construct server (docs/performance.md).

    construct-bench throughput                       # 1,000 pairs, 5,000 msg/s offered (open loop)
    construct-bench throughput --rate 10000 --processes 2 --no-relay
    construct-bench throughput --closed-loop --pairs 10 --window 64
    construct-bench capacity --p99-bound 50            # the highest rate sustained, by search
    construct-bench overload                           # 2x that capacity for 10 s
    construct-bench idle --connections 10000 --transport tcp
    construct-bench drain --messages 10000
    construct-bench login-storm --logins 50
    construct-bench scale-out --server production
    construct-bench all --server production --json
    construct-bench obfs4 --pairs 10 --duration 10
    construct-bench ws-padding --pairs 10 --duration 10
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectError
from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, \
    textFileLogObserver

from construct.bench import obfuscation, scenarios
from construct.bench.clients import BenchError, Target
from construct.bench.report import render
from construct.bench.server import ServerPlan, raise_open_files_limit
from construct.bench.wire import TRANSPORTS, WS_MSGPACK

# Two descriptors per pair and per idle connection, with room for the rest.
SPARE_DESCRIPTORS = 1024


def _server_option(text: str) -> str:
    if text in ("embedded", "production") or ":" in text:
        return text
    raise argparse.ArgumentTypeError("expected embedded, production or HOST:PORT of a running server")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def _search_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("capacity search")
    defaults = scenarios.Search()
    group.add_argument("--p99-bound", type=_positive_float, default=defaults.p99_bound_ms,
                       help=f"latency p99 a sustained rate must stay under, ms (default {defaults.p99_bound_ms:g})")
    group.add_argument("--start-rate", type=_positive_float, default=defaults.start_rate,
                       help=f"first rate probed, msg/s (default {defaults.start_rate:g})")
    group.add_argument("--max-rate", type=_positive_float, default=defaults.max_rate,
                       help=f"highest rate probed (default {defaults.max_rate:g})")
    group.add_argument("--resolution", type=_positive_float, default=defaults.resolution,
                       help=f"stop when the gap is this share of the rate (default {defaults.resolution:g})")
    group.add_argument("--probe-duration", type=_positive_float, default=defaults.probe_seconds,
                       help=f"measured seconds per probe (default {defaults.probe_seconds:g})")
    group.add_argument("--probe-warmup", type=float, default=defaults.probe_warmup,
                       help=f"seconds before measuring each probe (default {defaults.probe_warmup:g})")


def _server_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("server")
    group.add_argument(
        "--server", type=_server_option, default="embedded",
        help="embedded: start `construct` on SQLite (default); production: start it on a scratch PostgreSQL "
             "database and Redis prefix; HOST:PORT: the WebSocket port of a server already running",
    )
    group.add_argument("--tcp-port", type=int, default=8081, help="TCP port of a running server (default 8081)")
    group.add_argument("--server-pid", type=int, help="pid of a running server, for its CPU and memory")
    group.add_argument("--bcrypt-cost", type=int, default=4, help="of servers started here (default 4)")
    group.add_argument("--postgres", default="postgresql://127.0.0.1:5432/postgres",
                       help="admin URL where production mode creates its scratch database")
    group.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis of production mode")
    group.add_argument("--run-dir", help="where server logs and the SQLite database go (default: temp dir)")
    group.add_argument("--limits", choices=("off", "shipped"), default="off",
                       help="abuse limits of servers started here: off (default), or as shipped but for the "
                            "per-address ones (the load comes from one address)")
    group.add_argument("--json", action="store_true", help="print the report as JSON")
    return options


def _load_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("load")
    group.add_argument("--transport", choices=TRANSPORTS, default=WS_MSGPACK)
    group.add_argument("--pairs", type=_positive_int, default=scenarios.DEFAULT_PAIRS,
                       help=f"sender/recipient pairs (default {scenarios.DEFAULT_PAIRS:,})")
    group.add_argument("--processes", type=_positive_int, default=1, help="load-generator processes (default 1)")
    group.add_argument("--window", type=_positive_int, default=64,
                       help="closed loop: most sends without their ack, per sender (default 64)")
    group.add_argument("--rate", type=_positive_float, default=scenarios.DEFAULT_RATE,
                       help=f"offered msg/s over all pairs, open loop (default {scenarios.DEFAULT_RATE:,.0f})")
    group.add_argument("--closed-loop", dest="rate", action="store_const", const=None,
                       help="instead of a rate: each sender keeps --window sends unanswered, as fast as it can")
    group.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    group.add_argument("--messages", type=_positive_int, help="send this many in all instead of --duration")
    group.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default 2)")
    group.add_argument("--size", type=int, default=256, help="content bytes per message (default 256, min 20)")
    group.add_argument("--no-relay", dest="relay", action="store_false", help="skip the bare relay run")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="construct-bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    # A fresh load parent per command: set_defaults on one command would change a shared parent's defaults.
    server = _server_options()
    commands = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    commands.add_parser("throughput", parents=[server, _load_options()],
                        help="message rate, latency, CPU and memory, and the bare relay ceiling")
    commands.add_parser("relay", parents=[server, _load_options()], help="the bare relay ceiling alone")
    capacity = commands.add_parser("capacity", parents=[server, _load_options()],
                                   help="the highest offered rate sustained with p99 under a bound")
    _search_options(capacity)
    overload = commands.add_parser("overload", parents=[server, _load_options()],
                                   help="twice the capacity offered: what is still accepted, how fast, what refused")
    _search_options(overload)
    overload.add_argument("--capacity", type=_positive_float, help="skip the search: the capacity in msg/s")
    overload.add_argument("--factor", type=_positive_float, default=2.0, help="times the capacity offered (default 2)")
    scale = commands.add_parser("scale-out", parents=[server, _load_options()],
                                help="one process against two (production)")
    scale.add_argument("--cross", action="store_true", help="put each recipient on the other process")
    storm = commands.add_parser("login-storm", parents=[server, _load_options()],
                                help="message latency before and during concurrent logins")
    storm.add_argument("--logins", type=_positive_int, default=50, help="concurrent logins (default 50)")
    storm.add_argument("--before", type=float, default=scenarios.STORM_BEFORE_SECONDS,
                       help="seconds of steady load measured before the storm (default 5)")
    storm.add_argument("--storm-bcrypt-cost", type=int, default=scenarios.STORM_BCRYPT_COST,
                       help="bcrypt cost of the server (default 12)")
    storm.set_defaults(rate=scenarios.STORM_RATE)
    idle = commands.add_parser("idle", parents=[server], help="server memory per idle authenticated connection")
    idle.add_argument("--transport", choices=TRANSPORTS, default=WS_MSGPACK)
    idle.add_argument("--connections", type=_positive_int, default=10_000, help="(default 10000)")
    drain = commands.add_parser("drain", parents=[server], help="time to deliver a backlog to a client reconnecting")
    drain.add_argument("--transport", choices=TRANSPORTS, default=WS_MSGPACK)
    drain.add_argument("--messages", type=_positive_int, default=10_000, help="queued messages (default 10000)")
    drain.add_argument("--window", type=_positive_int, default=64, help="most sends without their ack (default 64)")
    every = commands.add_parser("all", parents=[server, _load_options()], help="every scenario, one report each")
    _search_options(every)
    every.add_argument("--rates", default="2000,10000", help="offered rates of the latency runs (default 2000,10000)")
    every.add_argument("--connections", type=_positive_int, default=10_000, help="of the idle runs (default 10000)")
    every.add_argument("--drain-messages", type=_positive_int, default=10_000, help="of the drain run (default 10000)")
    every.add_argument("--logins", type=_positive_int, default=50, help="of the login storm (default 50)")
    obfuscation.add_parsers(commands, server, _load_options)
    return parser


def plan_from(arguments: argparse.Namespace) -> ServerPlan:
    plan = ServerPlan(
        mode=arguments.server, bcrypt_cost=arguments.bcrypt_cost, postgres_admin_url=arguments.postgres,
        redis_url=arguments.redis, run_dir=arguments.run_dir, limits=arguments.limits,
    )
    if arguments.server not in ("embedded", "production"):
        host, port = arguments.server.rsplit(":", 1)
        plan.mode = "external"
        plan.external = Target(host, int(port), arguments.tcp_port)
        plan.external_pid = arguments.server_pid
    return plan


def load_from(arguments: argparse.Namespace) -> scenarios.LoadOptions:
    if arguments.size < 20:
        raise BenchError("--size must be at least 20: the send time is written at the start of the content")
    return scenarios.LoadOptions(
        transport=arguments.transport, pairs=arguments.pairs, processes=arguments.processes, window=arguments.window,
        rate=arguments.rate, messages=arguments.messages, duration=arguments.duration, warmup=arguments.warmup,
        size=arguments.size, relay=arguments.relay,
    )


def search_from(arguments: argparse.Namespace) -> scenarios.Search:
    return scenarios.Search(
        p99_bound_ms=arguments.p99_bound, start_rate=arguments.start_rate, max_rate=arguments.max_rate,
        resolution=arguments.resolution, probe_seconds=arguments.probe_duration, probe_warmup=arguments.probe_warmup,
    )


async def run_scenario(reactor: Any, arguments: argparse.Namespace) -> dict:
    plan = plan_from(arguments)
    name = arguments.scenario
    if name == "idle":
        return await scenarios.idle(reactor, plan, arguments.transport, arguments.connections)
    if name == "drain":
        return await scenarios.drain(reactor, plan, arguments.transport, arguments.messages, arguments.window)
    load = load_from(arguments)
    if name in obfuscation.SCENARIOS:
        return await obfuscation.run(reactor, name, plan, load, arguments)
    if name == "throughput":
        return await scenarios.throughput(reactor, plan, load)
    if name == "relay":
        return await scenarios.relay(reactor, plan, load)
    if name == "capacity":
        return await scenarios.capacity(reactor, plan, load, search_from(arguments))
    if name == "overload":
        return await scenarios.overload(reactor, plan, load, search_from(arguments), arguments.capacity, arguments.factor)
    if name == "scale-out":
        return await scenarios.scale_out(reactor, plan, load, arguments.cross)
    if name == "login-storm":
        return await scenarios.login_storm(
            reactor, plan, load, arguments.logins, arguments.before, arguments.storm_bcrypt_cost
        )
    rates = [float(rate) for rate in arguments.rates.split(",") if rate.strip()]
    return await scenarios.everything(
        reactor, plan, load, rates, arguments.connections, arguments.drain_messages, arguments.logins,
        search_from(arguments),
    )


def _descriptors_needed(arguments: argparse.Namespace) -> int:
    connections = getattr(arguments, "connections", 0) + 2 * getattr(arguments, "pairs", 0)
    return connections + getattr(arguments, "logins", 0) + SPARE_DESCRIPTORS


async def _main(reactor: Any, arguments: argparse.Namespace) -> None:
    try:
        report = await run_scenario(reactor, arguments)
    except (BenchError, ConnectError) as e:
        sys.stderr.write(f"construct-bench: {e}\n")
        raise SystemExit(2) from None
    print(json.dumps(report, indent=2) if arguments.json else render(report))


def main(argv: list[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    raise_open_files_limit(_descriptors_needed(arguments))
    # Warnings and errors only: Autobahn and Twisted are chatty at info level.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, arguments)))
