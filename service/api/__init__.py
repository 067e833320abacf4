"""The HTTP API: FastAPI app factory, routers, schemas, auth, limits and micro-batching."""

from service.api.app import create_app

__all__ = ["create_app"]
