"""The jobs' model cache: models and detectors loaded once per process (workers and the in-process backend), and
the engine calls that jobs make: the same functions the API calls, so a job and a request give the same answer.

Where models come from (folders, device, whether legacy pickled detectors may load) is set by the entry point
that runs jobs (`configure`, from its settings); until then, the shipped models on 'auto'."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.zoo.registry import SHIPPED_MODELS, LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where the cache loads from."""

    folders: tuple[Path, ...] = (SHIPPED_MODELS,)
    device: str = "auto"
    allow_pickled_detectors: bool = False


_lock = threading.Lock()
_source = Source()
_models: dict[str, LoadedModel] = {}
_detectors: dict[str, object] = {}


def configure(folders: Sequence[Path], device: str, allow_pickled_detectors: bool = False) -> None:
    """Load from these folders on this device from now on (what was cached from elsewhere is dropped)."""
    global _source
    source = Source(tuple(Path(f) for f in folders), device, allow_pickled_detectors)
    with _lock:
        if source != _source:
            _source = source
            _models.clear()
            _detectors.clear()


def get_model(name: str) -> LoadedModel:
    """The model by registry name, loaded on first use and then kept for the life of the process."""
    with _lock:
        if name not in _models:
            model = _models[name] = load_model(name, _source.device, _source.folders)
            log.info("model %s loaded on %s (sha256 %s)", name, model.device, model.sha256[:12])
        return _models[name]


def get_detector(model: LoadedModel):
    """The active detector of a model (`<model>.detector.npz` next to its card, as the API loads it), loaded
    once and checked against the model's weights; a legacy pickle only when the source allows it."""
    from service.detect.detector import find_detector, load_detector

    with _lock:
        if model.name not in _detectors:
            folder = model.card_path.parent if model.card_path else _source.folders[0]
            _detectors[model.name] = load_detector(find_detector(folder, model.name), model.sha256,
                                                   allow_pickle=_source.allow_pickled_detectors)
        return _detectors[model.name]


def forget(model_name: str | None = None) -> None:
    """Drop cached models and detectors (all, or one model's), e.g. after a detector is activated."""
    with _lock:
        for cache in (_models, _detectors):
            if model_name is None:
                cache.clear()
            else:
                cache.pop(model_name, None)


@dataclass
class ScreenBatch:
    """Screening output of one batch, as numpy arrays."""

    scores: np.ndarray
    adversarial: np.ndarray
    threshold: float
    eigenvalues: np.ndarray
    predictions: np.ndarray
    confidence: np.ndarray


def screen(model: LoadedModel, images: np.ndarray) -> ScreenBatch:
    """Detector.score on one batch (what POST /v1/screen runs)."""
    detector = get_detector(model)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(model.device)
    result = detector.score(model.module, x)
    return ScreenBatch(scores=np.asarray(result.scores), adversarial=np.asarray(result.adversarial),
                       threshold=float(result.threshold), eigenvalues=np.asarray(result.eigenvalues),
                       predictions=np.asarray(result.predictions),
                       confidence=np.asarray(result.probabilities).max(axis=1))
