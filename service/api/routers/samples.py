"""The bundled test digits (the 'test' split of the MNIST digits the package ships), to try the API on without
images of one's own: their labels, and each as a PNG. The web page offers them to pick from."""

from __future__ import annotations

import asyncio
from functools import lru_cache

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field

from service.api.errors import ProblemError, problem_responses
from service.data.mnist import CLASS_NAMES, load_mnist
from service.data.sources import png_bytes

router = APIRouter(prefix="/v1/samples", tags=["samples"])
DATASET = "mnist:test"


class SampleList(BaseModel):
    dataset: str = Field(description="The server-side dataset name (as jobs take it) the samples are.")
    count: int = Field(description="How many samples there are: GET /v1/samples/{index} takes 0 to count - 1.")
    shape: list[int] = Field(description="[C, H, W] of each sample.")
    class_names: list[str]
    labels: list[int] = Field(description="The true class of each sample, by index.")


@lru_cache(maxsize=1)
def test_digits() -> tuple[list[bytes], list[int], list[int]]:
    """Every test digit as 8-bit grayscale PNG bytes, the labels, and the [C, H, W] shape (made once: about
    1000 x 300 bytes)."""
    images, labels = load_mnist("test")
    return [png_bytes(image.numpy()) for image in images], labels.tolist(), list(images.shape[1:])


@router.get("", response_model=SampleList, responses=problem_responses(401),
            summary="The bundled test digits: their labels (GET /v1/samples/{index} gives each as PNG).")
async def list_samples() -> SampleList:
    _, labels, shape = await asyncio.to_thread(test_digits)
    return SampleList(dataset=DATASET, count=len(labels), shape=shape, class_names=CLASS_NAMES, labels=labels)


PNG_RESPONSE = {"description": "The digit as an 8-bit grayscale PNG (28x28); its label in the X-Label header.",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}


@router.get("/{index}", response_class=Response, responses={200: PNG_RESPONSE, **problem_responses(401, 404, 422)},
            summary="One bundled test digit as PNG.")
async def sample(index: int = Path(ge=0, description="0 to count - 1 (GET /v1/samples)")) -> Response:
    pngs, labels, _ = await asyncio.to_thread(test_digits)
    if index >= len(pngs):
        raise ProblemError(404, "sample_not_found", f"there is no sample {index}: the samples are 0 to "
                           f"{len(pngs) - 1}")
    return Response(pngs[index], media_type="image/png", headers={"X-Label": str(labels[index]),
                                                                  "Cache-Control": "private, max-age=86400"})
