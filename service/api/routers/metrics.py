"""Prometheus metrics (API key needed when keys are configured)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.errors import problem_responses
from service.api.security import require_api_key

router = APIRouter(tags=["health"], dependencies=[Depends(require_api_key)])


@router.get("/metrics", response_class=PlainTextResponse, responses=problem_responses(401),
            summary="Prometheus metrics: requests, latencies, batch sizes, images screened, verdicts.")
async def metrics(request: Request) -> PlainTextResponse:
    body = request.app.state.metrics.exposition()
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
