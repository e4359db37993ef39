"""The HTTP sidecar: the HEAD idempotency check, health, readiness and metrics.

Backed by the same ``Service`` as MQTT; errors map to HTTP statuses through the error tree.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.core.auth import TokenVerifier
from gateway.core.rules import Principal
from gateway.errors import (
    InvalidRequest,
    RequestError,
    StoreUnavailable,
    Unavailable,
    as_request_error,
    error_body,
)
from gateway.metrics import Metrics
from gateway.service import Service

log = logging.getLogger(__name__)

API = "/api/control/production"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(exc: BaseException) -> web.Response:
    if isinstance(exc, StoreUnavailable):
        exc = Unavailable("the database is unavailable; retry later")
    err = as_request_error(exc)
    return json_response({"status": "error", "error": error_body(err)}, status=err.http_status)


class HttpSidecar:
    """An aiohttp application around the service; ``ready()`` decides ``/readyz``."""

    def __init__(
        self,
        service: Service,
        verifier: TokenVerifier,
        metrics: Metrics,
        *,
        ready: Callable[[], dict[str, bool]],
    ) -> None:
        self.service = service
        self.verifier = verifier
        self.metrics = metrics
        self._ready = ready
        self.app = web.Application(middlewares=[self._errors], client_max_size=1024**2)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.render_metrics)
        # add_get also answers HEAD
        self.app.router.add_get(f"{API}/records/check-idempotency", self.check_idempotency)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (RequestError, StoreUnavailable) as exc:
            return error_response(exc)
        except Exception as exc:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(exc)

    async def principal(self, request: web.Request) -> Principal:
        claims = self.verifier.verify(request.headers.get("Authorization"))
        return await self.service.principal(claims)

    async def healthz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        checks = self._ready()
        ok = all(checks.values())
        return json_response(
            {"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503
        )

    async def render_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain")

    async def check_idempotency(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        key = request.query.get("key")
        if not key:
            raise InvalidRequest(
                "query parameter key is required, e.g. ?key=client:SESSION:WORKER:EVENT"
            )
        exists = await self.service.check_key(who, key)
        return json_response(
            {"status": "success", "data": {"key": key, "exists": exists}}, 200 if exists else 404
        )


async def start_http(sidecar: HttpSidecar, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (for cleanup) and the bound port (useful with port 0)."""
    runner = web.AppRunner(sidecar.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
