"""The served models: list and show; activate a candidate detector and roll it back (admin keys only)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service import serving
from service.api.dependencies import require_ready, served_model
from service.api.errors import ProblemError, problem_responses
from service.api.runtime import ServedModel
from service.api.schemas import (
    ActivateDetectorRequest,
    DetectorActivation,
    DetectorInfo,
    ModelInfo,
    ModelList,
    PreviousDetector,
)
from service.api.security import require_admin_key
from service.detect.files import (
    FILE_NAME,
    ActivationError,
    ActiveDetector,
    DetectorLoadError,
    WeightsMismatchError,
    activate_detector,
    rollback_detector,
)

router = APIRouter(prefix="/v1/models", tags=["models"])
ACTIVATION_ERRORS = problem_responses(400, 401, 403, 404, 409, 422, 503)


def detector_info(state: serving.DetectorState) -> DetectorInfo | None:
    """The detector of a state as the API shows it: id, file, since when, its measured figures, rollback."""
    if state.detector is None:
        return None
    measured = state.measured
    return DetectorInfo(id=state.id, threshold=state.detector.threshold, auc=measured["auc"],
                        auc_split=measured["split"], tpr=measured["tpr"], fpr=measured["fpr"],
                        clean_fpr=measured["clean_fpr"], target_fpr=measured["target_fpr"],
                        feature_set=state.detector.feature_set, k=state.detector.k,
                        file=state.file.name if state.file else None, activated_at=state.activated_at,
                        rollback_available=state.previous_id is not None, previous_id=state.previous_id)


def model_info(model: ServedModel) -> ModelInfo:
    """What a user needs to know about a served model (and its detector) to call and trust it."""
    card = model.card
    state = model.detector_state  # read once: one detector's figures
    return ModelInfo(name=model.name, sha256=model.sha256, device=str(model.served_device or model.device),
                     input_shape=list(card.input_shape), mean=list(card.mean), std=list(card.std),
                     class_names=list(card.class_names), num_classes=card.num_classes,
                     test_accuracy=card.test_accuracy, test_split=card.test_split, detector=detector_info(state),
                     detector_error=state.error)


@router.get("", response_model=ModelList, responses=problem_responses(401, 503), summary="List the served models.")
async def list_models(request: Request, _: Annotated[None, Depends(require_ready)]) -> ModelList:
    models: dict[str, ServedModel] = request.app.state.models
    return ModelList(models=[model_info(m) for m in models.values()])


@router.get("/{model}", response_model=ModelInfo, responses=problem_responses(401, 404, 503),
            summary="Show one model: classes, input shape, normalisation, device, detector, weights sha256.")
async def show_model(model: Annotated[ServedModel, Depends(served_model)]) -> ModelInfo:
    return model_info(model)


# ---- activation (admin) ----

def candidate_file(request: Request, name: str) -> Path:
    """The candidate called `name` in <models_dir>/candidates/: a file name only (422 for a path, '..', a hidden
    or non-.npz name), and a file there (404)."""
    from service.training import candidates_dir

    if not FILE_NAME.fullmatch(name) or name.startswith(".") or Path(name).name != name:
        raise ProblemError(422, "invalid_candidate", "candidate must be the file name of a candidate detector "
                           f"(.npz) in <models_dir>/candidates/, without a path; got {name[:80]!r}")
    folder = candidates_dir(request.app.state.settings.models_dir)
    path = folder / name
    if not path.is_file() or path.resolve().parent != folder.resolve():
        raise ProblemError(404, "unknown_candidate", f"there is no candidate detector {name!r} in "
                           "<models_dir>/candidates/ (train-detector jobs write them there)")
    return path


async def answer(model: ServedModel, active: ActiveDetector) -> DetectorActivation:
    """Swap the change in at once in this process (the others follow within detector_poll_s), and say what this
    process screens with now."""
    await asyncio.to_thread(serving.refresh_detector, model)
    state = model.detector_state
    previous = (PreviousDetector(id=active.previous_id, file=active.previous_file.name)
                if active.previous_file is not None and active.previous_id is not None else None)
    return DetectorActivation(model=model.name, detector=detector_info(state), detector_error=state.error,
                              source=Path(active.source).name if active.source != "rollback" else "rollback",
                              previous=previous, removed=[path.name for path in active.removed])


def refused(exc: Exception) -> ProblemError:
    if isinstance(exc, WeightsMismatchError):
        return ProblemError(409, "weights_mismatch", str(exc))
    if isinstance(exc, ActivationError):
        return ProblemError(409, "no_previous_detector", str(exc))
    if isinstance(exc, DetectorLoadError):
        return ProblemError(422, "invalid_detector", str(exc))
    return ProblemError(503, "activation_failed", f"the detector files could not be written: {exc}",
                        headers={"Retry-After": "5"})


@router.post("/{model}/detector", response_model=DetectorActivation, responses=ACTIVATION_ERRORS,
             dependencies=[Depends(require_admin_key)],
             summary="Activate a candidate detector (admin key): every API process and job worker uses it, no restart.")
async def activate(body: ActivateDetectorRequest, request: Request,
                   model: Annotated[ServedModel, Depends(served_model)]) -> DetectorActivation:
    """Make a candidate from <models_dir>/candidates/ the model's active detector, after every check (its file's
    sha256, trained for this model's weights: else 409). The active card is replaced in one atomic step; this
    process swaps at once, the others within detector_poll_s; the one it replaces is kept for rollback."""
    path = candidate_file(request, body.candidate)
    assert model.loaded.card_path is not None
    try:
        active = await asyncio.to_thread(activate_detector, path, model.loaded.card_path, model.sha256)
    except (ValueError, OSError) as exc:
        raise refused(exc) from exc
    return await answer(model, active)


@router.post("/{model}/detector/rollback", response_model=DetectorActivation, responses=ACTIVATION_ERRORS,
             dependencies=[Depends(require_admin_key)],
             summary="Restore the detector the last activation replaced (admin key); itself undoable.")
async def rollback(model: Annotated[ServedModel, Depends(served_model)]) -> DetectorActivation:
    """Swap the active and the previous detector (409 when none is kept); a rollback can be rolled back."""
    assert model.loaded.card_path is not None
    try:
        active = await asyncio.to_thread(rollback_detector, model.loaded.card_path, model.sha256)
    except (ValueError, OSError) as exc:
        raise refused(exc) from exc
    return await answer(model, active)
