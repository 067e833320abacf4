"""`evaluate-detector`: the detector evaluation (held-out and adaptive attacks, benign shifts, the squeezing
baseline) of a model's active detector or of one of its candidates, its report zipped as the artifact."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.config import Settings
from service.evaluate import PARTS
from service.jobs import inputs, model_cache
from service.jobs.job_type import JobType
from service.jobs.running import TaskContext
from service.jobs.types import JobInputError, JobSpec, one_of

CANDIDATE_NAME = re.compile(r"[A-Za-z0-9._-]+\.npz")


class EvaluateDetectorParams(BaseModel):
    """As `fisher-guard evaluate-detector`."""

    model_config = ConfigDict(extra="forbid")
    detector: str | None = Field(None, description="A candidate's file name in <models_dir>/candidates (as a "
                                 "train-detector job reports it); null: the model's active detector.")
    fit_dataset: str = Field("mnist:val", description="Server-side labelled images that give the squeezing "
                             "baseline its threshold and the attacker its surrogate (mnist:val, data:<name>).")
    test_dataset: str = Field("mnist:test", description="Server-side labelled images attacked and shifted.")
    images: int = Field(100, ge=1, le=1000, description="Attacked test images (correctly classified ones).")
    shift_images: int = Field(500, ge=1, le=10000, description="Clean test images shifted.")
    budgets: list[float] = Field([1.0, 2.0, 3.0], min_length=1, max_length=8, description="L2 budgets.")
    effort: Literal["full", "quick"] = Field("full", description="full: the tuned, honest setting; quick: a smoke "
                                             "test.")
    parts: list[str] = Field(list(PARTS), min_length=1, description=f"Of {', '.join(PARTS)}.")
    heldout: list[str] | None = Field(None, description="Held-out attacks (null: all).")
    adaptive: list[str] | None = Field(None, description="Adaptive attacks (null: all).")
    check_images: int = Field(32, ge=0, le=1000, description="Images of the double-effort check (0: skip it).")
    check_budget: float = Field(3.0, gt=0, lt=1e6, description="L2 budget of the double-effort check.")
    seed: int = 0

    @field_validator("budgets")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(not (0 < b < 1e6) for b in value):
            raise ValueError("L2 budgets must lie in (0, 1e6)")
        return value

    @field_validator("parts")
    @classmethod
    def _known_parts(cls, value: list[str]) -> list[str]:
        return [one_of(v, PARTS, "part") for v in value]

    @field_validator("detector")
    @classmethod
    def _file_name(cls, value: str | None) -> str | None:
        if value is not None and not CANDIDATE_NAME.fullmatch(value):
            raise ValueError("detector: a candidate's file name (letters, digits, . _ -; ending .npz), no folders")
        return value


def _plan(params: dict[str, Any]) -> Any:
    from service.evaluate.evaluation import EvaluationPlan

    names = {k: tuple(params[k]) for k in ("heldout", "adaptive") if params[k] is not None}
    return EvaluationPlan(images=params["images"], budgets=tuple(params["budgets"]), effort=params["effort"],
                          check_images=params["check_images"],
                          check_budget=params["check_budget"], shift_images=params["shift_images"],
                          parts=tuple(params["parts"]), seed=params["seed"], **names)


def _detector_file(params: dict[str, Any], settings: Settings) -> Path | None:
    from service.training import candidates_dir

    return None if params["detector"] is None else candidates_dir(settings.models_dir) / params["detector"]


def run(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    from service.evaluate.use_case import run_and_write
    from service.training import open_dataset

    loaded = model_cache.get_bundle(spec.model or "").loaded
    p = spec.params
    folders, limits = list(ctx.settings.dataset_folders), inputs.dataset_limits(ctx.settings)
    fit = open_dataset(p["fit_dataset"], loaded.card, folders, limits)
    test = open_dataset(p["test_dataset"], loaded.card, folders, limits)
    steps = ["attacker's knowledge (feature scale, surrogate)", "clean images", "held-out attacks",
             "adaptive attacks", "effort check (twice the effort)", "benign shifts"]
    ctx.progress(0, len(steps))
    with tempfile.TemporaryDirectory(prefix=f"fisher-guard-evaluation-{spec.id}-") as tmp:
        out = Path(tmp) / "report"
        report = run_and_write(loaded, _detector_file(p, ctx.settings), fit, test, _plan(p), out,
                               command=f"job {spec.id}: evaluate-detector {json.dumps(p, sort_keys=True)}",
                               progress=lambda part: ctx.progress(steps.index(part) if part in steps else 0,
                                                                  len(steps)))
        results = json.loads((out / "results.json").read_text())
        archive = shutil.make_archive(str(Path(tmp) / "report"), "zip", root_dir=out)
        ctx.save_artifact(f"evaluation-{spec.id}.zip", "application/zip", Path(archive).read_bytes())
    ctx.progress(len(steps), len(steps))
    return {"model": loaded.name, "report": report.name, "detector": results["detector"],
            "clean": results["clean"], "best_of": results["best_of"], "effort_check": results["effort_check"],
            "timings": results["timings"]}


def check(spec: JobSpec, card_path: Path, settings: Settings) -> None:
    """The plan is valid, the candidate exists, and the datasets exist and fit the model: refused now."""
    from service.zoo.cards import ModelCard

    try:
        _plan(spec.params)
    except ValueError as exc:
        raise JobInputError(f"invalid parameters for an 'evaluate-detector' job: {exc}",
                            code="invalid_params") from exc
    path = _detector_file(spec.params, settings)
    if path is not None and not path.is_file():
        raise JobInputError(f"no candidate detector {spec.params['detector']!r} in the candidates folder",
                            code="unknown_detector", status=404)
    card = ModelCard.read(card_path)
    for key in ("fit_dataset", "test_dataset"):
        inputs.check_dataset_shape(spec.params[key], tuple(card.input_shape), settings)


JOB = JobType("evaluate-detector", "Measure where a detector holds: held-out library attacks, adaptive attacks "
              "that know it, benign shifts and the feature-squeezing baseline (a Markdown report, as a zip).",
              EvaluateDetectorParams, run, check=check)
