"""The servers a benchmark runs against.

- `construct` started for the run (`twistd -n construct`, every listener on a free loopback
  port): embedded mode on SQLite, or production mode on a scratch PostgreSQL database and a
  Redis key prefix of its own, both removed afterwards;
- a server that is already running, given by address (and pid, for CPU and memory);
- the bare relay (`construct.bench.relay`).

Ports are learned from the "<name> listening on <ip>:<port>" lines the processes log.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import psycopg2
from twisted.internet import task
from twisted.logger import Logger

import construct
from construct.bench.clients import BenchError, Target
from construct.bench.procstat import memory_bytes
from construct.bench.redisinfo import RedisInfo

log = Logger()

LISTENING = re.compile(r"\b(\w+) listening on ([\d.]+):(\d+)")
LOOPBACK = "tcp:0:interface=127.0.0.1"
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# Memory "at start" is read this long after the listeners are up, once startup work has settled.
SETTLE_SECONDS = 0.5
POLL_SECONDS = 0.05
# The directory holding `construct/`, so child processes run this very tree and its twistd plugins.
SOURCE_ROOT = Path(construct.__file__).resolve().parent.parent


def child_environment() -> dict:
    """This tree first on the path; no CONSTRUCT_* settings, so only our arguments configure a server."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSTRUCT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class ServerPlan:
    """Which server to measure, from the command line."""

    mode: str = "embedded"  # embedded, production, or external (already running at `external`)
    bcrypt_cost: int = 4
    postgres_admin_url: str = "postgresql://127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    external: Target | None = None
    external_pid: int | None = None
    run_dir: str | None = None  # where logs and the SQLite database go (default: the system temp dir)
    limits: str = "off"  # off, or shipped (the defaults, but for the per-address ones)


@dataclass
class RunningServer:
    name: str
    target: Target
    pid: int | None
    rss_at_start: int | None = None
    # The Redis it runs on (production mode), for Redis's own CPU counters.
    redis: RedisInfo | None = None

    def rss(self) -> int | None:
        return memory_bytes(self.pid) if self.pid else None

    def describe(self) -> dict:
        return {"name": self.name, "pid": self.pid, "rss_at_start_mb": _megabytes(self.rss_at_start)}


def _megabytes(size: int | None) -> float | None:
    return None if size is None else round(size / 2**20, 1)


@dataclass
class ManagedProcess:
    """A child process that logs one "<name> listening on <ip>:<port>" line per listener."""

    name: str
    command: list[str]
    directory: Path
    expect: tuple[str, ...]
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    async def start(self, reactor: Any) -> RunningServer:
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                self.command, stdout=output, stderr=subprocess.STDOUT, cwd=self.directory, env=child_environment()
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not start in {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
            await task.deferLater(reactor, POLL_SECONDS, lambda: None)
        await task.deferLater(reactor, SETTLE_SECONDS, lambda: None)
        target = Target("127.0.0.1", self.ports[self.expect[0]], self.ports.get("tcp"))
        pid = self.process.pid
        return RunningServer(self.name, target, pid, memory_bytes(pid))

    def _listening(self) -> bool:
        for name, _, port in LISTENING.findall(self.log_path.read_text(errors="replace")):
            self.ports[name] = int(port)
        return all(name in self.ports for name in self.expect)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self, reactor: Any) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                log.warn("{name} ignored SIGTERM for {seconds:.0f} s; killing it", name=self.name, seconds=STOP_TIMEOUT)
                self.process.kill()
                self.process.wait()
                return
            await task.deferLater(reactor, POLL_SECONDS, lambda: None)


class ScratchServices:
    """A PostgreSQL database and a Redis key prefix that exist only for one run.

    Setting up and cleaning up block briefly, before and after the measurements.
    """

    def __init__(self, postgres_admin_url: str, redis_url: str) -> None:
        self._admin_url = postgres_admin_url
        self.redis_url = redis_url
        tag = uuid.uuid4().hex[:12]
        self._database = f"construct_bench_{tag}"
        self.redis_prefix = f"construct-bench:{tag}:"

    @property
    def database_url(self) -> str:
        return f"{self._admin_url.rsplit('/', 1)[0]}/{self._database}"

    def _admin(self, statement: str) -> None:
        connection = psycopg2.connect(self._admin_url, connect_timeout=5)
        try:
            connection.autocommit = True
            connection.cursor().execute(statement)
        finally:
            connection.close()

    def create(self) -> None:
        try:
            self._admin(f"CREATE DATABASE {self._database}")
        except psycopg2.Error as e:
            raise BenchError(f"cannot create a scratch database through {self._admin_url}: {e}") from None

    def remove(self) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {self._database} WITH (FORCE)")
        RedisInfo(self.redis_url).delete_keys(self.redis_prefix)

# The load comes from one address and a few hundred users sending as fast as they can: the abuse
# limits would be what is measured. A server the tool only targets (--server) needs them off too.
LIMITS_OFF = [
    "--limit-messages", "0", "--limit-messages-per-recipient", "0", "--limit-registrations", "0",
    "--max-connections-per-address", "0", "--max-connections-per-user", "0",
    # The login storm's logins all come from one address at once, each counted as failed until it succeeds.
    "--limit-login-failures", "0", "--limit-login-failures-per-account", "0", "--limit-login-failures-account-wide", "0",
    "--limit-password-checks", "0", "--limit-password-checks-per-account", "0", "--limit-lookups-per-address", "0",
    # Each simulated device of a user logs in on its own.
    "--max-sessions-per-user", "0",
]


# `--limits shipped`: the defaults a production server ships with, except those that count per
# client address (the whole load comes from one).
PER_ADDRESS_LIMITS_OFF = [
    "--limit-registrations", "0", "--max-connections-per-address", "0", "--limit-login-failures", "0",
    "--limit-password-checks", "0", "--limit-lookups-per-address", "0",
]


def construct_command(directory: Path, bcrypt_cost: int, extra: list[str], limits: str = "off") -> list[str]:
    return TWISTD + [
        "--nodaemon", "--pidfile=", "construct",
        "--listen", LOOPBACK, "--tcp", LOOPBACK, "--health", LOOPBACK,
        "--data-dir", str(directory / "data"), "--bcrypt-cost", str(bcrypt_cost),
        *(LIMITS_OFF if limits == "off" else PER_ADDRESS_LIMITS_OFF), *extra,
    ]


@asynccontextmanager
async def run_directory(plan: ServerPlan) -> AsyncIterator[Path]:
    """Logs and data of one run; kept (and named in the error) when the run fails."""
    directory = Path(tempfile.mkdtemp(prefix="construct-bench-", dir=plan.run_dir))
    try:
        yield directory
    except BaseException:
        log.error("construct-bench: the servers' logs are kept in {directory}", directory=directory)
        raise
    shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def construct_servers(
    reactor: Any, plan: ServerPlan, count: int = 1, bcrypt_cost: int | None = None, extra: tuple[str, ...] = ()
) -> AsyncIterator[list[RunningServer]]:
    """`count` Construct processes serving the same users (production mode for more than one)."""
    if plan.mode == "external":
        if count != 1:
            raise BenchError("a scenario with several servers needs --server production")
        yield [RunningServer("construct", plan.external, plan.external_pid, None)]
        return
    if count > 1 and plan.mode != "production":
        raise BenchError("several servers share users only in production mode: use --server production")
    cost = plan.bcrypt_cost if bcrypt_cost is None else bcrypt_cost
    services = ScratchServices(plan.postgres_admin_url, plan.redis_url) if plan.mode == "production" else None
    if services is not None:
        services.create()
    async with run_directory(plan) as directory:
        processes = []
        try:
            for index in range(count):
                arguments = list(extra)
                if services is not None:
                    arguments += ["--database", services.database_url, "--redis", services.redis_url,
                                  "--redis-prefix", services.redis_prefix, "--instance-id", f"bench-{index + 1}"]
                processes.append(ManagedProcess(
                    f"construct-{index + 1}", construct_command(directory, cost, arguments, plan.limits), directory,
                    ("http", "tcp", "health"),
                ))
            running = [await process.start(reactor) for process in processes]
            if services is not None:
                for server in running:
                    server.redis = RedisInfo(services.redis_url)
            yield running
        finally:
            for process in processes:
                await process.stop(reactor)
            if services is not None:
                services.remove()


@asynccontextmanager
async def bare_relay(reactor: Any, plan: ServerPlan) -> AsyncIterator[RunningServer]:
    async with run_directory(plan) as directory:
        process = ManagedProcess(
            "relay", [sys.executable, "-m", "construct.bench.relay"], directory, ("ws", "tcp")
        )
        try:
            yield await process.start(reactor)
        finally:
            await process.stop(reactor)


def raise_open_files_limit(wanted: int) -> int:
    """Allow this process, and the servers and load processes it starts, `wanted` descriptors if it may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            # Only a privileged user may raise the hard limit.
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted
