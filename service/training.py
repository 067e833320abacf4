"""The detector-training use case, shared by `fisher-guard train-detector` and the train-detector job: train a
detector for a loaded model on the user's labelled images, write it as a candidate (the .npz and its card) with its
Markdown report, and say how to activate it. Activation is a separate step (service.detect.files)."""

from __future__ import annotations

import io
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from service.data.datasets import DatasetLimits, LabelledImages, load_dataset_by_name, read_labelled
from service.detect.dataset import DEFAULT_ATTACKS
from service.detect.detector import DEFAULT_FPR, TrainingRun, train_detector
from service.detect.features import DEFAULT_K
from service.detect.files import save_detector
from service.reports.detector_report import ReportData, write_detector_report
from service.zoo.cards import ModelCard
from service.zoo.registry import LoadedModel

SERVER_SIDE = ("mnist:", "data:")  # dataset names that resolve on the server, never as paths


@dataclass
class TrainingOptions:
    """What a training run may be told; everything else follows from the data (service.detect.detector)."""

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    epsilons: dict[str, float] = field(default_factory=dict)  # L2 budgets given by the user (others: the rule)
    feature_set: str | None = None  # None: chosen among the candidates by out-of-fold AUC
    classifier: str = "rf"
    k: int = DEFAULT_K
    target_fpr: float = DEFAULT_FPR
    seed: int = 0
    opt_steps: int | None = None  # C&W's Adam steps (default: the protocol's 100)
    hardening_rounds: int = 0  # rounds of service.detect.hardening after the paper's training (0: none)


@dataclass
class TrainedFiles:
    """Where a training run wrote its candidate, card and report; the card; seconds taken."""

    detector: Path
    card: Path
    report: Path
    run: TrainingRun
    seconds: float

    def zip_bytes(self) -> bytes:
        """The candidate, its card and its report (Markdown and figures) in one zip: the job's artifact."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(self.detector, self.detector.name)
            zf.write(self.card, self.card.name)
            for path in sorted(self.report.parent.iterdir()):
                zf.write(path, f"report/{path.name}")
        return buffer.getvalue()


def open_dataset(spec: str, card: ModelCard, folders: list[Path], limits: DatasetLimits,
                 limit: int | None = None) -> LabelledImages:
    """A labelled set for a model, checked against its card (shape, channels, labels): a server-side name
    (`mnist:*`, `data:<name>` from `folders`) or a path to an .npz, a folder of class folders or a zip of one."""
    shape = (card.input_shape[0], card.input_shape[1], card.input_shape[2])
    if spec.startswith(SERVER_SIDE):
        return load_dataset_by_name(spec, folders, shape, card.num_classes, list(card.class_names), limits, limit)
    data = read_labelled(Path(spec), name=spec, shape=shape, num_classes=card.num_classes,
                         class_names=list(card.class_names), limits=limits)
    return data if limit is None else data.subset(list(range(min(limit, len(data)))))


def candidates_dir(models_dir: str | Path) -> Path:
    """Where trained detectors wait to be activated: `<models_dir>/candidates/` (the API activates only from here)."""
    return Path(models_dir) / "candidates"


def candidate_path(models_dir: str | Path, model_name: str, tag: str | None = None) -> Path:
    """`<models_dir>/candidates/<model>.detector.<tag>.npz`, the tag a UTC timestamp by default."""
    tag = tag or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return candidates_dir(models_dir) / f"{model_name}.detector.{tag}.npz"


def train_and_write(loaded: LoadedModel, fit: LabelledImages, test: LabelledImages | None, out: Path,
                    options: TrainingOptions, *, command: str, progress: bool = False) -> TrainedFiles:
    """Train on `fit` (measure on `test`), write the detector to `out` (.npz + card) and its report to
    `<out without .npz>.report/report.md`."""
    start = time.perf_counter()
    run = train_detector(
        loaded.module, model_name=loaded.name, model_sha256=loaded.sha256,
        fit_images=torch.from_numpy(fit.images), fit_labels=torch.from_numpy(fit.labels),
        test_images=None if test is None else torch.from_numpy(test.images),
        test_labels=None if test is None else torch.from_numpy(test.labels),
        attacks=tuple(options.attacks), epsilons=dict(options.epsilons) or None, feature_set=options.feature_set,
        classifier=options.classifier, k=options.k, target_fpr=options.target_fpr, seed=options.seed,
        progress=progress, command=command, data_description=_describe(fit, test),
        opt_params=None if options.opt_steps is None else {"steps": options.opt_steps})
    if options.hardening_rounds:
        from service.detect.hardening import Hardening, harden_detector

        run = harden_detector(loaded.module, run, torch.from_numpy(fit.images), torch.from_numpy(fit.labels),
                              Hardening(rounds=options.hardening_rounds), classifier=options.classifier,
                              seed=options.seed, progress=progress)
    seconds = time.perf_counter() - start
    run.detector.card["wall_time_s"] = round(seconds, 1)
    run.detector.card["training_data"]["fit"] = fit.describe()
    if test is not None:
        run.detector.card["training_data"]["test"] = test.describe()
    path, card_path = save_detector(run.detector, out)
    report_dir = out.with_name(out.name.removesuffix(".npz") + ".report")
    tested = None if run.test_set is None or run.test_scores is None else ReportData(run.test_set, run.test_scores)
    report = write_detector_report(report_dir, run.detector.card, tested, ReportData(run.fit_set, run.fit_scores))
    return TrainedFiles(path, card_path, report, run, seconds)


def _describe(fit: LabelledImages, test: LabelledImages | None) -> str:
    part = f"fit: {fit.source} ({len(fit)} images)"
    return part if test is None else f"{part}; test: {test.source} ({len(test)} images)"
