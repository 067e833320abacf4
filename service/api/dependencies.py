"""FastAPI dependencies shared by the routers: settings, readiness, the served model of a path, input decoding.

Routers of other packages (e.g. the jobs router) can use `require_ready`, `served_model`,
`require_api_key` (service.api.security) and `decode_json_images` / `decode_upload` the same way.
Dependencies are `async def`: plain functions would each cost a hop to a thread pool per request.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Path, Request, UploadFile

from service.api.errors import ProblemError
from service.api.json_body import INLINE_BYTES
from service.api.runtime import ServedModel
from service.api.schemas import ImagesInput
from service.config import Settings
from service.data.images import DecodedBatch, InputLimits, decode_base64_images, decode_files, nested_batch


def check_ready(request: Request) -> None:
    """503 until every model is loaded and warmed up, and while the model process (when there is one) is down."""
    if not request.app.state.ready:
        error = request.app.state.load_error
        detail = f"the service failed to load its models: {error}" if error else "the models are still loading"
        raise ProblemError(503, "not_ready", detail, headers={"Retry-After": "1"})
    link = request.app.state.model_link
    if link is not None and not link.connected:
        raise ProblemError(503, "model_unavailable", "the model process is not reachable (it is restarting)",
                           headers={"Retry-After": "1"})


def lookup_model(request: Request, name: str) -> ServedModel:
    """The served model called `name`, or 404 naming the known ones."""
    models: dict[str, ServedModel] = request.app.state.models
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        raise ProblemError(404, "unknown_model", f"no model named {name!r} is served (known: {known})")
    return models[name]


ModelName = Annotated[str, Path(description="Model name, e.g. 'lenet5'.", examples=["lenet5"])]


async def require_ready(request: Request) -> None:
    """Dependency: 503 until every model is loaded and warmed up."""
    check_ready(request)


async def served_model(request: Request, model: ModelName) -> ServedModel:
    """Dependency: the model named in the path (404 when unknown, 503 while loading)."""
    check_ready(request)
    return lookup_model(request, model)


def input_limits(settings: Settings) -> InputLimits:
    return InputLimits(max_side=settings.max_image_side, max_pixels=settings.max_image_pixels,
                       max_batch=settings.max_batch_size)


def require_content_type(request: Request, *expected: str) -> None:
    """415 unless the request's media type is one of `expected`."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in expected:
        raise ProblemError(415, "unsupported_media_type",
                           f"this endpoint takes {' or '.join(expected)}, not {media or 'a body without a type'}")


async def require_json(request: Request) -> None:
    require_content_type(request, "application/json")


async def require_multipart(request: Request) -> None:
    require_content_type(request, "multipart/form-data")


def _single_image(tensor: list) -> bool:
    """A tensor of one image ([1, ...] or [H, W] rows of numbers): small enough to decode inline."""
    return len(tensor) == 1 or (bool(tensor) and isinstance(tensor[0], list) and bool(tensor[0])
                                and not isinstance(tensor[0][0], list))


async def decode_json_images(body: ImagesInput, model: ServedModel, settings: Settings) -> DecodedBatch:
    """The images of a JSON body, validated against the model's input shape. Only small inputs of the model's own
    size are decoded on the event loop (an image of another size is refused from its header, before decoding);
    large ones, and any to resize, are decoded in a thread."""
    limits = input_limits(settings)
    if body.images is not None:
        if sum(len(text) for text in body.images) <= INLINE_BYTES and not body.resize:
            return decode_base64_images(body.images, model.shape, limits, body.resize)
        return await asyncio.to_thread(decode_base64_images, body.images, model.shape, limits, body.resize)
    assert body.tensor is not None
    if _single_image(body.tensor) and not body.resize:
        return nested_batch(body.tensor, model.shape, limits, body.resize)
    return await asyncio.to_thread(nested_batch, body.tensor, model.shape, limits, body.resize)


async def decode_upload(files: list[UploadFile], model: ServedModel, settings: Settings,
                        resize: bool) -> DecodedBatch:
    """Uploaded PNG/JPEG/.npy files, validated against the model's input shape."""
    limits = input_limits(settings)
    if len(files) > limits.max_batch:
        raise ProblemError(413, "batch_too_large", f"{len(files)} files, over the batch limit of {limits.max_batch}")
    contents = [await f.read() for f in files]
    if sum(len(c) for c in contents) <= INLINE_BYTES and not resize:
        return decode_files(contents, model.shape, limits, resize)
    return await asyncio.to_thread(decode_files, contents, model.shape, limits, resize)
