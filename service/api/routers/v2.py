"""The Open Inference Protocol v2 (KServe / Triton) paths: server and model health, metadata, tensor inference, and
Triton's binary tensor data, model configuration and statistics extensions; each model path also under
`/versions/{model_version}` (a model has one version: the sha256 of its weights, which its metadata lists).

Inference takes one input tensor [N, C, H, W] (or [C, H, W]) of pixel values, or a BYTES tensor [N] of encoded
images (PNG, JPEG, .npy; binary data only), and returns the outputs `logits` [N, K], `probabilities` [N, K],
`predictions` [N] and, for models with a detector, `adversarial_score` [N] and `adversarial` [N] (at the
detector's threshold). A request may come without a Content-Type, as JSON, or as a JSON header followed by binary
tensors (service.api.v2_binary); outputs come as JSON, or as binary data when asked for. Errors on these paths
are the protocol's `{"error": "..."}` documents (service.api.errors.V2Error), which Triton's and KServe's
clients show.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, Response

from service.api.dependencies import check_ready, input_limits, lookup_model
from service.api.errors import ProblemError, problem_responses
from service.api.json_body import OffLoopJSONRoute
from service.api.metrics import OIP_WORK, InferenceStatistics
from service.api.micro_batcher import micro_batched
from service.api.routers.inference import run_batched
from service.api.runtime import ServedModel
from service.api.schemas import (
    ConfigReshape,
    ConfigTensor,
    InferenceStatisticsResponse,
    InferRequest,
    InferResponse,
    InferTensor,
    ModelConfig,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
    V2Health,
)
from service.api.v2_binary import (
    BINARY_MEDIA_TYPE,
    BYTES,
    DTYPES,
    HEADER_LENGTH,
    binary_array,
    binary_response,
    binary_size,
    bytes_elements,
    output_bytes,
    split_body,
    take_inputs,
)
from service.data.images import DecodedBatch, decode_files, tensor_batch

public_router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])  # health: never needs a key
router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=OffLoopJSONRoute)

PLATFORM = "pytorch_libtorch"  # Triton's platform name for PyTorch models
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
TRITON_TYPES = {"FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL"}
SCREEN_OUTPUTS = ("adversarial_score", "adversarial")  # the detector's outputs: only these need the screen
TENSOR_BYTES = "fisher_guard.v2_tensor_bytes"  # scope key: the body's bytes after the JSON header
ACCEPTED_MEDIA = ("", "application/json", BINARY_MEDIA_TYPE)  # Triton's clients send no Content-Type at all
INLINE_VALUES = 4096  # tensors this small are converted on the event loop: cheaper than a hop to a thread

ModelNamePath = Annotated[str, Path(description="Model name.", examples=["lenet5"])]
VersionPath = Annotated[str, Path(description="Model version: the sha256 of its weights (its metadata lists it).")]


def versions(model: ServedModel) -> list[str]:
    """A model's versions: one, the sha256 of the weights it serves."""
    return [model.sha256]


def check_version(model: ServedModel, version: str) -> None:
    if version not in versions(model):
        raise ProblemError(404, "unknown_version", f"model {model.name!r} has no version {version!r} (its version "
                           f"is {versions(model)[0]})")


async def v2_model(request: Request, model_name: ModelNamePath) -> ServedModel:
    check_ready(request)
    return lookup_model(request, model_name)


async def v2_model_version(request: Request, model_name: ModelNamePath, model_version: VersionPath) -> ServedModel:
    model = await v2_model(request, model_name)
    check_version(model, model_version)
    return model


V2Model = Annotated[ServedModel, Depends(v2_model)]
V2ModelVersion = Annotated[ServedModel, Depends(v2_model_version)]
MODEL_ERRORS = problem_responses(401, 404, 503)


def output_metadata(model: ServedModel) -> list[TensorMetadata]:
    k = model.card.num_classes
    outputs = [TensorMetadata(name="logits", datatype="FP32", shape=[-1, k]),
               TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, k]),
               TensorMetadata(name="predictions", datatype="INT64", shape=[-1])]
    if model.detector is not None:
        outputs += [TensorMetadata(name="adversarial_score", datatype="FP64", shape=[-1]),
                    TensorMetadata(name="adversarial", datatype="BOOL", shape=[-1])]
    return outputs


def output_names(model: ServedModel) -> list[str]:
    return [t.name for t in output_metadata(model)]


# ---- health and metadata ----

@public_router.get("/health/live", response_model=V2Health, summary="OIP v2 server liveness.")
async def v2_live() -> V2Health:
    return V2Health(live=True)


@public_router.get("/health/ready", response_model=V2Health, responses=problem_responses(503),
                   summary="OIP v2 server readiness.")
async def v2_ready(request: Request) -> V2Health:
    check_ready(request)
    return V2Health(ready=True)


@router.get("", response_model=ServerMetadata, responses=problem_responses(401), summary="OIP v2 server metadata.")
async def v2_server(request: Request) -> ServerMetadata:
    return ServerMetadata(name="fisher-guard", version=request.app.version, extensions=EXTENSIONS)


@router.get("/models/stats", response_model=InferenceStatisticsResponse, responses=problem_responses(401, 503),
            summary="OIP v2 statistics extension: every model's inference statistics.")
async def v2_all_statistics(request: Request) -> InferenceStatisticsResponse:
    check_ready(request)
    models: dict[str, ServedModel] = request.app.state.models
    return InferenceStatisticsResponse.model_validate(
        {"model_stats": [statistics_of(request, models[name]) for name in sorted(models)]})


def model_metadata(model: ServedModel) -> ModelMetadata:
    c, h, w = model.shape
    return ModelMetadata(name=model.name, versions=versions(model), platform=PLATFORM,
                         inputs=[TensorMetadata(name="input", datatype="FP32", shape=[-1, c, h, w])],
                         outputs=output_metadata(model))


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=MODEL_ERRORS,
            summary="OIP v2 model metadata: input and output tensors.")
async def v2_model_metadata(model: V2Model) -> ModelMetadata:
    return model_metadata(model)


@router.get("/models/{model_name}/versions/{model_version}", response_model=ModelMetadata, responses=MODEL_ERRORS,
            summary="OIP v2 model metadata of a version.")
async def v2_version_metadata(model: V2ModelVersion) -> ModelMetadata:
    return model_metadata(model)


@router.get("/models/{model_name}/ready", response_model=V2Health, responses=MODEL_ERRORS,
            summary="OIP v2 model readiness.")
async def v2_model_ready(model: V2Model) -> V2Health:
    return V2Health(ready=True)


@router.get("/models/{model_name}/versions/{model_version}/ready", response_model=V2Health, responses=MODEL_ERRORS,
            summary="OIP v2 model readiness of a version.")
async def v2_version_ready(model: V2ModelVersion) -> V2Health:
    return V2Health(ready=True)


# ---- model configuration extension ----

def config_tensor(tensor: TensorMetadata) -> ConfigTensor:
    """A metadata tensor [-1, ...] as a Triton config tensor: dims without the batch; a scalar per item is [1]
    reshaped to []."""
    dims = tensor.shape[1:]
    return ConfigTensor(name=tensor.name, data_type=TRITON_TYPES[tensor.datatype], dims=dims or [1],
                        reshape=None if dims else ConfigReshape(shape=[]))


def model_config(model: ServedModel, request: Request) -> ModelConfig:
    settings = request.app.state.settings
    c, h, w = model.shape
    device = model.device
    group: dict[str, Any] = {"name": f"{model.name}_0", "kind": "KIND_GPU" if device.type == "cuda" else "KIND_CPU",
                             "count": 1}
    if device.type == "cuda":
        group["gpus"] = [device.index or 0]
    parameters = {"sha256": model.sha256, "architecture": model.card.architecture,
                  "class_names": ",".join(model.card.class_names), "batch_max_size": str(settings.batch_max_size)}
    if model.detector is not None:
        parameters |= {"detector_id": model.detector_state.id or "", "feature_set": model.detector.feature_set,
                       "threshold": repr(float(model.detector.threshold))}
    return ModelConfig(
        name=model.name, platform=PLATFORM, backend="pytorch", version_policy={"latest": {"num_versions": 1}},
        max_batch_size=settings.max_batch_size,
        input=[ConfigTensor(name="input", data_type="TYPE_FP32", format="FORMAT_NCHW", dims=[c, h, w])],
        output=[config_tensor(t) for t in output_metadata(model)],
        dynamic_batching={"max_queue_delay_microseconds": round(settings.batch_max_wait_ms * 1000)},
        instance_group=[group], parameters={key: {"string_value": value} for key, value in parameters.items()})


@router.get("/models/{model_name}/config", response_model=ModelConfig, responses=MODEL_ERRORS,
            response_model_exclude_none=True, summary="OIP v2 model configuration extension (Triton's field names).")
async def v2_model_config(model: V2Model, request: Request) -> ModelConfig:
    return model_config(model, request)


@router.get("/models/{model_name}/versions/{model_version}/config", response_model=ModelConfig,
            responses=MODEL_ERRORS, response_model_exclude_none=True,
            summary="OIP v2 model configuration of a version.")
async def v2_version_config(model: V2ModelVersion, request: Request) -> ModelConfig:
    return model_config(model, request)


# ---- statistics extension ----

def statistics_of(request: Request, model: ServedModel) -> dict[str, Any]:
    return request.app.state.metrics.model_statistics(model.name).as_triton(model.name, versions(model)[0])


@router.get("/models/{model_name}/stats", response_model=InferenceStatisticsResponse, responses=MODEL_ERRORS,
            summary="OIP v2 statistics extension: the model's inference requests, queue and compute times.")
async def v2_model_statistics(model: V2Model, request: Request) -> InferenceStatisticsResponse:
    return InferenceStatisticsResponse.model_validate({"model_stats": [statistics_of(request, model)]})


@router.get("/models/{model_name}/versions/{model_version}/stats", response_model=InferenceStatisticsResponse,
            responses=MODEL_ERRORS, summary="OIP v2 statistics of a version.")
async def v2_version_statistics(model: V2ModelVersion, request: Request) -> InferenceStatisticsResponse:
    return InferenceStatisticsResponse.model_validate({"model_stats": [statistics_of(request, model)]})


# ---- inference ----

def replayed(body: bytes, receive: Callable[[], Coroutine[Any, Any, dict]]) -> Callable[[], Coroutine[Any, Any, dict]]:
    """An ASGI receive that gives `body` as the whole request body, then what `receive` gives (the disconnect)."""
    sent = False

    async def receive_body() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_body


def request_statistics(request: Request) -> InferenceStatistics | None:
    """The statistics an inference request counts in: those of the served model (and version) its path names."""
    model: ServedModel | None = request.app.state.models.get(request.path_params.get("model_name"))
    version = request.path_params.get("model_version")
    if model is None or (version is not None and version not in versions(model)):
        return None
    return request.app.state.metrics.model_statistics(model.name)


async def json_header_request(request: Request) -> Request:
    """The request as FastAPI should parse it: its JSON header as an application/json body (whatever the
    Content-Type said, or without one), the binary tensor bytes after it kept in the scope."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ACCEPTED_MEDIA:
        raise ProblemError(415, "unsupported_media_type", f"inference takes application/json, or "
                           f"{BINARY_MEDIA_TYPE} with Inference-Header-Content-Length, not {media}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ProblemError(415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not supported: send "
                           "the body uncompressed")
    header, tensor_bytes = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
    scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")],
             TENSOR_BYTES: tensor_bytes}
    return Request(scope, replayed(header, request.receive))


class V2InferRoute(OffLoopJSONRoute):
    """The route of v2 inference: takes every body form of the protocol (see `json_header_request`) and counts
    each request to a served model, answered or not, in that model's statistics (success / fail, with its
    duration from here to the answer)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            started = time.perf_counter_ns()
            statistics = request_statistics(request)
            ok = False
            try:
                response = await handler(await json_header_request(request))
                ok = response.status_code < 400
                return response
            finally:
                if statistics is not None:
                    statistics.record_request(ok, time.perf_counter_ns() - started)

        return handle


def json_array(tensor: InferTensor) -> np.ndarray:
    """A JSON request tensor as float64 values of its declared shape (UINT8 scaled from 0-255 to [0, 1])."""
    dtype = DTYPES.get(tensor.datatype)
    if dtype is None:
        hint = "; BYTES inputs must be sent as binary data" if tensor.datatype == BYTES else ""
        raise ProblemError(422, "unsupported_datatype", f"datatype {tensor.datatype!r} is not supported (use one of "
                           f"{', '.join(DTYPES)}){hint}")
    if any(d < 0 for d in tensor.shape) or len(tensor.shape) > 8:
        raise ProblemError(422, "wrong_shape", f"shape {tensor.shape} is not a valid tensor shape")
    if tensor.data is None:
        raise ProblemError(422, "invalid_tensor", f"input {tensor.name!r} has neither data nor "
                           "parameters.binary_data_size")
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
    if dtype.kind in "biu":  # integer and boolean types: whole numbers in the type's range
        info = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if not ((flat == np.round(flat)) & (flat >= info[0]) & (flat <= info[1])).all():
            raise ProblemError(422, "invalid_tensor", f"data holds values that are not {tensor.datatype} "
                               f"(whole numbers {info[0]}..{info[1]})")
    if tensor.datatype == "UINT8":
        flat = flat / 255.0  # the datatype says 0-255, even for an image whose values are all 0 or 1
    return flat.reshape(tensor.shape)


async def input_batch(tensor: InferTensor, request: Request, model: ServedModel) -> DecodedBatch:
    """The request's images: from JSON data, binary data of a numeric type, or BYTES elements (encoded images)."""
    limits = input_limits(request.app.state.settings)
    size = binary_size(tensor.name, tensor.parameters)
    (data,) = take_inputs([(tensor.name, size)], request.scope.get(TENSOR_BYTES, memoryview(b"")))
    if data is None:
        convert = lambda: tensor_batch(json_array(tensor), model.shape, limits)  # noqa: E731
        small = math.prod(max(d, 0) for d in tensor.shape) <= INLINE_VALUES
    elif tensor.data is not None:
        raise ProblemError(400, "invalid_binary_data", f"input {tensor.name!r} has both data and binary_data_size")
    elif tensor.datatype == BYTES:
        files = bytes_elements(tensor.name, tensor.shape, data)
        convert = lambda: decode_files(files, model.shape, limits)  # noqa: E731
        small = len(data) <= INLINE_VALUES
    else:
        values = binary_array(tensor.name, tensor.datatype, tensor.shape, data)  # a view on the body
        scale = 255.0 if tensor.datatype == "UINT8" else None  # the datatype says 0-255, as for JSON
        convert = lambda: tensor_batch(values if scale is None else values / scale, model.shape, limits)  # noqa: E731
        small = values.size <= INLINE_VALUES
    # a large tensor is converted off the event loop, which every other request shares
    return convert() if small else await asyncio.to_thread(convert)


def binary_flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ProblemError(400, "invalid_parameter", f"{where} must be true or false, not {value!r}")
    return value


def requested_outputs(body: InferRequest, model: ServedModel) -> list[tuple[str, bool]]:
    """(name, as binary data?) of each output to answer with, in the order asked for (all outputs by default)."""
    available = output_names(model)
    default = binary_flag((body.parameters or {}).get("binary_data_output", False), "parameters.binary_data_output")
    if not body.outputs:
        return [(name, default) for name in available]
    unknown = [o.name for o in body.outputs if o.name not in available]
    if unknown:
        raise ProblemError(422, "unknown_output", f"unknown outputs {unknown} (available: {', '.join(available)})")
    chosen = []
    for output in body.outputs:
        parameters = output.parameters or {}
        if parameters.get("classification"):
            raise ProblemError(400, "unsupported_extension", f"output {output.name!r}: the classification extension "
                               "is not supported; ask for 'probabilities' or 'predictions'")
        chosen.append((output.name, binary_flag(parameters.get("binary_data", default),
                                                f"outputs[{output.name!r}].parameters.binary_data")))
    return chosen


async def infer(body: InferRequest, request: Request, model: ServedModel) -> InferResponse | Response:
    """One inference request: its images through the model's micro-batcher, then the outputs asked for."""
    wanted = requested_outputs(body, model)
    batch = await input_batch(body.inputs[0], request, model)
    # only the model's own outputs asked for: its forward pass alone, no screen
    screened = any(name in SCREEN_OUTPUTS for name, _ in wanted)
    results = await run_batched(model, (OIP_WORK, screened), batch.images)
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
    method = "forward pass" + (f" + detector on Fisher features '{model.detector.feature_set}'"
                               if scored and model.detector is not None else "")
    parameters: dict[str, Any] = {"sha256": model.sha256, "method": method}
    if scored:
        parameters["detector_id"] = results[0]["detector_id"]
    if batch.notes:
        parameters["notes"] = batch.notes
    outputs, blobs = [], []
    for name, binary in wanted:
        datatype, shape, values = columns[name]
        if binary:
            blobs.append(output_bytes(datatype, values))
            outputs.append(InferTensor(name=name, datatype=datatype, shape=shape,
                                       parameters={"binary_data_size": len(blobs[-1])}))
        else:
            outputs.append(InferTensor(name=name, datatype=datatype, shape=shape, data=values))
    answer = InferResponse(model_name=model.name, model_version=versions(model)[0], id=body.id,
                           parameters=parameters, outputs=outputs)
    if blobs:
        return binary_response(answer.model_dump(exclude_none=True), blobs)
    return answer


INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The outputs: JSON, or (with binary outputs) a JSON header of Inference-Header-Content-"
                         "Length bytes, then the outputs' bytes.",
          "content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    **problem_responses(400, 401, 404, 413, 415, 422, 503),
}
INFER_OPENAPI = {
    "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "description": "Binary tensor data extension: bytes of the JSON header; binary tensors follow.",
                    "schema": {"type": "integer", "minimum": 0}}],
    "requestBody": {"content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
}
INFER_SUMMARY = "OIP v2 inference: logits, probabilities, predictions and the adversarial score."


@micro_batched
async def v2_infer(body: InferRequest, request: Request, model: V2Model) -> InferResponse | Response:
    return await infer(body, request, model)


@micro_batched
async def v2_version_infer(body: InferRequest, request: Request, model: V2ModelVersion) -> InferResponse | Response:
    return await infer(body, request, model)


for path, endpoint in (("/models/{model_name}/infer", v2_infer),
                       ("/models/{model_name}/versions/{model_version}/infer", v2_version_infer)):
    router.add_api_route(path, endpoint, methods=["POST"], response_model=InferResponse, responses=INFER_RESPONSES,
                         openapi_extra=INFER_OPENAPI, summary=INFER_SUMMARY, route_class_override=V2InferRoute)
