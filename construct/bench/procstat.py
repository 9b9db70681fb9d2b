"""CPU time and memory of processes, and of the whole machine, from /proc (Linux)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system time of every thread of the process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may contain spaces and parentheses: count fields after its last ')'.
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def memory_bytes(pid: int) -> int:
    """Resident memory now (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    with open("/proc/stat") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class CpuSample:
    at: float
    processes: dict[int, float]
    machine: tuple[int, int]


class CpuMeter:
    """CPU use of some processes and of the machine between two samples.

    A percentage is of one core: a process busy on two cores shows 200%.
    """

    def __init__(self, pids: list[int]) -> None:
        self._pids = [pid for pid in pids if pid is not None]
        self._first: CpuSample | None = None

    def _sample(self) -> CpuSample:
        return CpuSample(time.monotonic(), {pid: cpu_seconds(pid) for pid in self._pids}, _machine_ticks())

    @property
    def started(self) -> bool:
        return self._first is not None

    def start(self) -> None:
        self._first = self._sample()

    def stop(self) -> dict:
        """{"processes": {pid: percent}, "machine": percent of all cores, "seconds": wall time}."""
        last = self._sample()
        first = self._first
        wall = max(last.at - first.at, 1e-9)
        busy = last.machine[0] - first.machine[0]
        total = max(last.machine[1] - first.machine[1], 1)
        return {
            "seconds": wall,
            "processes": {pid: 100 * (last.processes[pid] - first.processes[pid]) / wall for pid in self._pids},
            "machine": 100 * busy / total,
        }
