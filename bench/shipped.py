"""The shipped LeNet-5 and its active detector, as the validation studies of bench/ load them."""

from __future__ import annotations

from service.detect.detector import Detector
from service.detect.files import find_detector, load_detector
from service.zoo.registry import SHIPPED_MODELS, LoadedModel, load_model


def shipped_lenet5() -> tuple[LoadedModel, Detector]:
    """LeNet-5 on the CPU and the detector next to its card in models/ (checked against its weights)."""
    loaded = load_model("lenet5", device="cpu")
    return loaded, load_detector(find_detector(SHIPPED_MODELS, "lenet5"), loaded.sha256)
