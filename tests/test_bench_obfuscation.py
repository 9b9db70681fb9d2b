"""`construct-bench obfs4` and `ws-padding` at tiny sizes: every message through each path, and the costs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet import reactor

from construct.bench import obfuscation, scenarios
from construct.bench.report import render
from construct.bench.server import ServerPlan

pytestmark = pytest.mark.integration

TINY = scenarios.LoadOptions(pairs=2, messages=150, warmup=0.0, relay=False)


def _all_delivered(figures: dict, messages: int) -> None:
    assert figures["sent"] == figures["accepted"] == figures["delivered"] == messages
    assert figures["lost"] == figures["duplicates"] == 0 and figures["errors"] == {}


@pytest_twisted.ensureDeferred
async def test_obfs4_against_tcp_through_the_same_tunnel():
    report = await obfuscation.obfs4(reactor, ServerPlan(), TINY, direct=False)
    results = report["results"]
    for path in ("tunnel", "obfs4"):
        _all_delivered(results[path], 150)
        assert results[path]["latency_ms"]["samples"] == 150
    # obfs4 frames, MACs and padding: more bytes on the wire than the JSON lines they carry.
    assert results["obfs4"]["wire_bytes_per_message"] > results["tunnel"]["wire_bytes_per_message"] > 500
    assert results["obfs4"]["obfs4proxy_server_cpu_percent"] is not None
    assert results["obfs4_ratio"] > 0 and report["settings"]["iat_mode"] == "0"
    assert "obfs4 via tunnel" in render(report) and "obfs4proxy client CPU %" in render(report)


@pytest_twisted.ensureDeferred
async def test_ws_padding_costs_bytes():
    report = await obfuscation.ws_padding(reactor, ServerPlan(), replace(TINY, messages=100))
    results = report["results"]
    for run in ("unpadded", "padded"):
        _all_delivered(results[run], 100)
    # Replies and pushes of a 256-byte content fit 512 bytes: padding adds, it never removes.
    assert results["padded"]["wire_bytes_per_message"] > results["unpadded"]["wire_bytes_per_message"]
    assert "padded / unpadded" in render(report)
