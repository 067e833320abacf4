"""`train-detector`: train a detector for a model and write it with its card as a candidate (activation is a
separate step: `activate_detector`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.config import Settings
from service.jobs import inputs, model_cache
from service.jobs.inputs import load_dataset
from service.jobs.job_type import JobType
from service.jobs.running import TaskContext
from service.jobs.types import JobSpec, one_of


class TrainDetectorParams(BaseModel):
    """As `fisher-guard train-detector`: fitted on the validation split, measured on the test split."""

    model_config = ConfigDict(extra="forbid")
    fit_dataset: str = Field("mnist:val", description="Images the detector is fitted on.")
    fit_limit: int | None = Field(None, ge=10, description="Use only the first N fit images.")
    test_dataset: str | None = Field("mnist:test", description="Images for the card's test metrics (null: none).")
    test_limit: int | None = Field(None, ge=10)
    attacks: list[str] | None = Field(None, description="Attacks of the detection set (default: all five).")
    feature_set: str = Field("spectral+noise+fine+squeeze",  # features.SHIPPED_FEATURE_SET, kept free of torch
                             description="Feature set (the shipped detectors': spectral+noise+fine+squeeze).")
    classifier: Literal["rf", "gnb"] = "rf"
    k: int = Field(20, ge=1, le=100)
    target_fpr: float = Field(0.05, ge=0, lt=1)
    seed: int = 0

    @field_validator("feature_set")
    @classmethod
    def _known_features(cls, value: str) -> str:
        from service.detect.features import FEATURE_SETS

        return one_of(value, FEATURE_SETS, "feature set")


def candidate_path(settings: Settings, model_name: str, job_id: str) -> Path:
    """Where a detector-training job writes its detector: not the active one (activation is a separate step)."""
    return Path(settings.models_dir) / "candidates" / f"{model_name}.detector.{job_id}.npz"


def run(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Train a detector for the model and write it (+ card) as a candidate; JSON card artifact."""
    from service.detect.detector import train_detector
    from service.detect.files import save_detector

    model = model_cache.get_bundle(spec.model or "").loaded
    p = dict(spec.params)
    fit_x, fit_y = load_dataset(p.pop("fit_dataset"), p.pop("fit_limit"))
    test_name, test_limit = p.pop("test_dataset"), p.pop("test_limit")
    test_x, test_y = load_dataset(test_name, test_limit) if test_name else (None, None)
    if p.get("attacks") is None:
        p.pop("attacks", None)
    else:
        p["attacks"] = tuple(p["attacks"])
    ctx.progress(0, 1)
    detector = train_detector(
        model.module, model_name=model.name, model_sha256=model.sha256,
        fit_images=torch.from_numpy(fit_x), fit_labels=torch.from_numpy(fit_y),
        test_images=None if test_x is None else torch.from_numpy(test_x),
        test_labels=None if test_y is None else torch.from_numpy(test_y),
        command=f"job {spec.id}: {json.dumps(spec.params, sort_keys=True)}",
        data_description=f"fit: {spec.params['fit_dataset']}, test: {test_name}", **p)
    path, card_path = save_detector(detector, candidate_path(ctx.settings, model.name, spec.id))
    ctx.progress(1, 1)
    ctx.save_artifact(card_path.name, "application/json", card_path.read_bytes())
    return {"model": model.name, "detector_path": str(path), "card_path": str(card_path), "active": False,
            "activate_with": f"fisher-guard activate-detector {path}",
            "validation": detector.card.get("validation"), "test": detector.card.get("test"),
            "threshold": detector.threshold}


def activate_detector(path: str | Path, folders: Sequence[Path]) -> Path:
    """Make a candidate detector the active one of its model: the .npz and its card copied to
    `<model>.detector.npz` / `.json` next to the model's card (where the API and the workers load it from), after
    checking it (sha256 against its card, trained for the model's current weights). API and workers pick it up on
    restart."""
    from service.detect.files import card_path_for, detector_path, load_detector
    from service.zoo.registry import find_card, sha256_file, weights_path

    path = Path(path)
    card = json.loads(card_path_for(path).read_text())
    model_name = card.get("model", {}).get("name")
    if not model_name:
        raise ValueError(f"detector {path} names no model in its card")
    model_card, card_path = find_card(model_name, folders)
    load_detector(path, sha256_file(weights_path(model_card, card_path)))  # refuses a detector of other weights
    target = detector_path(card_path.parent, model_name)
    shutil.copyfile(path, target)
    shutil.copyfile(card_path_for(path), card_path_for(target))
    model_cache.forget(model_name)
    return target


def check(spec: JobSpec, card_path: Path, settings: Settings) -> None:
    """The fit and test datasets exist and fit the model's input shape."""
    from service.zoo.cards import ModelCard

    shape = tuple(ModelCard.read(card_path).input_shape)
    for key in ("fit_dataset", "test_dataset"):
        if spec.params.get(key):
            inputs.load_dataset(spec.params[key], 1)
            inputs.check_dataset_shape(spec.params[key], shape)


JOB = JobType("train-detector", "Train a new detector for a model and write it with its card (activation is a "
              "separate step).", TrainDetectorParams, run, check=check)
