"""`construct-bench` at tiny sizes against real servers: the figures must describe what happened."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet import reactor

from construct.bench import scenarios
from construct.bench.clients import Target
from construct.bench.report import percentile, render
from construct.bench.server import LIMITS_OFF, ServerPlan, child_environment
from construct.bench.wire import CODECS, NUMBER_BASE, TCP, WS_JSON, WS_MSGPACK, SendFrames, sent_ns_of
from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL
from tests.processes import ServerProcess

pytestmark = pytest.mark.integration

TINY = scenarios.LoadOptions(pairs=2, messages=200, warmup=0.0, relay=False)


def assert_all_delivered(figures: dict, messages: int) -> None:
    assert figures["sent"] == figures["accepted"] == figures["delivered"] == messages
    assert figures["lost"] == figures["duplicates"] == figures["unanswered"] == 0
    assert figures["errors"] == {}


def assert_latency_ordered(latency: dict, samples: int) -> None:
    assert latency["samples"] == samples
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p99_9"] <= latency["max"]


@pytest.mark.parametrize("transport", [WS_MSGPACK, WS_JSON, TCP])
def test_prebuilt_send_frames_decode_as_the_message_they_stand_for(transport):
    codec = CODECS[transport]
    sender, recipient = str(uuid.uuid4()), str(uuid.uuid4())
    frames = SendFrames(codec, sender, recipient, 64)
    first, later = codec.decode(frames.frame(0, 5)), codec.decode(frames.frame(70_000, 123_456_789))
    assert first["type"] == "sendMessage"
    payload = later["payload"]
    assert uuid.UUID(payload["id"]).version == 4
    assert payload["id"] != first["payload"]["id"]
    assert (payload["from"], payload["to"]) == (sender, recipient)
    assert payload["messageNumber"] == NUMBER_BASE + 70_000
    assert len(payload["content"]) == 64 and sent_ns_of(payload["content"]) == 123_456_789


def test_percentile_is_nearest_rank():
    values = list(range(1, 1001))
    assert [percentile(values, f) for f in (0.5, 0.99, 0.999)] == [500, 990, 999]
    assert percentile([], 0.5) is None


@pytest_twisted.ensureDeferred
async def test_throughput_counts_every_message_and_compares_with_the_bare_relay():
    report = await scenarios.throughput(reactor, ServerPlan(), replace(TINY, relay=True))
    construct, relay = report["results"]["construct"], report["results"]["bare_relay"]
    for figures in (construct, relay):
        assert_all_delivered(figures, 200)
        assert_latency_ordered(figures["latency_ms"], 200)
        assert figures["delivered_per_s"] > 0
        assert figures["server_rss_mb"] > 10
        # Measured, though a tiny run can take less than one clock tick (10 ms) of CPU.
        for cpu in ("server_cpu_percent", "loadgen_cpu_percent"):
            assert isinstance(figures[cpu], (int, float)) and figures[cpu] >= 0
    assert report["results"]["relay_ratio"] == pytest.approx(construct["delivered_per_s"] / relay["delivered_per_s"],
                                                             abs=1e-3)
    assert report["servers"][0]["rss_at_start_mb"] > 10
    assert "construct / bare relay" in render(report)


@pytest_twisted.ensureDeferred
async def test_a_fixed_rate_is_offered_from_several_load_processes():
    load = replace(TINY, transport=TCP, messages=None, rate=200, duration=1.5, warmup=0.5, processes=2, pairs=4)
    figures = (await scenarios.throughput(reactor, ServerPlan(), load))["results"]["construct"]
    assert 150 <= figures["offered_per_s"] <= 230
    assert figures["sent"] == figures["accepted"] == figures["delivered"]
    assert figures["lost"] == 0 and figures["errors"] == {}
    assert_latency_ordered(figures["latency_ms"], figures["latency_ms"]["samples"])


@pytest_twisted.ensureDeferred
async def test_idle_connections_on_a_running_server(tmp_path):
    # A server the tool only targets needs the abuse limits off, as docs/performance.md says.
    server = await ServerProcess(tmp_path, "--bcrypt-cost", "4", *LIMITS_OFF).start_async()
    try:
        plan = ServerPlan(mode="external", external=Target("127.0.0.1", server.ports["http"], server.ports["tcp"]),
                          external_pid=server.process.pid)
        report = await scenarios.idle(reactor, plan, TCP, 50)
    finally:
        server.stop()
    results = report["results"]
    assert results["connections"] == 50 and results["errors"] == {}
    assert isinstance(results["server_per_connection_kb"], float)
    assert results["server_rss_after_mb"] > 10


@pytest_twisted.ensureDeferred
async def test_drain_delivers_the_whole_backlog_in_order():
    results = (await scenarios.drain(reactor, ServerPlan(), WS_JSON, 300, 64))["results"]
    assert results["queued"] == results["received"] == 300
    assert results["duplicates"] == 0 and results["errors"] == {}
    assert 0 < results["first_message_ms"] <= results["drain_seconds"] * 1000


@pytest_twisted.ensureDeferred
async def test_login_storm_reports_latency_before_and_during():
    load = replace(TINY, messages=None, rate=100, warmup=0.3)
    results = (await scenarios.login_storm(reactor, ServerPlan(), load, logins=5, before=1.0, bcrypt_cost=4))["results"]
    assert results["login_errors"] == {} and results["message_errors"] == {}
    assert results["storm_seconds"] > 0 and results["lost"] == 0
    assert results["latency_before_ms"]["samples"] > 0


@pytest_twisted.ensureDeferred
async def test_scale_out_runs_one_then_two_production_processes():
    plan = ServerPlan(mode="production", postgres_admin_url=POSTGRES_ADMIN_URL, redis_url=REDIS_URL)
    results = (await scenarios.scale_out(reactor, plan, TINY, cross=True))["results"]
    assert_all_delivered(results["construct_x1"], 200)
    assert_all_delivered(results["construct_x2"], 200)
    assert results["scale_ratio"] > 0


def test_cli_prints_a_json_report_of_the_bare_relay():
    output = subprocess.run(
        [sys.executable, "-m", "construct.bench", "relay", "--json", "--transport", "tcp", "--pairs", "1",
         "--messages", "100", "--warmup", "0"],
        capture_output=True, text=True, timeout=60, env=child_environment(),
    )
    assert output.returncode == 0, output.stderr
    report = json.loads(output.stdout)
    assert report["scenario"] == "relay" and report["settings"]["transport"] == "tcp"
    relay = report["results"]["bare_relay"]
    assert_all_delivered(relay, 100)
    assert set(relay["latency_ms"]) == {"samples", "p50", "p99", "p99_9", "max"}


@pytest.mark.parametrize("limit", [50.0, 350.0, 3_300.0, 7_900.0, 150_000.0])
@pytest_twisted.ensureDeferred
async def test_the_capacity_search_finds_the_limit_to_its_resolution(limit):
    """Against a server that sustains everything up to `limit`: the answer is sustained, within
    the resolution of the limit, and no probe beyond the highest rate allowed was tried."""
    search = scenarios.Search(start_rate=1000, max_rate=100_000, resolution=0.05)
    probed: list[float] = []

    async def probe(rate: float) -> bool:
        probed.append(rate)
        return rate <= limit

    found = await scenarios.search_capacity(probe, search)
    assert max(probed) <= search.max_rate
    if limit < search.start_rate / 10:
        assert found is None
    elif limit >= search.max_rate:
        assert found == max(rate for rate in probed if rate <= search.max_rate)
    else:
        assert found <= limit and limit - found <= search.resolution * found + 1


@pytest_twisted.ensureDeferred
async def test_overload_reports_what_is_accepted_past_a_given_capacity():
    """Twice a (small) capacity offered to an embedded server: every figure is there and honest."""
    load = replace(TINY, messages=None, duration=2.0, warmup=0.5, pairs=20)
    report = await scenarios.overload(reactor, ServerPlan(), load, scenarios.Search(), 200.0, 2.0)
    results = report["results"]
    construct = results["construct"]
    assert results["offered_per_s"] == 400.0
    assert construct["accepted_per_s"] > 0 and construct["lost"] == 0
    assert results["accepted_share_of_capacity"] == round(construct["accepted_per_s"] / 200.0, 3)
    assert construct["server_cpu_us_per_message"] > 0
    assert "overload" in render(report)
