"""The API's routers, one module each. A module exposes `router` (FastAPI APIRouter; its endpoints need an API key
when keys are configured), `public_router` (never: health), or both, and may expose `async def on_startup(app)` /
`async def on_shutdown(app)`, which the app's lifespan awaits in this order (shutdown in reverse). Add a module's
name here to mount it."""

from __future__ import annotations

ROUTER_MODULES: list[str] = ["health", "models", "inference", "v2", "metrics", "jobs", "samples", "web"]
