"""Screen, spectrum and attack, each as JSON (base64 files or tensors) and as multipart upload (PNG/JPEG/.npy)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from torch import Tensor

from service.api.dependencies import decode_json_images, decode_upload, require_json, require_multipart, served_model
from service.api.errors import ProblemError, problem_responses
from service.api.json_body import OffLoopJSONRoute
from service.api.micro_batcher import QueueFullError, WorkerClosedError, micro_batched
from service.api.model_link import ModelUnavailableError
from service.api.runtime import ServedModel, detector_summary
from service.api.schemas import (
    MAX_CLASS,
    AttackName,
    AttackRequest,
    AttackResponse,
    ImageFormat,
    ScreenRequest,
    ScreenResponse,
    SpectrumMethod,
    SpectrumRequest,
    SpectrumResponse,
    VectorFormat,
)
from service.attacks import attack_spec, check_steps
from service.config import Settings
from service.data.images import DecodedBatch
from service.serving import NoDetectorError

router = APIRouter(prefix="/v1/models/{model}", tags=["inference"], route_class=OffLoopJSONRoute)

ERRORS = problem_responses(400, 401, 404, 413, 415, 422, 503)
SLOW_METHODS = ("power", "power-alias")  # not micro-batched, and limited like the iterative attacks
FILES_DESCRIPTION = "PNG or JPEG files (one image each) or .npy files (one image or a batch)."
Files = Annotated[list[UploadFile], File(description=FILES_DESCRIPTION)]
ModelDep = Annotated[ServedModel, Depends(served_model)]


def _answer_errors(exc: Exception) -> ProblemError:
    """The problem document for an error of the model's worker: overloaded, shutting down or gone -> 503, an engine
    argument refused -> 422 (the engine names the argument)."""
    if isinstance(exc, QueueFullError):
        return ProblemError(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, WorkerClosedError):
        return ProblemError(503, "shutting_down", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, ModelUnavailableError):
        return ProblemError(503, "model_unavailable", str(exc), headers={"Retry-After": str(exc.retry_after)})
    return ProblemError(422, "invalid_argument", str(exc))


ANSWERED_ERRORS = (QueueFullError, WorkerClosedError, ModelUnavailableError, ValueError)


async def run_batched(model: ServedModel, key: Hashable, images: Tensor) -> list[Any]:
    """The work `key` names (ServedModel.work), micro-batched in the model's worker."""
    try:
        return await model.worker.submit(key, model.work(key), images)
    except ANSWERED_ERRORS as exc:
        raise _answer_errors(exc) from exc


async def run_unbatched(model: ServedModel, key: tuple, images: Tensor) -> Any:
    """The work `key` names on `images` alone, in the model's worker (attacks, the paper's slow spectrum)."""
    try:
        return await model.worker.run(key, model.work(key), images, images=int(images.shape[0]))
    except ANSWERED_ERRORS as exc:
        raise _answer_errors(exc) from exc


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


# ---- screen ----

async def screen_answer(request: Request, model: ServedModel, batch: DecodedBatch,
                       threshold: float | None) -> ScreenResponse:
    try:
        model.require_detector()
    except NoDetectorError as exc:
        raise ProblemError(404, "no_detector", str(exc)) from exc
    results = await run_batched(model, ("screen",), batch.images)
    # the detector the batch read: it scored every image here, so its threshold, id and figures answer
    detector = results[0]["detector"] if results else detector_summary(model.detector_state, model.name)
    chosen = detector["threshold"] if threshold is None else threshold
    names = model.card.class_names
    items = [{"score": r["score"], "adversarial": r["score"] >= chosen, "prediction": r["prediction"],
              "class_name": names[r["prediction"]], "probability": r["probabilities"][r["prediction"]],
              "eigenvalues": r["eigenvalues"]} for r in results]
    metrics = request.app.state.metrics
    metrics.screened.labels(model.name).inc(len(items))
    flagged = sum(item["adversarial"] for item in items)
    if flagged:
        metrics.adversarial.labels(model.name).inc(flagged)
    metrics.request_images.labels("screen").observe(len(items))
    return ScreenResponse(model=model.name, sha256=model.sha256, method=detector["method"], notes=batch.notes,
                          threshold=chosen, threshold_source="detector" if threshold is None else "request",
                          detector_auc=detector["auc"], detector_id=detector["id"],
                          results=items)  # type: ignore[arg-type]


@router.post("/screen", response_model=ScreenResponse, responses=ERRORS, dependencies=[Depends(require_json)],
             summary="Screen images: adversarial score, verdict, the eigenvalues used, prediction.")
@micro_batched
async def screen(body: ScreenRequest, request: Request, model: ModelDep) -> ScreenResponse:
    batch = await decode_json_images(body, model, settings_of(request))
    return await screen_answer(request, model, batch, body.threshold)


@router.post("/screen/upload", response_model=ScreenResponse, responses=ERRORS,
             dependencies=[Depends(require_multipart)], summary="Screen uploaded image files (multipart).")
@micro_batched
async def screen_upload(request: Request, files: Files, model: ModelDep,
                        threshold: Annotated[float | None, Form(ge=0.0, le=1.0, allow_inf_nan=False)] = None,
                        resize: Annotated[bool, Form()] = False) -> ScreenResponse:
    batch = await decode_upload(files, model, settings_of(request), resize)
    return await screen_answer(request, model, batch, threshold)


# ---- spectrum ----

async def spectrum_answer(request: Request, model: ServedModel, batch: DecodedBatch, k: int, method: str,
                         vectors: str) -> SpectrumResponse:
    settings = settings_of(request)
    if not 1 <= k <= settings.max_k:
        raise ProblemError(422, "k_out_of_range", f"k must lie in [1, {settings.max_k}], got {k}")
    n = int(batch.images.shape[0])
    if method in SLOW_METHODS:  # the paper's Algorithm 1: one image at a time, K gradients per step
        if n > settings.max_attack_batch:
            raise ProblemError(422, "too_heavy", f"method {method} on {n} images is too heavy for a request (at "
                               f"most {settings.max_attack_batch}); use method exact, or lanczos for many classes")
        results = await run_unbatched(model, ("spectrum", k, method, vectors), batch.images)
    else:
        results = await run_batched(model, ("spectrum", k, method, vectors), batch.images)
    names = model.card.class_names
    notes = list(batch.notes) + [n for n in (results[0]["notes"] if results else []) if n not in batch.notes]
    items = [{**{key: value for key, value in r.items() if key not in ("method", "notes")},
              "class_name": names[r["prediction"]]} for r in results]
    request.app.state.metrics.request_images.labels("spectrum").observe(len(items))
    return SpectrumResponse(model=model.name, sha256=model.sha256, method=results[0]["method"], notes=notes, k=k,
                            results=items)  # type: ignore[arg-type]


@router.post("/spectrum", response_model=SpectrumResponse, responses=ERRORS, dependencies=[Depends(require_json)],
             summary="Top-k eigenvalues of the Fisher information G_x (and eigenvectors), prediction, probabilities.")
@micro_batched
async def spectrum(body: SpectrumRequest, request: Request, model: ModelDep) -> SpectrumResponse:
    batch = await decode_json_images(body, model, settings_of(request))
    return await spectrum_answer(request, model, batch, body.k, body.method, body.vectors)


@router.post("/spectrum/upload", response_model=SpectrumResponse, responses=ERRORS,
             dependencies=[Depends(require_multipart)], summary="The spectrum of uploaded image files (multipart).")
@micro_batched
async def spectrum_upload(request: Request, files: Files, model: ModelDep,
                          k: Annotated[int, Form(ge=1)] = 10, method: Annotated[SpectrumMethod, Form()] = "auto",
                          vectors: Annotated[VectorFormat, Form()] = "none",
                          resize: Annotated[bool, Form()] = False) -> SpectrumResponse:
    batch = await decode_upload(files, model, settings_of(request), resize)
    return await spectrum_answer(request, model, batch, k, method, vectors)


# ---- attack ----

SHORTHAND_OPTIONS = ("steps", "step_size", "c", "base_attack")  # AttackRequest fields that set an option


def attack_options(body: AttackRequest) -> dict[str, Any]:
    """The options the request sets: `options`, and the shorthand fields that were given."""
    given = {key: getattr(body, key) for key in SHORTHAND_OPTIONS if getattr(body, key) is not None}
    return {**given, **body.options}


async def attack_answer(request: Request, model: ServedModel, batch: DecodedBatch,
                       body: AttackRequest) -> AttackResponse:
    settings = settings_of(request)
    n = int(batch.images.shape[0])
    if body.epsilon > settings.max_epsilon:
        raise ProblemError(422, "epsilon_out_of_range", f"epsilon must lie in [0, {settings.max_epsilon:g}], "
                           f"got {body.epsilon:g}")
    if body.labels is not None and len(body.labels) != n:
        raise ProblemError(422, "invalid_labels", f"labels has {len(body.labels)} entries for {n} images")
    if body.labels is not None and max(body.labels) >= model.card.num_classes:
        raise ProblemError(422, "invalid_labels", f"labels must be class indices below {model.card.num_classes}, "
                           f"got {max(body.labels)}")
    spec, options = attack_spec(body.attack), attack_options(body)
    try:
        checked = spec.check_options(options)
    except ValueError as exc:
        raise ProblemError(422, "invalid_options", str(exc)) from exc
    if not spec.cheap:
        if n > settings.max_attack_batch:
            raise ProblemError(422, "too_heavy", f"{body.attack} on {n} images is too heavy for a request (at most "
                               f"{settings.max_attack_batch}); submit it as a job: POST /v1/jobs", jobs="/v1/jobs")
        try:
            check_steps(spec, checked, settings.max_attack_steps, "max_attack_steps")
        except ValueError as exc:
            raise ProblemError(422, "too_heavy", f"{exc}: submit it as a job: POST /v1/jobs", jobs="/v1/jobs") from exc
    results = await run_unbatched(model, ("attack", body.attack, body.epsilon, body.labels, options, body.output),
                                  batch.images)
    request.app.state.metrics.request_images.labels("attack").observe(n)
    return AttackResponse(model=model.name, sha256=model.sha256, method=body.attack, notes=batch.notes,
                          attack=body.attack, epsilon=body.epsilon, results=results)


@router.post("/attack", response_model=AttackResponse, responses=ERRORS, dependencies=[Depends(require_json)],
             summary="Attack images (OSSA and others): adversarial image, perturbation norm, predictions, fooled.")
async def attack(body: AttackRequest, request: Request, model: ModelDep) -> AttackResponse:
    batch = await decode_json_images(body, model, settings_of(request))
    return await attack_answer(request, model, batch, body)


@router.post("/attack/upload", response_model=AttackResponse, responses=ERRORS,
             dependencies=[Depends(require_multipart)], summary="Attack uploaded image files (multipart).")
async def attack_upload(request: Request, files: Files, model: ModelDep,
                        attack: Annotated[AttackName, Form()] = "ossa",
                        epsilon: Annotated[float, Form(ge=0.0, allow_inf_nan=False)] = 1.0,
                        label: Annotated[int | None, Form(ge=0, le=MAX_CLASS,
                                                          description="True class of the image(s); default: the "
                                                          "model's prediction.")] = None,
                        steps: Annotated[int | None, Form(ge=1)] = None,
                        step_size: Annotated[float | None, Form(gt=0.0, allow_inf_nan=False)] = None,
                        output: Annotated[ImageFormat, Form()] = "png",
                        resize: Annotated[bool, Form()] = False) -> AttackResponse:
    batch = await decode_upload(files, model, settings_of(request), resize)
    labels = None if label is None else [label] * int(batch.images.shape[0])
    body = AttackRequest(tensor=[], attack=attack, epsilon=epsilon, labels=labels, steps=steps, step_size=step_size,
                         output=output)
    return await attack_answer(request, model, batch, body)
