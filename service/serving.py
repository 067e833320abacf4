"""The use cases over a served model, shared by the API and the job workers: one way to load a model with its
detector, and screen / spectrum / attack as functions of that bundle. A request and a job give the same answer
for the same input because both call these functions (KServe's split: this is `model.py`; the API's routers and
the job types are the transports)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.attacks import AttackResult, attack_spec
from service.detect.detector import Detector, ScreenResult
from service.detect.files import ACTIVATION_KEY, active_card_path, find_detector, load_detector_file
from service.fisher import FisherSpectrum, fisher_spectrum
from service.fisher.spectrum import DEFAULT_MEMORY_BUDGET
from service.zoo.cards import ModelCard
from service.zoo.registry import SHIPPED_MODELS, LoadedModel, load_model

log = logging.getLogger(__name__)


class NoDetectorError(ValueError):
    """Screening asked of a model that has no usable detector; the message says why."""


@dataclass(frozen=True)
class CardStamp:
    """What changes when a detector card is replaced (os.replace: a new inode) or rewritten."""

    mtime_ns: int
    size: int
    inode: int


def card_stamp(path: Path | None) -> CardStamp | None:
    """The card's stamp, or None when there is no card."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return CardStamp(st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(frozen=True)
class DetectorState:
    """Everything a bundle screens with, swapped whole: one attribute assignment (`bundle.detector_state = ...`)
    replaces it, so work that reads the state once uses one detector with its own threshold, id and figures,
    never a mix of two. `card`/`stamp`: the active card watched, and its stamp when it was read."""

    detector: Detector | None = None
    file: Path | None = None  # the .npz (or legacy .joblib) it was read from
    id: str | None = None  # first 16 hex of that file's sha256
    activated_at: str | None = None  # null for a detector that was never activated (shipped, copied)
    previous_id: str | None = None  # the detector a rollback would restore, when one is kept
    error: str | None = None  # why there is no detector, or why the newest card was not loaded
    card: Path | None = None
    stamp: CardStamp | None = None

    def require(self, model_name: str) -> Detector:
        if self.detector is None:
            why = f" ({self.error})" if self.error else ""
            raise NoDetectorError(f"model {model_name!r} has no detector attached{why}; train one with "
                                  "`fisher-guard train-detector`")
        return self.detector

    @property
    def measured(self) -> dict[str, Any]:
        """The card's figures: AUC, TPR, FPR (and the clean images' FPR) of its test split (else validation), the
        split, and the target FPR the threshold was chosen at; None where the card has none."""
        out: dict[str, Any] = {"auc": None, "split": None, "tpr": None, "fpr": None, "clean_fpr": None,
                               "target_fpr": None}
        if self.detector is None:
            return out
        card = self.detector.card
        for split in ("test", "validation"):
            section = card.get(split) or {}
            if isinstance(section, dict) and _number(section.get("auc")) is not None:
                out |= {"split": split, **{key: _number(section.get(key)) for key in ("auc", "tpr", "fpr",
                                                                                        "clean_fpr")}}
                break
        threshold = card.get("threshold")
        if isinstance(threshold, dict):
            out["target_fpr"] = _number(threshold.get("target_fpr"))
        return out


def _number(value: Any) -> float | None:
    """A finite number as float, else None (NaN is not JSON)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


@dataclass
class ModelBundle:
    """A loaded model and its detector state: the detector, or the reason it has none (missing, or refused:
    other weights, corrupt, legacy pickle): a stale detector never takes its model down, it is reported instead.
    The state is replaced whole when the active detector changes on disk (`refresh_detector`)."""

    loaded: LoadedModel
    detector_state: DetectorState = field(default_factory=DetectorState)
    allow_pickled_detectors: bool = False
    refresh_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

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
    def detector(self) -> Detector | None:
        return self.detector_state.detector

    @property
    def detector_error(self) -> str | None:
        return self.detector_state.error

    def require_detector(self) -> Detector:
        return self.detector_state.require(self.name)


def read_detector_state(loaded: LoadedModel, folder: Path, allow_pickled_detectors: bool = False) -> DetectorState:
    """The active detector of a model in `folder` (service.detect.files.find_detector), loaded with every check
    (the sha256 of its file, the model's weights), as a state; a refusal is the state's error."""
    card = active_card_path(folder, loaded.name)
    stamp = card_stamp(card)  # before reading: a change from here on is seen by the next look
    path = find_detector(folder, loaded.name)
    if not path.is_file():
        return DetectorState(card=card, stamp=stamp)
    try:
        found = load_detector_file(path, loaded.sha256, allow_pickle=allow_pickled_detectors)
    except ValueError as exc:
        return DetectorState(error=str(exc), card=card, stamp=stamp)
    activation = found.detector.card.get(ACTIVATION_KEY)
    activation = activation if isinstance(activation, dict) else {}
    previous = activation.get("previous")
    return DetectorState(found.detector, found.file, found.id, activation.get("activated_at"),
                         previous.get("id") if isinstance(previous, dict) else None, None, card, stamp)


def changed_detector(bundle: ModelBundle) -> DetectorState | None:
    """The bundle's new detector state when its active card changed since its state was read, else None. A new
    card that does not load (other weights, corrupt, vanished) keeps the old detector, with the reason as error."""
    current = bundle.detector_state
    if current.card is None or card_stamp(current.card) == current.stamp:
        return None
    new = read_detector_state(bundle.loaded, current.card.parent, bundle.allow_pickled_detectors)
    if new.detector is None and current.detector is not None:
        why = new.error or "the card was removed"
        log.warning("model %s: the active detector card changed but was not loaded, still screening with detector "
                    "%s: %s", bundle.name, current.id, why)
        return replace(current, stamp=new.stamp, error=f"the newest active detector card was not loaded ({why}); "
                       f"still screening with detector {current.id}")
    if new.detector is not None:
        log.info("model %s: detector %s active (was %s), activated %s", bundle.name, new.id, current.id,
                 new.activated_at)
    elif new.error:
        log.warning("model %s has no usable detector: %s", bundle.name, new.error)
    return new


def refresh_detector(bundle: ModelBundle) -> bool:
    """Swap in the newly active detector when the card changed (one attribute assignment: work that read the
    state before keeps its detector); True when it was swapped. Serialised per bundle, so a slower look never
    puts an older state back."""
    with bundle.refresh_lock:
        new = changed_detector(bundle)
        if new is None:
            return False
        bundle.detector_state = new
        return True


def load_bundle(name_or_card: str | Path, device: str | torch.device = "auto",
                folders: Sequence[Path] = (SHIPPED_MODELS,), allow_pickled_detectors: bool = False) -> ModelBundle:
    """Load a model (by registry name or card path) and the active detector next to its card."""
    loaded = load_model(name_or_card, device, folders)
    folder = loaded.card_path.parent if loaded.card_path else Path(folders[0])
    state = read_detector_state(loaded, folder, allow_pickled_detectors)
    if state.error:
        log.warning("model %s has no usable detector: %s", loaded.name, state.error)
    return ModelBundle(loaded, state, allow_pickled_detectors)


def screen(bundle: ModelBundle, images: Tensor, state: DetectorState | None = None) -> ScreenResult:
    """The detector's score, verdict at its own threshold, eigenvalues and prediction of each image (with the
    detector of `state`, a state read once by the caller; default: the bundle's now)."""
    detector = (state or bundle.detector_state).require(bundle.name)
    return detector.score(bundle.loaded.module, images.to(bundle.device))


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
