"""Figures from raw load results, and the plain-text rendering of reports (`--json` prints them as they are)."""

from __future__ import annotations

import math
from array import array
from typing import Any, Callable

MB = 2**20


def percentile(ordered: list[int], fraction: float) -> int | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency_summary(latency_us: Any) -> dict:
    ordered = sorted(latency_us)

    def ms(value: int | None) -> float | None:
        return None if value is None else round(value / 1000, 3)

    return {
        "samples": len(ordered),
        "p50": ms(percentile(ordered, 0.50)),
        "p99": ms(percentile(ordered, 0.99)),
        "p99_9": ms(percentile(ordered, 0.999)),
        "max": ms(ordered[-1] if ordered else None),
    }


def latency_between(outcome: dict, from_ms: float, until_ms: float) -> dict:
    """Latency of the deliveries received in [from_ms, until_ms) after the load's start."""
    samples = array("i", (
        latency for latency, received in zip(outcome["latency_us"], outcome["received_ms"])
        if from_ms <= received < until_ms
    ))
    return latency_summary(samples)


def _sum_known(values: list[float | None]) -> float | None:
    return None if not values or any(value is None for value in values) else sum(values)


# A load process busier than this (of one core), or sending this late after its messages were
# due (open loop, p99), was the limit of a run rather than the server.
LOADGEN_BUSY_PERCENT = 90.0
LOADGEN_LATE_MS = 10.0
MACHINE_BUSY_PERCENT = 95.0


def limits_of(figures: dict, load_process_percents: list[float]) -> list[str]:
    """What, besides the server, may have set the pace of a run."""
    limits = []
    if load_process_percents and max(load_process_percents) >= LOADGEN_BUSY_PERCENT:
        limits.append("load generator CPU")
    lag = figures.get("send_lag_ms")
    if lag and lag["p99"] is not None and lag["p99"] > LOADGEN_LATE_MS:
        limits.append("load generator behind its schedule")
    if figures["machine_cpu_percent"] is not None and figures["machine_cpu_percent"] >= MACHINE_BUSY_PERCENT:
        limits.append("machine CPU")
    return limits


def _per_message_us(cpu_percent: float | None, messages_per_s: float) -> float | None:
    """CPU time per message from two rates: CPU (% of a core) and messages per second."""
    return None if cpu_percent is None or not messages_per_s else round(cpu_percent / 100 / messages_per_s * 1e6, 1)


def load_figures(outcome: dict, server_pids: list[int | None], server_rss: list[int | None]) -> dict:
    """What one load run shows: rates over the measured window, latency, CPU per message (the
    server's and Redis's own), memory, losses, errors, and what else may have set the pace."""
    measured = outcome["measured"]
    seconds = max(measured["until"] - measured["from"], 1e-9)
    cpu = outcome["cpu"] or {"processes": {}, "machine": None, "seconds": None}
    by_pid = cpu["processes"]
    rss = _sum_known(server_rss)
    server_percent = _sum_known([by_pid.get(pid) for pid in server_pids])
    redis_seconds = outcome.get("redis_cpu_seconds")
    redis_percent = None if redis_seconds is None or not cpu["seconds"] else 100 * redis_seconds / cpu["seconds"]
    accepted_per_s = measured["accepted"] / seconds
    figures = {
        "window_s": round(seconds, 3),
        "offered_per_s": round(measured["sent"] / seconds, 1),
        "accepted_per_s": round(accepted_per_s, 1),
        "delivered_per_s": round(measured["delivered"] / seconds, 1),
        "latency_ms": latency_summary(outcome["latency_us"]),
        "sent": outcome["sent"],
        "accepted": outcome["accepted"],
        "delivered": outcome["delivered"],
        "duplicates": outcome["duplicates"],
        "lost": outcome["lost"],
        "unanswered": outcome["unanswered"],
        "errors": outcome["errors"],
        "server_cpu_percent": _rounded(server_percent),
        "server_cpu_us_per_message": _per_message_us(server_percent, accepted_per_s),
        "redis_cpu_percent": _rounded(redis_percent),
        "redis_cpu_us_per_message": _per_message_us(redis_percent, accepted_per_s),
        "server_rss_mb": None if rss is None else round(rss / MB, 1),
        "loadgen_cpu_percent": _rounded(_sum_known([by_pid.get(pid) for pid in outcome["load_pids"]])),
        "machine_cpu_percent": _rounded(cpu["machine"]),
    }
    if outcome.get("send_lag_us"):
        figures["send_lag_ms"] = latency_summary(outcome["send_lag_us"])
    figures["limited_by"] = limits_of(figures, [by_pid[pid] for pid in outcome["load_pids"] if pid in by_pid])
    return figures


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# Rendering


def _number(value: Any, decimals: int = 0) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float) or decimals:
        return f"{value:,.{decimals}f}"
    return f"{value:,}"


def _errors(errors: dict) -> str:
    return ", ".join(f"{code} {count}" for code, count in sorted(errors.items())) or "none"


LOAD_ROWS: list[tuple[str, Callable[[dict], str]]] = [
    ("offered msg/s", lambda f: _number(f["offered_per_s"])),
    ("accepted msg/s", lambda f: _number(f["accepted_per_s"])),
    ("delivered msg/s", lambda f: _number(f["delivered_per_s"])),
    ("latency p50 ms", lambda f: _number(f["latency_ms"]["p50"], 2)),
    ("latency p99 ms", lambda f: _number(f["latency_ms"]["p99"], 2)),
    ("latency p99.9 ms", lambda f: _number(f["latency_ms"]["p99_9"], 2)),
    ("latency max ms", lambda f: _number(f["latency_ms"]["max"], 2)),
    ("server CPU %", lambda f: _number(f["server_cpu_percent"])),
    ("server CPU µs per message", lambda f: _number(f["server_cpu_us_per_message"], 1)),
    ("Redis CPU %", lambda f: _number(f["redis_cpu_percent"]) if f["redis_cpu_percent"] is not None else "-"),
    ("Redis CPU µs per message", lambda f: _number(f["redis_cpu_us_per_message"], 1)
     if f["redis_cpu_us_per_message"] is not None else "-"),
    ("server RSS MB", lambda f: _number(f["server_rss_mb"], 1)),
    ("load generator CPU %", lambda f: _number(f["loadgen_cpu_percent"])),
    ("load generator late p99 ms", lambda f: _number(f["send_lag_ms"]["p99"], 2) if "send_lag_ms" in f else "-"),
    ("machine CPU % (all cores)", lambda f: _number(f["machine_cpu_percent"])),
    ("also limited by", lambda f: ", ".join(f["limited_by"]) or "-"),
    ("sent / accepted / delivered", lambda f: f"{f['sent']:,} / {f['accepted']:,} / {f['delivered']:,}"),
    ("lost / duplicates", lambda f: f"{f['lost']:,} / {f['duplicates']:,}"),
    ("errors", lambda f: _errors(f["errors"])),
]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def load_table(columns: dict[str, dict]) -> list[str]:
    """One column per load run (construct, bare relay, ...), one row per figure."""
    return _table(
        ["", *columns],
        [[label, *(show(figures) for figures in columns.values())] for label, show in LOAD_ROWS],
    )


def _settings_line(settings: dict) -> str:
    return ", ".join(f"{_label(key)} {_setting(value)}" for key, value in settings.items() if value is not None)


def _setting(value: Any) -> str:
    return _number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _servers_line(report: dict) -> str:
    parts = []
    for server in report.get("servers", []):
        start = server["rss_at_start_mb"]
        parts.append(f"{server['name']} pid {server['pid'] or 'unknown'}, RSS at start "
                     f"{'unknown' if start is None else f'{start} MB'}")
    limits = "" if report.get("limits", "off") == "off" else f", limits {report['limits']}"
    return f"server ({report['mode']}{limits}): " + "; ".join(parts)


def _ratio(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1%}"


LOAD_COLUMNS = {
    "construct": "construct",
    "construct_x1": "one process",
    "construct_x2": "two processes",
    "bare_relay": "bare relay",
}


def _render_load(report: dict) -> list[str]:
    results = report["results"]
    columns = {title: results[key] for key, title in LOAD_COLUMNS.items() if key in results}
    lines = load_table(columns)
    if "relay_ratio" in results:
        lines.append(f"construct / bare relay: {_ratio(results['relay_ratio'])} of the ceiling")
    if "scale_ratio" in results:
        lines.append(f"two processes / one process: {results['scale_ratio']:.2f}x"
                     if results["scale_ratio"] is not None else "two processes / one process: unknown")
    return lines


def _render_values(report: dict) -> list[str]:
    """Scenarios whose results are one column of named values."""
    rows = []
    for key, value in report["results"].items():
        label = _label(key)
        if isinstance(value, dict) and "p99" in value:
            label = _label(key.removesuffix("_ms"))
            value = f"p50 {_number(value['p50'], 2)} / p99 {_number(value['p99'], 2)} / p99.9 " \
                    f"{_number(value['p99_9'], 2)} ms ({value['samples']:,} samples)"
        elif isinstance(value, dict):
            value = _errors(value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, float):
            value = _number(value, 2 if abs(value) < 100 else 0)
        else:
            value = _number(value) if isinstance(value, int) else str(value)
        rows.append([label, value])
    return _table(["", ""], rows)[1:]


UNITS = (("_percent", " %"), ("_per_s", "/s"), ("_mb", " MB"), ("_kb", " KB"), ("_ms", " ms"), ("_seconds", " s"))


def _label(key: str) -> str:
    for suffix, unit in UNITS:
        if key.endswith(suffix):
            return key[: -len(suffix)].replace("_", " ") + unit
    return key.replace("_", " ")


def _render_probes(probes: list[dict]) -> list[str]:
    rows = [[
        _number(probe["offered_per_s"]), _number(probe["accepted_per_s"]), _number(probe["p99_ms"], 2),
        "yes" if probe["sustained"] else "no", _errors(probe["errors"]), _number(probe["server_cpu_us_per_message"], 1),
        "-" if probe["redis_cpu_us_per_message"] is None else _number(probe["redis_cpu_us_per_message"], 1),
        ", ".join(probe["limited_by"]) or "-",
    ] for probe in probes]
    return _table(["offered/s", "accepted/s", "p99 ms", "sustained", "errors", "server µs/msg", "Redis µs/msg",
                   "also limited by"], rows)


def _render_capacity(report: dict) -> list[str]:
    results = report["results"]
    capacity = results["capacity_per_s"]
    lines = _render_probes(results["probes"])
    lines.append(f"capacity: {'none found' if capacity is None else f'{capacity:,.0f} msg/s'} "
                 f"(accepted >= 99% of offered, p99 <= {results['p99_bound_ms']:g} ms)")
    if "construct" in results:
        lines += ["", "at capacity:", *load_table({"construct": results["construct"]})]
    return lines


def _render_overload(report: dict) -> list[str]:
    results = report["results"]
    lines = _render_probes(results["probes"]) + [""] if "probes" in results else []
    lines.append(f"capacity {results['capacity_per_s']:,.0f} msg/s; offered {results['offered_per_s']:,.0f} msg/s")
    lines += load_table({"construct": results["construct"]})
    lines.append(f"accepted: {results['accepted_share_of_capacity']:.1%} of capacity")
    return lines


RENDERERS = {
    "capacity": _render_capacity,
    "overload": _render_overload,
    "throughput": _render_load,
    "relay": _render_load,
    "scale-out": _render_load,
    "idle": _render_values,
    "drain": _render_values,
    "login-storm": _render_values,
}


def render(report: dict) -> str:
    if report["scenario"] == "all":
        return "\n\n".join(render(part) for part in report["reports"])
    lines = [f"== {report['scenario']} ({report['measured_at']}, {report['cpus']} cores)",
             _settings_line(report["settings"])]
    if report.get("servers"):
        lines.append(_servers_line(report))
    lines.append("")
    lines.extend(RENDERERS[report["scenario"]](report))
    return "\n".join(lines)
