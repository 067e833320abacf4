"""Liveness and readiness (no API key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.dependencies import check_ready
from service.api.errors import problem_responses
from service.api.schemas import Liveness, Readiness

public_router = APIRouter(prefix="/health", tags=["health"])


@public_router.get("/live", response_model=Liveness, summary="Liveness: the process answers.")
async def live() -> Liveness:
    return Liveness()


@public_router.get("/ready", response_model=Readiness, responses=problem_responses(503),
            summary="Readiness: every model (and detector) is loaded and warmed up.")
async def ready(request: Request) -> Readiness:
    check_ready(request)
    return Readiness(models=sorted(request.app.state.models))
