"""Adversarial detection on Fisher features: features, the detection set, the detector, baselines, evaluation.

The names below load on first use (PEP 562): importing a torch-free module of this package, such as
service.detect.defaults (read by the CLI's parser), does not import torch and sklearn."""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "BASELINES": "baselines", "KernelDensityScorer": "baselines", "baseline_features": "baselines",
    "bayesian_uncertainty": "baselines",
    "DEFAULT_ATTACKS": "defaults",
    "MNIST_EPSILONS": "dataset", "DetectionSet": "dataset", "build_detection_set": "dataset",
    "Detector": "detector", "ScreenResult": "detector", "threshold_at_fpr": "detector", "train_detector": "detector",
    "FEATURE_SETS": "features", "fisher_features": "features",
    "DetectorLoadError": "files", "detector_path": "files", "load_detector": "files",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
