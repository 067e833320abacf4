"""Checks at submission: job type, model, parameters and images. Whatever can be refused now is refused with a
JobInputError (4xx); what passes becomes a JobSpec plus the staged upload (compressed .npz bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.config import Settings
from service.jobs import inputs
from service.jobs.catalogue import job_type
from service.jobs.types import Caller, JobInputError, JobRequest, JobSpec
from service.zoo.cards import ModelCard


def prepare(request: JobRequest, files: list[tuple[str, bytes]], settings: Settings, caller: Caller,
            deadline: float | None = None) -> tuple[JobSpec, bytes | None]:
    """Validate a submission owned by `caller`: its type's params and own check, the model, and the images; returns
    the spec to enqueue and the staged upload (None for dataset jobs). Past `deadline` it stops with
    SubmissionTimeout (checked between uploaded items)."""
    kind = job_type(request.type, settings)
    check_depth(request.params, settings.jobs_max_params_depth)
    spec = JobSpec(type=request.type, model=request.model, dataset=request.dataset, limit=request.limit,
                   params=kind.check_params(request.params), owner=caller.key_id,
                   result_ttl_s=settings.jobs_result_ttl_s, max_attempts=settings.jobs_max_attempts)
    if not kind.needs_model:
        return spec, None
    card, card_path = _card(request.model, settings.model_folders())
    if kind.check is not None:
        kind.check(spec, card_path, settings)
    if kind.labelled_upload:
        return _labelled(spec, files, card, settings)
    if not kind.images:
        return spec, None
    if request.dataset and files:
        raise JobInputError("give either a dataset name or uploaded files, not both", code="ambiguous_input",
                            status=400)
    if request.dataset:
        images, _ = inputs.load_dataset(request.dataset, request.limit, settings, tuple(card.input_shape))
        spec.items = len(images)
        return spec, None
    staged = inputs.stage_upload(files, tuple(card.input_shape), settings, request.limit, card.num_classes, deadline)
    spec.has_upload = True
    spec.items = len(staged.names)
    spec.item_names = staged.names
    spec.item_errors = staged.errors
    return spec, inputs.pack(staged.images, staged.labels)


def _labelled(spec: JobSpec, files: list[tuple[str, bytes]], card: ModelCard,
              settings: Settings) -> tuple[JobSpec, bytes | None]:
    """A labelled upload staged strictly (any bad item refuses the submission), or a server-side dataset named
    in the params."""
    if not files:
        if not spec.params.get("fit_dataset"):
            raise JobInputError("no images: upload one labelled .npz (images, labels) or a zip of class folders, "
                                "or name a server-side dataset in params.fit_dataset", code="no_input", status=400)
        return spec, None
    if spec.params.get("fit_dataset"):
        raise JobInputError("give either uploaded files or params.fit_dataset, not both", code="ambiguous_input",
                            status=400)
    staged = inputs.stage_labelled_upload(files, tuple(card.input_shape), card.num_classes, list(card.class_names),
                                          settings)
    spec.has_upload = True
    spec.items = len(staged)
    spec.item_names = list(staged.names)
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


def _card(model: str | None, folders: list[Path]) -> tuple[ModelCard, Path]:
    from service.zoo.registry import ModelLoadError, find_card

    if not model:
        raise JobInputError("this job type needs a model: give 'model' (a registry name)", code="model_required")
    try:
        return find_card(model, folders)
    except ModelLoadError as exc:
        raise JobInputError(str(exc), code="unknown_model") from exc
