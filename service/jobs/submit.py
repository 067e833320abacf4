"""Checks at submission: job type, model, parameters and images. Whatever can be refused now is refused with a
JobInputError (4xx); what passes becomes a JobSpec plus the staged upload (compressed .npz bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.config import Settings
from service.jobs import inputs
from service.jobs.types import (
    DEBUG_JOB_TYPES,
    JOB_TYPES,
    TYPES_WITH_IMAGES,
    Caller,
    JobInputError,
    JobRequest,
    JobSpec,
    check_deadline,
    check_params,
)
from service.zoo.cards import ModelCard


def known_types(settings: Settings) -> list[str]:
    return list(JOB_TYPES) + (list(DEBUG_JOB_TYPES) if settings.jobs_debug else [])


def prepare(request: JobRequest, files: list[tuple[str, bytes]], settings: Settings, caller: Caller,
            deadline: float | None = None) -> tuple[JobSpec, bytes | None]:
    """Validate a submission owned by `caller`; returns the spec to enqueue and the staged upload (None for
    dataset jobs). Past `deadline` it stops with SubmissionTimeout (checked between uploaded items)."""
    if request.type not in known_types(settings):
        raise JobInputError(f"unknown job type {request.type!r} (known: {', '.join(JOB_TYPES)})",
                            code="unknown_job_type")
    check_depth(request.params, settings.jobs_max_params_depth)
    params = check_params(request.type, request.params)
    spec = JobSpec(type=request.type, model=request.model, dataset=request.dataset, limit=request.limit,
                   params=params, owner=caller.key_id, result_ttl_s=settings.jobs_result_ttl_s,
                   max_attempts=settings.jobs_max_attempts)
    if request.type in DEBUG_JOB_TYPES or request.type == "evaluate":
        return spec, None
    card, card_path = _card(request.model)
    if request.type == "screen":
        _check_detector(card.name, card_path)
    if request.type == "attack":
        from service.attacks import attack_spec, check_steps

        try:
            spec_of_attack = attack_spec(params["attack"])
            options = spec_of_attack.check_options(params.get("options", {}))
            check_steps(spec_of_attack, options, settings.jobs_max_attack_steps, "jobs_max_attack_steps")
        except ValueError as exc:
            raise JobInputError(str(exc), code="invalid_params") from exc
    if request.type == "train-detector":
        for key in ("fit_dataset", "test_dataset"):
            if params.get(key):
                inputs.load_dataset(params[key], 1)
                inputs.check_dataset_shape(params[key], tuple(card.input_shape))
        return spec, None
    if request.type not in TYPES_WITH_IMAGES:
        return spec, None
    if request.dataset and files:
        raise JobInputError("give either a dataset name or uploaded files, not both", code="ambiguous_input",
                            status=400)
    if request.dataset:
        images, _ = inputs.load_dataset(request.dataset, request.limit)
        inputs.check_dataset_shape(request.dataset, tuple(card.input_shape))
        spec.items = len(images)
        return spec, None
    staged = inputs.stage_upload(files, tuple(card.input_shape), settings, request.limit, card.num_classes, deadline)
    check_deadline(deadline)
    spec.has_upload = True
    spec.items = len(staged.names)
    spec.item_names = staged.names
    spec.item_errors = staged.errors
    return spec, inputs.pack(staged.images, staged.labels)


def check_depth(value: Any, limit: int) -> None:
    """JobInputError when JSON `value` nests deeper than `limit` (a deep one would exhaust the recursion of
    whatever serialises it next); iterative, so that the check itself cannot."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise JobInputError(f"params nest deeper than {limit} levels (setting jobs_max_params_depth)",
                                code="invalid_params")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def _card(model: str | None) -> tuple[ModelCard, Path]:
    from service.zoo.registry import ModelLoadError, find_card

    if not model:
        raise JobInputError("this job type needs a model: give 'model' (a registry name)", code="model_required")
    try:
        return find_card(model)
    except ModelLoadError as exc:
        raise JobInputError(str(exc), code="unknown_model") from exc


def _check_detector(model: str, card_path: Path) -> None:
    """A model's active detector lies next to its card (as the API and the workers load it)."""
    from service.detect.detector import find_detector

    path = find_detector(card_path.parent, model)
    if not path.is_file():
        raise JobInputError(f"model {model!r} has no active detector ({path.name}); train one with a "
                            "'train-detector' job and activate it", code="no_detector")
