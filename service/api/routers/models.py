"""The served models: list and show."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.api.dependencies import require_ready, served_model
from service.api.errors import problem_responses
from service.api.runtime import ServedModel
from service.api.schemas import DetectorInfo, ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_info(model: ServedModel) -> ModelInfo:
    """What a user needs to know about a served model (and its detector) to call and trust it."""
    card = model.card
    detector = None
    if model.detector is not None:
        auc, split = model.detector_auc
        detector = DetectorInfo(threshold=model.detector.threshold, auc=auc, auc_split=split,
                                feature_set=model.detector.feature_set, k=model.detector.k,
                                file=model.detector_file.name if model.detector_file else None)
    return ModelInfo(name=model.name, sha256=model.sha256, device=str(model.device),
                     input_shape=list(card.input_shape), mean=list(card.mean), std=list(card.std),
                     class_names=list(card.class_names), num_classes=card.num_classes,
                     test_accuracy=card.test_accuracy, test_split=card.test_split, detector=detector,
                     detector_error=model.detector_error)


@router.get("", response_model=ModelList, responses=problem_responses(401, 503), summary="List the served models.")
async def list_models(request: Request, _: Annotated[None, Depends(require_ready)]) -> ModelList:
    models: dict[str, ServedModel] = request.app.state.models
    return ModelList(models=[model_info(m) for m in models.values()])


@router.get("/{model}", response_model=ModelInfo, responses=problem_responses(401, 404, 503),
            summary="Show one model: classes, input shape, normalisation, device, detector, weights sha256.")
async def show_model(model: Annotated[ServedModel, Depends(served_model)]) -> ModelInfo:
    return model_info(model)
