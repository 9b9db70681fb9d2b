"""Load-generator processes: the pairs shared out over K processes, run together, results merged.

One Python process saturates one core well before the server does on a fast path, so the load can
be spread (`--processes`). Each is `python -m construct.bench.load` (see there for the exchange).
"""

from __future__ import annotations

import base64
import sys
import time
from array import array
from collections import Counter
from dataclasses import replace
from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol

from construct.bench.clients import BenchError
from construct.bench.load import LoadSpec
from construct.bench.procstat import CpuMeter
from construct.bench.server import child_environment
from construct.bench.wire import json_dumps, json_loads

# Time for the "go" line to reach every process before the common start.
START_DELAY = 0.5
# Registering thousands of users at a high bcrypt cost takes long.
READY_TIMEOUT = 600
STDERR_KEPT = 4096


class _LoadProcess(ProcessProtocol):
    def __init__(self) -> None:
        self._replies: defer.DeferredQueue = defer.DeferredQueue()
        self._partial = b""
        self._stderr = b""

    @property
    def pid(self) -> int:
        return self.transport.pid

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._replies.put(json_loads(line))

    def errReceived(self, data: bytes) -> None:
        self._stderr = (self._stderr + data)[-STDERR_KEPT:]

    def processEnded(self, reason: Any) -> None:
        self._replies.put(None)

    def send(self, message: dict) -> None:
        self.transport.write(json_dumps(message) + b"\n")

    async def reply(self) -> dict:
        message = await self._replies.get()
        if message is None:
            raise BenchError(f"a load process exited early:\n{self._stderr.decode(errors='replace')}")
        return message

    def kill(self) -> None:
        if self.transport.pid is not None:
            self.transport.signalProcess("KILL")


def share(spec: LoadSpec, processes: int) -> list[LoadSpec]:
    """The pairs dealt round-robin; rate and message count in proportion to each share of pairs."""
    count = max(1, min(processes, len(spec.pairs)))
    total = len(spec.pairs)
    specs = []
    for index in range(count):
        pairs = spec.pairs[index::count]
        specs.append(replace(
            spec,
            pairs=pairs,
            rate=None if spec.rate is None else spec.rate * len(pairs) / total,
            messages=None if spec.messages is None else _proportion(spec.messages, total, index, count),
        ))
    return specs


def _proportion(messages: int, pairs: int, index: int, count: int) -> int:
    """The messages of the pairs index, index + count, ... when each pair sends messages/pairs."""
    per_pair = [messages // pairs + (1 if pair < messages % pairs else 0) for pair in range(pairs)]
    return sum(per_pair[index::count])


class LoadRun:
    """Load processes started together, with the CPU of the watched processes over the measured window."""

    def __init__(self, reactor: Any, spec: LoadSpec, processes: int) -> None:
        self._reactor = reactor
        self._spec = spec
        self._specs = share(spec, processes)
        self._processes: list[_LoadProcess] = []
        self._meter: CpuMeter | None = None
        self._cpu: dict | None = None
        self.start_at = 0.0

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    async def start(self, watched_pids: list[int | None]) -> None:
        """Spawn, wait until every process has set up its pairs, then start them all at once."""
        for spec in self._specs:
            process = _LoadProcess()
            self._reactor.spawnProcess(
                process, sys.executable, [sys.executable, "-m", "construct.bench.load"], env=child_environment()
            )
            self._processes.append(process)
            process.send(spec.as_dict())
        await defer.gatherResults(
            [defer.ensureDeferred(process.reply()) for process in self._processes], consumeErrors=True
        ).addTimeout(READY_TIMEOUT, self._reactor).addErrback(_first_error)
        self.start_at = time.monotonic() + START_DELAY
        for process in self._processes:
            process.send({"start": self.start_at})
        self._meter = CpuMeter([*watched_pids, *self.pids])
        measure_from = self.start_at - time.monotonic() + self._spec.warmup
        self._reactor.callLater(measure_from, self._meter.start)
        if self._spec.duration is not None:
            self._reactor.callLater(measure_from + self._spec.duration, self._stop_meter)

    def _stop_meter(self) -> None:
        if self._cpu is None and self._meter.started:
            self._cpu = self._meter.stop()

    def stop(self) -> None:
        """End an open-ended run."""
        for process in self._processes:
            process.send({"stop": True})

    async def finish(self) -> dict:
        results = [await process.reply() for process in self._processes]
        self._stop_meter()
        merged = merge(results)
        merged["cpu"] = self._cpu
        merged["load_pids"] = self.pids
        return merged

    def kill(self) -> None:
        for process in self._processes:
            process.kill()


def _first_error(failure: Any) -> Any:
    return failure.value.subFailure if isinstance(failure.value, defer.FirstError) else failure


async def run_load(
    reactor: Any,
    spec: LoadSpec,
    processes: int,
    watched_pids: list[int | None],
    while_running: Callable[[LoadRun], Awaitable[None]] | None = None,
) -> dict:
    """Run the load to its end (or until `while_running` stops it) and merge the processes' results."""
    run = LoadRun(reactor, spec, processes)
    try:
        await run.start(watched_pids)
        if while_running is not None:
            await while_running(run)
        return await run.finish()
    finally:
        run.kill()


def _samples(encoded: str) -> array:
    samples = array("i")
    samples.frombytes(base64.b64decode(encoded))
    return samples


def merge(results: list[dict]) -> dict:
    """Sum the counters, widen the measured window over all processes, pool the latency samples."""
    merged: dict[str, Any] = {
        key: sum(result[key] for result in results)
        for key in ("pairs", "sent", "accepted", "delivered", "duplicates", "unanswered", "lost")
    }
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
    merged["errors"] = dict(errors)
    measured = [result["measured"] for result in results]
    merged["measured"] = {
        "from": min(window["from"] for window in measured),
        "until": max(window["until"] for window in measured),
        **{key: sum(window[key] for window in measured) for key in ("sent", "accepted", "delivered")},
    }
    for samples in ("latency_us", "received_ms", "send_lag_us"):
        merged[samples] = array("i")
        for result in results:
            merged[samples].extend(_samples(result[samples]))
    return merged
