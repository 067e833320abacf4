"""Checks at submission: job type, model, parameters and images. Whatever can be refused now is refused with a
JobInputError (4xx); what passes becomes a JobSpec plus the staged upload (compressed .npz bytes)."""

from __future__ import annotations

from service.config import Settings, get_settings
from service.jobs import inputs
from service.jobs.types import (
    DEBUG_JOB_TYPES,
    JOB_TYPES,
    TYPES_WITH_IMAGES,
    JobInputError,
    JobRequest,
    JobSpec,
    check_params,
)


def known_types(settings: Settings) -> list[str]:
    return list(JOB_TYPES) + (list(DEBUG_JOB_TYPES) if settings.jobs_debug else [])


def prepare(request: JobRequest, files: list[tuple[str, bytes]], settings: Settings) -> tuple[JobSpec, bytes | None]:
    """Validate a submission; returns the spec to enqueue and the staged upload (None for dataset jobs)."""
    if request.type not in known_types(settings):
        raise JobInputError(f"unknown job type {request.type!r} (known: {', '.join(JOB_TYPES)})",
                            code="unknown-job-type")
    params = check_params(request.type, request.params)
    spec = JobSpec(type=request.type, model=request.model, dataset=request.dataset, limit=request.limit,
                   params=params, result_ttl_s=settings.jobs_result_ttl_s, max_attempts=settings.jobs_max_attempts)
    if request.type in DEBUG_JOB_TYPES or request.type == "evaluate":
        return spec, None
    card = _card(request.model)
    if request.type == "screen":
        _check_detector(request.model or "")
    if request.type == "attack":
        from service.jobs.tasks import attack_options

        try:
            attack_options(params["attack"], params.get("epsilon"), params.get("options", {}))
        except ValueError as exc:
            raise JobInputError(str(exc), code="invalid-params") from exc
    if request.type == "train-detector":
        for key in ("fit_dataset", "test_dataset"):
            if params.get(key):
                inputs.load_dataset(params[key], 1)
                inputs.check_dataset_shape(params[key], tuple(card.input_shape))
        return spec, None
    if request.type not in TYPES_WITH_IMAGES:
        return spec, None
    if request.dataset and files:
        raise JobInputError("give either a dataset name or uploaded files, not both", code="ambiguous-input",
                            status=400)
    if request.dataset:
        images, _ = inputs.load_dataset(request.dataset, request.limit)
        inputs.check_dataset_shape(request.dataset, tuple(card.input_shape))
        spec.items = len(images)
        return spec, None
    staged = inputs.stage_upload(files, tuple(card.input_shape), settings, request.limit)
    spec.has_upload = True
    spec.items = len(staged.names)
    spec.item_names = staged.names
    spec.item_errors = staged.errors
    return spec, inputs.pack(staged.images, staged.labels)


def _card(model: str | None):
    from service.zoo.registry import ModelLoadError, find_card

    if not model:
        raise JobInputError("this job type needs a model: give 'model' (a registry name)", code="model-required")
    if "/" in model or "\\" in model or model.endswith(".json"):
        raise JobInputError(f"model must be a registry name, not a path: {model!r}", code="unknown-model")
    try:
        card, _ = find_card(model)
    except ModelLoadError as exc:
        raise JobInputError(str(exc), code="unknown-model") from exc
    return card


def _check_detector(model: str) -> None:
    """Model folders follow the process settings (as the registry does)."""
    from service.detect.detector import detector_path

    path = detector_path(get_settings().models_dir, model)
    if not path.is_file():
        raise JobInputError(f"model {model!r} has no active detector ({path.name}); train one with a "
                            "'train-detector' job and activate it", code="no-detector")
