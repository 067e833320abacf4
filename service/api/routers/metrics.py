"""Prometheus metrics (API key needed when keys are configured)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.errors import problem_responses

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse, responses=problem_responses(401),
            summary="Prometheus metrics: requests, latencies, batch sizes, images screened, verdicts.")
async def metrics(request: Request) -> PlainTextResponse:
    body = request.app.state.metrics.exposition()
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
