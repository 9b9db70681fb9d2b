"""GET /health (200, or 503 naming what is down) and GET /metrics (Prometheus text)."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from construct.errors import ConstructError
from construct.http.request import NamelessRequest
from construct.metrics import Metrics

HEALTH_CHECK_TIMEOUT = 5.0


class HealthResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, checks: dict[str, Callable[[], Awaitable[None]]], clock: Any) -> None:
        super().__init__()
        self._checks = checks
        self._clock = clock

    def render_GET(self, request: Any) -> Any:
        gone: list = []
        # Fires (with a failure) if the prober disconnects; appending consumes that failure.
        request.notifyFinish().addBoth(gone.append)
        ensureDeferred(self._respond(request, gone)).addErrback(
            lambda failure: self.log.failure("health check response failed", failure)
        )
        return NOT_DONE_YET

    async def _respond(self, request: Any, gone: list) -> None:
        results = {}
        for name, check in self._checks.items():
            try:
                await ensureDeferred(check()).addTimeout(HEALTH_CHECK_TIMEOUT, self._clock)
                results[name] = "ok"
            except ConstructError as e:
                results[name] = f"down: {e.message}"
            except Exception as e:
                results[name] = f"down: {type(e).__name__}: {str(e)[:200]}"
        healthy = all(result == "ok" for result in results.values())
        if gone:
            # The prober gave up while the checks ran; there is no one to answer.
            return
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps({"status": "ok" if healthy else "unavailable", "checks": results}).encode())
        request.finish()


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._metrics.render()


class QuietSite(Site):
    noisy = False
    requestFactory = NamelessRequest

    def log(self, request: Any) -> None:
        """Scrapes every few seconds would drown the log."""


def build_health_site(checks: dict[str, Callable[[], Awaitable[None]]], metrics: Metrics, clock: Any) -> Site:
    root = Resource()
    root.putChild(b"health", HealthResource(checks, clock))
    root.putChild(b"metrics", MetricsResource(metrics))
    site = QuietSite(root)
    site.displayTracebacks = False
    return site
