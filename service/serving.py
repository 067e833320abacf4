"""The use cases over a served model, shared by the API and the job workers: one way to load a model with its
detector, and screen / spectrum / attack as functions of that bundle. A request and a job give the same answer
for the same input because both call these functions (KServe's split: this is `model.py`; the API's routers and
the job types are the transports)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.attacks import AttackResult, attack_spec
from service.detect.detector import Detector, ScreenResult
from service.detect.files import find_detector, load_detector
from service.fisher import FisherSpectrum, fisher_spectrum
from service.fisher.spectrum import DEFAULT_MEMORY_BUDGET
from service.zoo.cards import ModelCard
from service.zoo.registry import SHIPPED_MODELS, LoadedModel, load_model

log = logging.getLogger(__name__)


class NoDetectorError(ValueError):
    """Screening asked of a model that has no usable detector; the message says why."""


@dataclass
class ModelBundle:
    """A loaded model and its detector, or the reason it has none (missing, or refused: other weights, corrupt,
    legacy pickle): a stale detector never takes its model down, it is reported instead."""

    loaded: LoadedModel
    detector: Detector | None
    detector_file: Path | None = None
    detector_error: str | None = None

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def card(self) -> ModelCard:
        return self.loaded.card

    @property
    def sha256(self) -> str:
        return self.loaded.sha256

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.card.input_shape
        return c, h, w

    @property
    def detector_auc(self) -> tuple[float | None, str | None]:
        """The detector's measured ROC AUC and where it was measured ('test' or 'validation')."""
        if self.detector is None:
            return None, None
        for split in ("test", "validation"):
            section = self.detector.card.get(split) or {}
            if isinstance(section, dict) and section.get("auc") is not None:
                return float(section["auc"]), split
        return None, None

    def require_detector(self) -> Detector:
        if self.detector is None:
            why = f" ({self.detector_error})" if self.detector_error else ""
            raise NoDetectorError(f"model {self.name!r} has no detector attached{why}; train one with "
                                  "`fisher-guard train-detector`")
        return self.detector


def load_bundle(name_or_card: str | Path, device: str | torch.device = "auto",
                folders: Sequence[Path] = (SHIPPED_MODELS,), allow_pickled_detectors: bool = False) -> ModelBundle:
    """Load a model (by registry name or card path) and the detector next to its card."""
    loaded = load_model(name_or_card, device, folders)
    folder = loaded.card_path.parent if loaded.card_path else Path(folders[0])
    path = find_detector(folder, loaded.name)
    if not path.is_file():
        return ModelBundle(loaded, None)
    try:
        return ModelBundle(loaded, load_detector(path, loaded.sha256, allow_pickle=allow_pickled_detectors), path)
    except ValueError as exc:
        log.warning("model %s has no usable detector: %s", loaded.name, exc)
        return ModelBundle(loaded, None, None, str(exc))


def screen(bundle: ModelBundle, images: Tensor) -> ScreenResult:
    """The detector's score, verdict at its own threshold, eigenvalues and prediction of each image."""
    return bundle.require_detector().score(bundle.loaded.module, images.to(bundle.device))


def spectrum(bundle: ModelBundle, images: Tensor, k: int, method: str = "auto", vectors: bool = False,
             memory_budget: int = DEFAULT_MEMORY_BUDGET) -> FisherSpectrum:
    """The top-k eigenpairs of the Fisher information of each image (service.fisher.fisher_spectrum)."""
    return fisher_spectrum(bundle.loaded.module, images.to(bundle.device), k=k, method=method,  # type: ignore[arg-type]
                           return_vectors=vectors, memory_budget=memory_budget)


def attack(bundle: ModelBundle, images: Tensor, name: str, budget: float | None, labels: Tensor | None = None,
           options: dict[str, Any] | None = None) -> AttackResult:
    """Any attack of the table (service.attacks.specs), with its budget and options."""
    labels = None if labels is None else labels.to(bundle.device)
    return attack_spec(name).bind(budget, options)(bundle.loaded.module, images.to(bundle.device), labels)


def logits(bundle: ModelBundle, images: Tensor) -> Tensor:
    """The model's logits (on the CPU, float32)."""
    with torch.no_grad():
        return bundle.loaded.module(images.to(bundle.device)).float().cpu()
