"""The HTTP app of a process: the services' routes plus /healthz, /readyz, /metrics, request ids,
access metrics and JSON errors."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lucerna.core.logging import correlation_id
from lucerna.core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from lucerna.core.service import HasReadiness, Resources, Service
from lucerna.core.worker_metrics import exposition

log = logging.getLogger(__name__)

SERVICE_STOP_SECONDS = 20.0  # one service's stop; the workers' supervisor allows 30 s in all


class RequestContext:
    """ASGI middleware: request id (X-Request-ID in and out), access metrics by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Wrap one HTTP request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = correlation_id.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = _route_template(scope)
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)
            correlation_id.reset(token)


def _route_template(scope: Scope) -> str:
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "?"))
    return "unmatched"


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error; see the server log for this request id"}, 500)


def create_app(resources: Resources, services: Sequence[Service]) -> Starlette:
    """One app serving the given services over shared resources."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "services": [s.name for s in services]})

    async def readyz(_: Request) -> Response:
        checks = {
            "metadata": resources.metadata.ping(),
            "search": resources.search.ping(),
            "bus": resources.bus.ping(),
        }
        results = await asyncio.gather(*checks.values(), return_exceptions=True)
        status = {name: result is True for name, result in zip(checks, results, strict=True)}
        for service in services:
            if isinstance(service, HasReadiness):
                try:
                    own = await service.readiness()
                except Exception:  # a failing check is a not-ready service, not a 500
                    log.exception("readiness check of %s failed", service.name)
                    own = {"readiness": False}
                status |= {f"{service.name}.{name}": ok is True for name, ok in own.items()}
        return JSONResponse(
            {"ready": all(status.values()), "checks": status}, 200 if all(status.values()) else 503
        )

    async def metrics(_: Request) -> Response:
        # Every worker's counts, whichever worker answers (ADR 0021).
        return PlainTextResponse(exposition(), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await resources.metadata.start()
        await resources.search.start()
        await resources.bus.start()
        for service in services:
            await service.start(resources)
        log.info("ready", extra={"services": [s.name for s in services]})
        try:
            yield
        finally:
            for service in reversed(services):
                try:
                    await asyncio.wait_for(service.stop(), SERVICE_STOP_SECONDS)
                except Exception:  # a service that cannot stop must not keep the others running
                    log.exception("%s did not stop cleanly within %.0f s", service.name, SERVICE_STOP_SECONDS)
            await resources.audit_trail.close()
            await resources.bus.close()
            await resources.search.close()
            await resources.metadata.close()
            log.info("stopped", extra={"services": [s.name for s in services]})

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    for service in services:
        routes.extend(service.routes(resources))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected_error},
    )
    app.add_middleware(RequestContext)
    return app
