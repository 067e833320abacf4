"""The detector training's names and defaults that `fisher-guard train-detector --help` shows, in a module without
torch or sklearn (the CLI's parser is built on every call); service.detect.dataset and .detector use them."""

from __future__ import annotations

DEFAULT_ATTACKS: tuple[str, ...] = ("fgm", "otcm", "opt", "bim", "ossa")
OPT_PARAMS: dict[str, float] = {"c": 1.0, "steps": 100, "lr": 0.05}  # C&W L2 ("opt"): trade-off, Adam steps, rate
DEFAULT_FPR = 0.05  # the threshold's false-positive rate on clean images
