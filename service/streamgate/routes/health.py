"""Liveness, readiness and Prometheus metrics: cheap, no upstream call."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from .. import metrics

router = APIRouter()


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready: settings loaded, an upstream configured, the client made by the lifespan."""
    state = request.app.state
    settings = getattr(state, "settings", None)
    problems = []
    if settings is None:
        problems.append("settings not loaded")
    elif not settings.upstream_configured:
        problems.append("no upstream: set STREAMGATE_UPSTREAM_API_KEY or a base URL")
    if getattr(state, "upstream_client", None) is None:
        problems.append("upstream client not started")
    if problems:
        return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
    # Not the upstream's URL: internal addresses are nobody's business (the log has it).
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
