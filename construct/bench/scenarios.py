"""The benchmark scenarios. Each returns a report: a dict that `report.render` prints or `--json` dumps."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task

from construct.bench.clients import BenchError, Connector, Target
from construct.bench.load import LoadSpec, Recipient, Sender, Stats
from construct.bench.procstat import CpuMeter, memory_bytes
from construct.bench.report import MB, latency_between, load_figures
from construct.bench.server import RunningServer, ServerPlan, bare_relay, construct_servers
from construct.bench.workers import LoadRun, run_load
from construct.bench.wire import CODECS, PASSWORD, SendFrames, TCP, TRANSPORTS, WS_MSGPACK, key_bundle

IDLE_CONCURRENCY = 200
# Memory is read this long after the last connection opened, once the server has settled.
IDLE_SETTLE_SECONDS = 1.0
DRAIN_TIMEOUT = 120.0
POLL_SECONDS = 0.01
# Connections that close are detached by the server within this time, so sends to them queue.
DETACH_SECONDS = 0.5
# The login storm's usual shape: a modest steady load, then the logins after this long.
STORM_RATE = 500.0
STORM_BEFORE_SECONDS = 5.0
STORM_BCRYPT_COST = 12


# The shape operators see: many users each sending a little, each message to another recipient,
# offered at a rate (open loop).
DEFAULT_PAIRS = 1000
DEFAULT_RATE = 5000.0
# Capacity: the highest rate sustained with accepted >= SUSTAINED of offered and p99 under a bound.
SUSTAINED = 0.99
DEFAULT_P99_BOUND_MS = 50.0


@dataclass
class LoadOptions:
    """How the message load runs, for every scenario that drives pairs."""

    transport: str = WS_MSGPACK
    pairs: int = DEFAULT_PAIRS
    processes: int = 1
    window: int = 64
    rate: float | None = DEFAULT_RATE  # offered msg/s for all pairs (open loop); None: closed loop
    messages: int | None = None  # in all; None: run for `duration`
    duration: float = 10.0
    warmup: float = 2.0
    size: int = 256
    relay: bool = True

    def spec(self, pairs: list[tuple[Target, Target]]) -> LoadSpec:
        return LoadSpec(
            transport=self.transport,
            pairs=pairs,
            content_bytes=self.size,
            window=self.window,
            rate=self.rate,
            messages=self.messages,
            warmup=self.warmup,
            duration=None if self.messages is not None else self.duration,
        )

    def settings(self) -> dict:
        return {
            "transport": self.transport,
            "pairs": self.pairs,
            "load_processes": self.processes,
            "window": self.window if self.rate is None else None,
            "offered_rate": self.rate if self.rate is not None else "closed loop, as fast as possible",
            "messages": self.messages,
            "duration_seconds": None if self.messages is not None else self.duration,
            "warmup_seconds": self.warmup,
            "content_bytes": self.size,
        }


def _report(scenario: str, plan: ServerPlan, settings: dict, servers: list[dict], results: dict) -> dict:
    return {
        "scenario": scenario,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "mode": plan.mode,
        "limits": plan.limits,
        "settings": settings,
        "servers": servers,
        "results": results,
    }


Placement = Callable[[int], tuple[Target, Target]]


async def _measure(reactor: Any, load: LoadOptions, servers: list[RunningServer], placement: Placement) -> dict:
    pids = [server.pid for server in servers]
    outcome = await run_load(reactor, load.spec([placement(index) for index in range(load.pairs)]), load.processes,
                             pids, redis=servers[0].redis)
    return load_figures(outcome, pids, [server.rss() for server in servers])


def _on(server: RunningServer) -> Placement:
    return lambda index: (server.target, server.target)


def _ratio(part: dict, whole: dict) -> float | None:
    if not whole["delivered_per_s"]:
        return None
    return round(part["delivered_per_s"] / whole["delivered_per_s"], 4)


async def _relay_ceiling(reactor: Any, plan: ServerPlan, load: LoadOptions) -> dict:
    """The bare relay under the same load: the same pairs, transport, window and offered rate."""
    async with bare_relay(reactor, plan) as relay:
        return await _measure(reactor, load, [relay], _on(relay))


async def throughput(reactor: Any, plan: ServerPlan, load: LoadOptions) -> dict:
    async with construct_servers(reactor, plan) as servers:
        results = {"construct": await _measure(reactor, load, servers, _on(servers[0]))}
        described = [server.describe() for server in servers]
    if load.relay:
        results["bare_relay"] = await _relay_ceiling(reactor, plan, load)
        results["relay_ratio"] = _ratio(results["construct"], results["bare_relay"])
    return _report("throughput", plan, load.settings(), described, results)


async def relay(reactor: Any, plan: ServerPlan, load: LoadOptions) -> dict:
    results = {"bare_relay": await _relay_ceiling(reactor, plan, load)}
    return _report("relay", plan, load.settings(), [], results)


def _sustained(figures: dict, rate: float, bound_ms: float) -> bool:
    p99 = figures["latency_ms"]["p99"]
    return figures["accepted_per_s"] >= SUSTAINED * rate and p99 is not None and p99 <= bound_ms


def _probe_row(rate: float, figures: dict, sustained: bool) -> dict:
    return {
        "offered_per_s": rate,
        "accepted_per_s": figures["accepted_per_s"],
        "p99_ms": figures["latency_ms"]["p99"],
        "sustained": sustained,
        "errors": figures["errors"],
        "server_cpu_us_per_message": figures["server_cpu_us_per_message"],
        "redis_cpu_us_per_message": figures["redis_cpu_us_per_message"],
        "limited_by": figures["limited_by"],
    }


@dataclass
class Search:
    """How the capacity search probes: doubling from `start_rate` until a rate is not sustained,
    then halving the gap until it is under `resolution` of the best rate sustained."""

    p99_bound_ms: float = DEFAULT_P99_BOUND_MS
    start_rate: float = 1000.0
    max_rate: float = 100_000.0
    resolution: float = 0.05
    probe_seconds: float = 5.0
    probe_warmup: float = 2.0


async def search_capacity(probe: Callable[[float], Awaitable[bool]], search: Search) -> float | None:
    """The highest rate `probe` says is sustained: doubling from the start rate until one is not,
    then halving the gap between the best and the worst (None if not even a tenth of the start
    rate is)."""
    best, worst, rate = 0.0, None, search.start_rate
    while rate <= search.max_rate:
        if not await probe(rate):
            worst = rate
            break
        best, rate = rate, rate * 2
    floor = search.start_rate / 10
    while worst is not None and worst - best > search.resolution * max(best, floor):
        middle = round((best + worst) / 2)
        if middle < floor:
            break
        if await probe(middle):
            best = middle
        else:
            worst = middle
    return best or None


async def _capacity(run: LoadRun, server: RunningServer, search: Search) -> tuple[float | None, list[dict], dict]:
    """(capacity, every probe, the figures of the best probe) on pairs already set up."""
    probes: list[dict] = []
    figures_at: dict[float, dict] = {}

    async def probe(rate: float) -> bool:
        outcome = await run.measure([server.pid], server.redis, rate=rate, duration=search.probe_seconds,
                                    warmup=search.probe_warmup)
        figures = load_figures(outcome, [server.pid], [server.rss()])
        sustained = _sustained(figures, rate, search.p99_bound_ms)
        probes.append(_probe_row(rate, figures, sustained))
        figures_at[rate] = figures
        return sustained

    found = await search_capacity(probe, search)
    return found, probes, figures_at.get(found, {})


async def capacity(reactor: Any, plan: ServerPlan, load: LoadOptions, search: Search) -> dict:
    """The highest offered rate the server sustains with p99 under the bound, found by search."""
    async with construct_servers(reactor, plan) as servers:
        server = servers[0]
        run = LoadRun(reactor, load.spec([_on(server)(index) for index in range(load.pairs)]), load.processes)
        try:
            await run.start()
            found, probes, at_capacity = await _capacity(run, server, search)
        finally:
            run.kill()
        described = [server.describe()]
    results = {"capacity_per_s": found, "p99_bound_ms": search.p99_bound_ms, "probes": probes}
    if at_capacity:
        results["construct"] = at_capacity
    settings = {**load.settings(), "offered_rate": "searched", "duration_seconds": search.probe_seconds,
                "p99_bound_ms": search.p99_bound_ms}
    return _report("capacity", plan, settings, described, results)


async def overload(
    reactor: Any, plan: ServerPlan, load: LoadOptions, search: Search, known_capacity: float | None, factor: float,
) -> dict:
    """`factor` times the capacity offered (searched first unless known) for `duration` seconds:
    how much is still accepted, how fast, and what is refused."""
    async with construct_servers(reactor, plan) as servers:
        server = servers[0]
        run = LoadRun(reactor, load.spec([_on(server)(index) for index in range(load.pairs)]), load.processes)
        probes: list[dict] = []
        try:
            await run.start()
            found = known_capacity
            if found is None:
                found, probes, _ = await _capacity(run, server, search)
            if not found:
                raise BenchError("no rate was sustained, so there is no capacity to overload")
            outcome = await run.measure([server.pid], server.redis, rate=factor * found, duration=load.duration,
                                        warmup=load.warmup)
        finally:
            run.kill()
        figures = load_figures(outcome, [server.pid], [server.rss()])
        described = [server.describe()]
    results = {
        "capacity_per_s": found,
        "offered_per_s": factor * found,
        "accepted_share_of_capacity": round(figures["accepted_per_s"] / found, 3),
        "construct": figures,
    }
    if probes:
        results["probes"] = probes
    settings = {**load.settings(), "offered_rate": f"{factor:g} x capacity", "factor": factor}
    return _report("overload", plan, settings, described, results)


async def scale_out(reactor: Any, plan: ServerPlan, load: LoadOptions, cross: bool = False) -> dict:
    """One process, then two sharing the database and Redis, with the pairs dealt between them."""
    async with construct_servers(reactor, plan, count=2) as servers:
        one = await _measure(reactor, load, servers[:1], _on(servers[0]))

        def split(index: int) -> tuple[Target, Target]:
            return servers[index % 2].target, servers[(index + cross) % 2].target

        two = await _measure(reactor, load, servers, split)
        described = [server.describe() for server in servers]
    results = {"construct_x1": one, "construct_x2": two, "scale_ratio": _ratio(two, one)}
    if load.relay:
        results["bare_relay"] = await _relay_ceiling(reactor, plan, load)
        results["relay_ratio"] = _ratio(two, results["bare_relay"])
    settings = {**load.settings(), "recipients_on_the_other_process": cross}
    return _report("scale-out", plan, settings, described, results)


async def _register(connector: Connector) -> tuple[Any, dict]:
    link = await connector.open()
    account = await link.request(
        "register",
        {"username": f"bench-{uuid.uuid4().hex[:24]}", "password": PASSWORD, "publicKey": key_bundle()},
        "registerSuccess",
    )
    return link, account


class _Quiet:
    """The handler of idle connections: nothing is expected on them but the server's pings."""

    def frame_received(self, message: dict) -> None:
        pass

    def read_done(self) -> None:
        pass

    def closed(self) -> None:
        pass


_QUIET = _Quiet()


async def _open_idle(connector: Connector, token: str, count: int, errors: dict) -> list:
    limit = defer.DeferredSemaphore(IDLE_CONCURRENCY)
    links: list = []

    async def open_one() -> None:
        try:
            link = await connector.open()
            await link.request("connect", {"sessionToken": token}, "connectSuccess")
        except Exception as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            return
        link.handler = _QUIET
        links.append(link)

    await defer.gatherResults([limit.run(lambda: defer.ensureDeferred(open_one())) for _ in range(count)])
    return links


async def idle(reactor: Any, plan: ServerPlan, transport: str, connections: int) -> dict:
    """Server memory per idle authenticated connection: one account, its session resumed N times."""
    async with construct_servers(reactor, plan) as servers:
        server = servers[0]
        connector = Connector(reactor, CODECS[transport], server.target, slim=True)
        first, account = await _register(connector)
        await task.deferLater(reactor, IDLE_SETTLE_SECONDS, lambda: None)
        server_before, own_before = server.rss(), memory_bytes(os.getpid())
        errors: dict[str, int] = {}
        started = time.monotonic()
        links = await _open_idle(connector, account["sessionToken"], connections, errors)
        open_seconds = time.monotonic() - started
        await task.deferLater(reactor, IDLE_SETTLE_SECONDS, lambda: None)
        server_after, own_after = server.rss(), memory_bytes(os.getpid())
        for link in [first, *links]:
            link.close()
        described = [server.describe()]
    opened = len(links)
    per_connection = None if server_before is None or not opened else (server_after - server_before) / opened
    results = {
        "connections": opened,
        "open_seconds": round(open_seconds, 2),
        "server_rss_before_mb": None if server_before is None else round(server_before / MB, 1),
        "server_rss_after_mb": None if server_after is None else round(server_after / MB, 1),
        "server_per_connection_kb": None if per_connection is None else round(per_connection / 1024, 2),
        "load_generator_per_connection_kb": round((own_after - own_before) / max(opened, 1) / 1024, 2),
        "errors": errors,
    }
    settings = {"transport": transport, "connections": connections}
    return _report("idle", plan, settings, described, results)


class _DrainRecipient(Recipient):
    """A client coming back: times the connect reply, the first message and the last one."""

    def __init__(self, link: Any, stats: Stats, expected: int) -> None:
        super().__init__(link, stats)
        self._expected = expected
        self.connected_at: float | None = None
        self.first_at: float | None = None
        self.done: defer.Deferred = defer.Deferred()

    def frame_received(self, message: dict) -> None:
        if message["type"] == "connectSuccess":
            self.connected_at = time.monotonic()
            return
        if message["type"] == "message" and self.first_at is None:
            self.first_at = time.monotonic()
        super().frame_received(message)

    def read_done(self) -> None:
        super().read_done()
        if self._stats.delivered >= self._expected and not self.done.called:
            self.done.callback(time.monotonic())


async def _queue(reactor: Any, sender: Sender, stats: Stats, count: int) -> float:
    started = time.monotonic()
    sender.open = True
    sender.fill()
    while sender.replied < count:
        if not sender.open:
            raise BenchError(f"the sender's connection closed after {sender.replied} of {count} replies")
        await task.deferLater(reactor, POLL_SECONDS, lambda: None)
    sender.open = False
    return time.monotonic() - started


async def drain(reactor: Any, plan: ServerPlan, transport: str, messages: int, window: int) -> dict:
    """Queue messages for an offline recipient, then time their delivery when it connects."""
    quota = ("--inbox-quota", str(max(messages, 10_000)))
    codec = CODECS[transport]
    async with construct_servers(reactor, plan, extra=quota) as servers:
        server = servers[0]
        connector = Connector(reactor, codec, server.target)
        sender_link, sender_account = await _register(connector)
        recipient_link, recipient_account = await _register(connector)
        recipient_link.close()
        await task.deferLater(reactor, DETACH_SECONDS, lambda: None)

        queue_stats = Stats()
        frames = SendFrames(codec, sender_account["userId"], recipient_account["userId"], 256)
        sender = Sender(sender_link, frames, queue_stats, window, messages)
        sender_link.handler = sender
        queue_seconds = await _queue(reactor, sender, queue_stats, messages)
        queued = queue_stats.accepted

        link = await connector.open()
        drain_stats = Stats()
        recipient = _DrainRecipient(link, drain_stats, queued)
        link.handler = recipient
        meter = CpuMeter([server.pid])
        meter.start()
        started = time.monotonic()
        link.send("connect", {"sessionToken": recipient_account["sessionToken"]})
        finished = await recipient.done.addTimeout(DRAIN_TIMEOUT, reactor)
        cpu = meter.stop()
        recipient.running = False
        for each in (sender_link, link):
            each.close()
        described = [server.describe()]
    drain_seconds = finished - started
    results = {
        "queued": queued,
        "queue_seconds": round(queue_seconds, 3),
        "queued_per_s": round(queued / queue_seconds, 1),
        "received": drain_stats.delivered,
        "duplicates": drain_stats.duplicates,
        "connect_reply_ms": _milliseconds(recipient.connected_at, started),
        "first_message_ms": _milliseconds(recipient.first_at, started),
        "drain_seconds": round(drain_seconds, 3),
        "drained_per_s": round(drain_stats.delivered / drain_seconds, 1),
        "server_cpu_percent": round(cpu["processes"][server.pid], 1) if server.pid else None,
        "errors": {**queue_stats.errors, **drain_stats.errors},
    }
    settings = {"transport": transport, "messages": messages, "window": window}
    return _report("drain", plan, settings, described, results)


def _milliseconds(at: float | None, since: float) -> float | None:
    return None if at is None else round((at - since) * 1000, 2)


async def _login_all(links: list, username: str) -> tuple[float, float, dict]:
    """Log every link in at once; (started, finished, errors by kind)."""
    errors: dict[str, int] = {}

    async def login(link: Any) -> None:
        try:
            await link.request("login", {"username": username, "password": PASSWORD}, "loginSuccess")
        except Exception as e:
            errors[str(e)[:80]] = errors.get(str(e)[:80], 0) + 1

    started = time.monotonic()
    await defer.gatherResults([defer.ensureDeferred(login(link)) for link in links])
    return started, time.monotonic(), errors


async def login_storm(
    reactor: Any, plan: ServerPlan, load: LoadOptions, logins: int, before: float, bcrypt_cost: int
) -> dict:
    """Message latency before and during a burst of concurrent logins at a real bcrypt cost."""
    load = replace(load, messages=None)
    async with construct_servers(reactor, plan, bcrypt_cost=bcrypt_cost) as servers:
        server = servers[0]
        connector = Connector(reactor, CODECS[load.transport], server.target)
        account_link, account = await _register(connector)
        account_link.close()
        storm_links = [await connector.open() for _ in range(logins)]
        storm: dict[str, Any] = {}

        async def storm_then_stop(run: Any) -> None:
            storm_at = run.start_at + load.warmup + before
            await task.deferLater(reactor, max(0.0, storm_at - time.monotonic()), lambda: None)
            started, finished, errors = await _login_all(storm_links, account["username"])
            storm.update(start=started - run.start_at, end=finished - run.start_at, errors=errors)
            run.stop()

        spec = replace(load.spec([_on(server)(index) for index in range(load.pairs)]), duration=None)
        outcome = await run_load(reactor, spec, load.processes, [server.pid], storm_then_stop)
        whole = load_figures(outcome, [server.pid], [server.rss()])
        for link in storm_links:
            link.close()
        described = [server.describe()]
    storm_seconds = storm["end"] - storm["start"]
    results = {
        "logins": logins,
        "storm_seconds": round(storm_seconds, 3),
        "logins_per_s": round(logins / storm_seconds, 1),
        "login_errors": storm["errors"],
        "latency_before_ms": latency_between(outcome, load.warmup * 1000, (load.warmup + before) * 1000),
        "latency_during_ms": latency_between(outcome, storm["start"] * 1000, storm["end"] * 1000),
        "delivered_per_s_before": _rate_between(outcome, load.warmup, load.warmup + before),
        "delivered_per_s_during": _rate_between(outcome, storm["start"], storm["end"]),
        "server_cpu_percent": whole["server_cpu_percent"],
        "lost": whole["lost"],
        "message_errors": whole["errors"],
    }
    settings = {**load.settings(), "duration_seconds": None, "logins": logins, "before_storm_seconds": before,
                "bcrypt_cost": bcrypt_cost}
    return _report("login-storm", plan, settings, described, results)


def _rate_between(outcome: dict, from_s: float, until_s: float) -> float:
    count = sum(1 for received in outcome["received_ms"] if from_s * 1000 <= received < until_s * 1000)
    return round(count / max(until_s - from_s, 1e-9), 1)


async def everything(
    reactor: Any, plan: ServerPlan, load: LoadOptions, rates: list[float], connections: int, drain_messages: int,
    logins: int, search: Search,
) -> dict:
    """Every scenario at its usual size, one report each (scale-out only in production mode)."""
    reports = []
    for transport in TRANSPORTS:
        reports.append(await throughput(reactor, plan, replace(load, transport=transport)))
    for rate in rates:
        reports.append(await throughput(reactor, plan, replace(load, rate=rate, relay=False)))
    reports.append(await overload(reactor, plan, load, search, None, 2.0))
    for transport in (WS_MSGPACK, TCP):
        reports.append(await idle(reactor, plan, transport, connections))
    reports.append(await drain(reactor, plan, load.transport, drain_messages, load.window))
    reports.append(await login_storm(
        reactor, plan, replace(load, rate=STORM_RATE), logins, STORM_BEFORE_SECONDS, STORM_BCRYPT_COST
    ))
    if plan.mode == "production":
        reports.append(await scale_out(reactor, plan, load))
    return {"scenario": "all", "reports": reports}
