"""`train-detector`: train a detector for a model on labelled images (a server-side dataset, or one uploaded .npz
or zip of class folders, staged strictly) and write it with its card and report as a candidate (activation is a
separate step). The artifact is a zip of the candidate, its card and its report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.config import Settings
from service.jobs import inputs, model_cache
from service.jobs.job_type import JobType
from service.jobs.running import TaskContext
from service.jobs.types import JobSpec, one_of

if TYPE_CHECKING:  # torch-heavy: imported where used
    from service.data.datasets import LabelledImages
    from service.zoo.registry import LoadedModel


class TrainDetectorParams(BaseModel):
    """As `fisher-guard train-detector`. The fit images are an upload (one labelled .npz, or a zip of class
    folders) or `fit_dataset`; the test images are `test_dataset`, or a `test_fraction` of the fit images."""

    model_config = ConfigDict(extra="forbid")
    fit_dataset: str | None = Field(None, description="Server-side images to fit on (mnist:val, data:<name>); "
                                    "null: the uploaded file.")
    fit_limit: int | None = Field(None, ge=10, description="Use only the first N fit images.")
    test_dataset: str | None = Field(None, description="Server-side images for the card's test metrics; null: a "
                                     "test_fraction of the fit images.")
    test_limit: int | None = Field(None, ge=10)
    test_fraction: float = Field(0.3, gt=0, lt=1, description="Share of the fit images held out when no "
                                 "test_dataset is given (stratified, seeded).")
    attacks: list[str] | None = Field(None, description="Attacks of the detection set (default: all five).")
    epsilons: dict[str, float] = Field(default_factory=dict, description="L2 budgets by attack, instead of the "
                                       "rule's (service.detect.budgets).")
    feature_set: str | None = Field(None, description="Feature set; null: chosen among the candidates by "
                                    "out-of-fold AUC.")
    classifier: Literal["rf", "gnb"] = "rf"
    k: int = Field(20, ge=1, le=100)
    target_fpr: float = Field(0.05, ge=0, lt=1)
    opt_steps: int | None = Field(None, ge=1, le=1000, description="C&W's Adam steps (default 100).")
    harden: int = Field(0, ge=0, le=5, description="Rounds of hardening after the paper's training: adaptive "
                        "attacks on the detector as positives, benign shifts as negatives (0: none).")
    seed: int = 0

    @field_validator("feature_set")
    @classmethod
    def _known_features(cls, value: str | None) -> str | None:
        from service.detect.features import FEATURE_SETS

        return None if value is None else one_of(value, FEATURE_SETS, "feature set")

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, value: list[str] | None) -> list[str] | None:
        from service.detect.dataset import DEFAULT_ATTACKS

        for name in value or []:
            one_of(name, DEFAULT_ATTACKS, "attack")
        return value


def run(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Train a detector for the model and write it (+ card, report) as a candidate; zip artifact."""
    from service.data.datasets import LabelledImages, split
    from service.training import TrainingOptions, candidate_path, train_and_write

    loaded = model_cache.get_bundle(spec.model or "").loaded
    p = spec.params
    if spec.has_upload:
        images, labels = ctx.load_upload()
        fit = LabelledImages(images, labels, spec.item_names, "the uploaded images", None)
        if p["fit_limit"]:
            fit = fit.subset(list(range(min(p["fit_limit"], len(fit)))))
    else:
        fit = _open(p["fit_dataset"], loaded, ctx.settings, p["fit_limit"])
    if p["test_dataset"]:
        test = _open(p["test_dataset"], loaded, ctx.settings, p["test_limit"])
    else:
        fit, test = split(fit, p["test_fraction"], p["seed"])
    options = TrainingOptions(attacks=tuple(p["attacks"] or TrainingOptions.attacks), epsilons=p["epsilons"],
                              feature_set=p["feature_set"], classifier=p["classifier"], k=p["k"],
                              target_fpr=p["target_fpr"], seed=p["seed"], opt_steps=p["opt_steps"],
                              hardening_rounds=p["harden"])
    ctx.progress(0, 1)
    files = train_and_write(loaded, fit, test, candidate_path(ctx.settings.models_dir, loaded.name, spec.id),
                            options, command=f"job {spec.id}: {json.dumps(spec.params, sort_keys=True)}")
    ctx.progress(1, 1)
    ctx.save_artifact(f"detector-{spec.id}.zip", "application/zip", files.zip_bytes())
    card = files.run.detector.card
    return {"model": loaded.name, "candidate": files.detector.name, "detector_path": str(files.detector),
            "card_path": str(files.card), "active": False,
            "activate_with": f"fisher-guard activate-detector {files.detector}", "feature_set": card["features"]
            ["feature_set"], "feature_selection": card["feature_selection"],
            "budgets": {name: b["chosen"] for name, b in card["budgets"].items()},
            "validation": card.get("validation"), "test": card.get("test"), "threshold": files.run.detector.threshold,
            "wall_time_s": card.get("wall_time_s")}


def _open(name: str, loaded: LoadedModel, settings: Settings, limit: int | None) -> LabelledImages:
    from service.training import open_dataset

    return open_dataset(name, loaded.card, list(settings.dataset_folders), inputs.dataset_limits(settings), limit)


def check(spec: JobSpec, card_path: Path, settings: Settings) -> None:
    """The server-side datasets exist and their images fit the model's input: refused now, not in the worker (which
    checks every image and label before any work). The upload itself is staged by submit.prepare."""
    from service.zoo.cards import ModelCard

    card = ModelCard.read(card_path)
    for key in ("fit_dataset", "test_dataset"):
        if spec.params.get(key):  # its first image here (a large set would outlast the request); all in the worker
            inputs.check_dataset_shape(spec.params[key], tuple(card.input_shape), settings)


JOB = JobType("train-detector", "Train a new detector for a model on labelled images (a server-side dataset or an "
              "uploaded .npz / zip of class folders) and write it with its card and report as a candidate "
              "(activation is a separate step).", TrainDetectorParams, run, check=check, labelled_upload=True)
