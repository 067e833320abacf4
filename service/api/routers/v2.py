"""The Open Inference Protocol v2 (KServe / Triton) paths: server and model health, metadata, tensor inference.

Inference takes one input tensor [N, C, H, W] (or [C, H, W]) of pixel values and returns the outputs
`logits` [N, K], `probabilities` [N, K], `predictions` [N] and, for models with a detector, `adversarial_score`
[N] and `adversarial` [N] (at the detector's threshold). Errors are problem documents that also carry the
protocol's `error` field.
"""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request

from service.api.dependencies import check_ready, input_limits, lookup_model, require_json
from service.api.errors import ProblemError, problem_responses
from service.api.json_body import OffLoopJSONRoute
from service.api.micro_batcher import micro_batched
from service.api.routers.inference import run_batched
from service.api.runtime import ServedModel
from service.api.schemas import (
    InferRequest,
    InferResponse,
    InferTensor,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
    V2Health,
)
from service.data.images import tensor_batch

public_router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])  # health: never needs a key
router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=OffLoopJSONRoute)

DATATYPES: dict[str, Any] = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "UINT16": np.uint16,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
}
OUTPUTS = ("logits", "probabilities", "predictions", "adversarial_score", "adversarial")


async def v2_model(request: Request,
             model_name: Annotated[str, Path(description="Model name.", examples=["lenet5"])]) -> ServedModel:
    check_ready(request)
    return lookup_model(request, model_name)


V2Model = Annotated[ServedModel, Depends(v2_model)]


def output_names(model: ServedModel) -> list[str]:
    return list(OUTPUTS) if model.detector is not None else list(OUTPUTS[:3])


@public_router.get("/health/live", response_model=V2Health, summary="OIP v2 server liveness.")
async def v2_live() -> V2Health:
    return V2Health(live=True)


@public_router.get("/health/ready", response_model=V2Health, responses=problem_responses(503),
                   summary="OIP v2 server readiness.")
async def v2_ready(request: Request) -> V2Health:
    check_ready(request)
    return V2Health(ready=True)


@router.get("", response_model=ServerMetadata, responses=problem_responses(401),
                   summary="OIP v2 server metadata.")
async def v2_server(request: Request) -> ServerMetadata:
    return ServerMetadata(name="fisher-guard", version=request.app.version, extensions=[])


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=problem_responses(401, 404, 503),
                   summary="OIP v2 model metadata: input and output tensors.")
async def v2_model_metadata(model: V2Model) -> ModelMetadata:
    c, h, w = model.shape
    k = model.card.num_classes
    outputs = [TensorMetadata(name="logits", datatype="FP32", shape=[-1, k]),
               TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, k]),
               TensorMetadata(name="predictions", datatype="INT64", shape=[-1])]
    if model.detector is not None:
        outputs += [TensorMetadata(name="adversarial_score", datatype="FP64", shape=[-1]),
                    TensorMetadata(name="adversarial", datatype="BOOL", shape=[-1])]
    return ModelMetadata(name=model.name, versions=[model.sha256], platform="pytorch",
                         inputs=[TensorMetadata(name="input", datatype="FP32", shape=[-1, c, h, w])], outputs=outputs)


@router.get("/models/{model_name}/ready", response_model=V2Health, responses=problem_responses(401, 404, 503),
                   summary="OIP v2 model readiness.")
async def v2_model_ready(model: V2Model) -> V2Health:
    return V2Health(ready=True)


INLINE_VALUES = 4096  # tensors this small are converted on the event loop: cheaper than a hop to a thread


def input_array(tensor: InferTensor) -> np.ndarray:
    """The request tensor as an array of its declared shape and datatype."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise ProblemError(422, "unsupported_datatype", f"datatype {tensor.datatype!r} is not supported (use one of "
                           f"{', '.join(DATATYPES)})")
    if any(d < 0 for d in tensor.shape) or len(tensor.shape) > 8:
        raise ProblemError(422, "wrong_shape", f"shape {tensor.shape} is not a valid tensor shape")
    try:
        raw = np.asarray(tensor.data)
    except (ValueError, TypeError) as exc:
        raise ProblemError(422, "invalid_tensor", "data must be numbers, flat or nested, in row-major order") from exc
    if raw.dtype.kind not in "biuf":
        raise ProblemError(422, "invalid_tensor", f"data must be JSON numbers (or booleans for BOOL), not {raw.dtype}")
    flat = raw.astype(np.float64).reshape(-1)
    expected = math.prod(tensor.shape)  # a Python int: no overflow on absurd shapes
    if flat.size != expected:
        raise ProblemError(422, "wrong_shape", f"data has {flat.size} values but shape {tensor.shape} needs {expected}")
    if np.dtype(dtype).kind in "biu":  # integer and boolean types: whole numbers in the type's range
        info = (0, 1) if dtype is np.bool_ else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if not ((flat == np.round(flat)) & (flat >= info[0]) & (flat <= info[1])).all():
            raise ProblemError(422, "invalid_tensor", f"data holds values that are not {tensor.datatype} "
                               f"(whole numbers {info[0]}..{info[1]})")
    if tensor.datatype == "UINT8":
        flat = flat / 255.0  # the datatype says 0-255, even for an image whose values are all 0 or 1
    return flat.reshape(tensor.shape)


@router.post("/models/{model_name}/infer", response_model=InferResponse, dependencies=[Depends(require_json)],
                    responses=problem_responses(400, 401, 404, 413, 415, 422, 503),
                    summary="OIP v2 inference: logits, probabilities, predictions and the adversarial score.")
@micro_batched
async def v2_infer(body: InferRequest, request: Request, model: V2Model) -> InferResponse:
    tensor, limits = body.inputs[0], input_limits(request.app.state.settings)
    if math.prod(max(d, 0) for d in tensor.shape) <= INLINE_VALUES:
        batch = tensor_batch(input_array(tensor), model.shape, limits)
    else:  # a large tensor is converted off the event loop, which every other request shares
        batch = await asyncio.to_thread(lambda: tensor_batch(input_array(tensor), model.shape, limits))
    available = output_names(model)
    wanted = [o.name for o in body.outputs] if body.outputs else available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ProblemError(422, "unknown_output", f"unknown outputs {unknown} (available: {', '.join(available)})")
    results = await run_batched(model, ("infer",), model.infer_batch, batch.images)
    n, k = len(results), model.card.num_classes
    scored = bool(results) and "score" in results[0]
    columns: dict[str, tuple[str, list[int], list[Any]]] = {
        "logits": ("FP32", [n, k], [v for r in results for v in r["logits"]]),
        "probabilities": ("FP32", [n, k], [v for r in results for v in r["probabilities"]]),
        "predictions": ("INT64", [n], [r["prediction"] for r in results]),
    }
    if scored:
        columns["adversarial_score"] = ("FP64", [n], [r["score"] for r in results])
        columns["adversarial"] = ("BOOL", [n], [r["score"] >= r["threshold"] for r in results])
        metrics = request.app.state.metrics
        metrics.screened.labels(model.name).inc(n)
        metrics.adversarial.labels(model.name).inc(sum(r["score"] >= r["threshold"] for r in results))
    outputs = [InferTensor(name=name, datatype=columns[name][0], shape=columns[name][1], data=columns[name][2])
               for name in wanted]
    method = "forward pass" + (f" + detector on Fisher features '{model.detector.feature_set}'"
                               if model.detector is not None else "")
    parameters: dict[str, Any] = {"sha256": model.sha256, "method": method}
    if scored:
        parameters["detector_id"] = results[0]["detector_id"]
    if batch.notes:
        parameters["notes"] = batch.notes
    return InferResponse(model_name=model.name, model_version=model.sha256, id=body.id, parameters=parameters,
                         outputs=outputs)


