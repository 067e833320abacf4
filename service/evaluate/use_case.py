"""The evaluation as the CLI and the job run it: load the detector (checked against the model's weights), run the
plan, write the report."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from service.data.datasets import LabelledImages
from service.detect.files import find_detector, load_detector
from service.evaluate.evaluation import EvaluationPlan, evaluate_detector
from service.reports.evaluation_report import write_evaluation_report
from service.zoo.registry import LoadedModel


def machine() -> str:
    """This machine in words, for the report: CPU or GPU, cores, torch."""
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name(0)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    return f"{where}, {os.cpu_count()} cores, torch {torch.__version__}"


def run_and_write(loaded: LoadedModel, detector_file: Path | None, fit: LabelledImages, test: LabelledImages,
                  plan: EvaluationPlan, out: Path, *, command: str,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Evaluate `detector_file` (default: the model's active detector, next to its card) and write the report to
    `out`; returns report.md's path. FileNotFoundError where the model has no detector."""
    path = detector_file or find_detector(loaded.card_path.parent, loaded.name)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no detector for model {loaded.name} at {path}: give one with --detector")
    detector = load_detector(path, loaded.sha256)
    result = evaluate_detector(loaded.module, detector, fit, test, plan, loaded.card.class_names, progress)
    result.detector["file"] = str(path)
    return write_evaluation_report(out, result, command=command, machine=machine())
