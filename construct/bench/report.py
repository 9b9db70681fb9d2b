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


def load_figures(outcome: dict, server_pids: list[int | None], server_rss: list[int | None]) -> dict:
    """What one load run shows: rates over the measured window, latency, CPU, memory, losses, errors."""
    measured = outcome["measured"]
    seconds = max(measured["until"] - measured["from"], 1e-9)
    cpu = outcome["cpu"] or {"processes": {}, "machine": None}
    by_pid = cpu["processes"]
    rss = _sum_known(server_rss)
    return {
        "window_s": round(seconds, 3),
        "offered_per_s": round(measured["sent"] / seconds, 1),
        "accepted_per_s": round(measured["accepted"] / seconds, 1),
        "delivered_per_s": round(measured["delivered"] / seconds, 1),
        "latency_ms": latency_summary(outcome["latency_us"]),
        "sent": outcome["sent"],
        "accepted": outcome["accepted"],
        "delivered": outcome["delivered"],
        "duplicates": outcome["duplicates"],
        "lost": outcome["lost"],
        "unanswered": outcome["unanswered"],
        "errors": outcome["errors"],
        "server_cpu_percent": _rounded(_sum_known([by_pid.get(pid) for pid in server_pids])),
        "server_rss_mb": None if rss is None else round(rss / MB, 1),
        "loadgen_cpu_percent": _rounded(_sum_known([by_pid.get(pid) for pid in outcome["load_pids"]])),
        "machine_cpu_percent": _rounded(cpu["machine"]),
    }


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
    ("server RSS MB", lambda f: _number(f["server_rss_mb"], 1)),
    ("load generator CPU %", lambda f: _number(f["loadgen_cpu_percent"])),
    ("machine CPU % (all cores)", lambda f: _number(f["machine_cpu_percent"])),
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
    return f"server ({report['mode']}): " + "; ".join(parts)


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


RENDERERS = {
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
