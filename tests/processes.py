"""Start real `twistd` processes on port 0 and learn their ports from the log."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

# The benchmark tool starts servers the same way: one twistd command and one "listening" line.
from construct.bench.server import LISTENING, TWISTD, child_environment

REPO = Path(__file__).resolve().parent.parent


def process_env(**extra: str) -> dict:
    """The repository first on the path, so the processes run this tree's code and plugins."""
    env = child_environment()
    env.update(extra)
    return env


class ServerProcess:
    """`twistd -n construct …` with every listener on an ephemeral port."""

    def __init__(self, tmp_path: Path, *args: str, plugin: str = "construct", expect: tuple = ("http", "tcp", "health"),
                 env: dict | None = None) -> None:
        self.tmp_path = tmp_path
        self.args = list(args)
        self.plugin = plugin
        self.expect = expect
        self.env = env or {}
        self.log_path = tmp_path / f"{plugin}-{len(list(tmp_path.glob('*.log')))}.log"
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        listen = ["--listen", "tcp:0:interface=127.0.0.1", "--tcp", "tcp:0:interface=127.0.0.1",
                  "--health", "tcp:0:interface=127.0.0.1"] if self.plugin == "construct" else []
        # Every test client comes from one address: registrations per address are tested on their own.
        limits = ["--limit-registrations", "0"] if self.plugin == "construct" else []
        return TWISTD + ["--nodaemon", "--pidfile=", self.plugin, *listen, *limits, *self.args]

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        """Start and wait for the listeners, blocking (the test process serves nothing meanwhile)."""
        self._spawn()
        deadline = time.monotonic() + timeout
        while not self._listening():
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    async def start_async(self, timeout: float = 20.0) -> "ServerProcess":
        """Start and wait without blocking the test's reactor (it may be serving the process)."""
        from twisted.internet import reactor, task

        self._spawn()
        deadline = time.monotonic() + timeout
        while not self._listening():
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {timeout}s:\n{self.log_text()}")
            await task.deferLater(reactor, 0.05, lambda: None)
        return self

    def _spawn(self) -> None:
        self.ports = {}
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp_path, env=process_env(**self.env)
        )
        log.close()

    def _listening(self) -> bool:
        text = self.log_text()[self._offset :]
        for name, _, port in LISTENING.findall(text):
            self.ports[name] = int(port)
        if all(name in self.ports for name in self.expect):
            return True
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}:\n{text}")
        return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode if self.process else 0


def run_twistd(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        TWISTD + ["--nodaemon", "--pidfile=", *args], cwd=tmp_path, env=process_env(**(env or {})),
        capture_output=True, text=True, timeout=timeout,
    )
