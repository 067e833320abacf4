"""The models the API serves: discovered from the settings' model folders, loaded once with their detectors,
warmed up, each with its worker thread. The functions here run in that thread and return plain Python values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.api.batching import ModelWorker
from service.attacks import ATTACK_SPECS
from service.config import Settings
from service.data.images import encode_png, vector_png
from service.detect.detector import Detector, find_detector, load_detector
from service.fisher import fisher_spectrum
from service.zoo.cards import ModelCard
from service.zoo.registry import LoadedModel, cards_by_name, load_model

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model, its detector (None when it has none), and its worker."""

    loaded: LoadedModel
    detector: Detector | None
    worker: ModelWorker
    detector_file: Path | None = None
    detector_error: str | None = None
    memory_budget: int = 1 << 30  # bytes of Jacobian the spectrum may hold at once (setting memory_budget_mb)

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

    # ---- work that runs in the worker thread; each returns one plain dict per image ----

    def screen_batch(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """The detector's score, verdict at its own threshold, eigenvalues, prediction and probabilities."""
        assert self.detector is not None
        result = self.detector.score(self.loaded.module, images.to(self.loaded.device))
        return [
            {"score": float(result.scores[i]), "eigenvalues": result.eigenvalues[i].tolist(),
             "prediction": int(result.predictions[i]), "probabilities": result.probabilities[i].tolist()}
            for i in range(len(result.scores))
        ]

    def spectrum_batch(self, images: torch.Tensor, k: int, method: str, vectors: str) -> list[dict[str, Any]]:
        """Top-k eigenvalues (and eigenvectors as PNG and/or nested lists when asked) per image."""
        spec = fisher_spectrum(self.loaded.module, images.to(self.loaded.device), k=k, method=method,  # type: ignore[arg-type]
                               return_vectors=vectors != "none", memory_budget=self.memory_budget)
        out = []
        for i in range(spec.eigenvalues.shape[0]):
            item: dict[str, Any] = {
                "eigenvalues": spec.eigenvalues[i].tolist(), "error_bound": float(spec.error_bound[i]),
                "discarded_mass": float(spec.discarded_mass[i]), "iterations": int(spec.iterations[i]),
                "prediction": int(spec.predictions[i]), "probabilities": spec.probabilities[i].tolist(),
                "method": spec.method, "notes": list(spec.notes),
            }
            if spec.eigenvectors is not None:
                vecs = spec.eigenvectors[i].detach().cpu().float()
                if vectors in ("png", "both"):
                    item["eigenvectors_png"] = [vector_png(v) for v in vecs]
                if vectors in ("tensor", "both"):
                    item["eigenvectors"] = vecs.tolist()
            out.append(item)
        return out

    def infer_batch(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """Logits and probabilities, and the detector's score when there is one (Open Inference Protocol)."""
        x = images.to(self.loaded.device)
        with torch.no_grad():
            logits = self.loaded.module(x).float().cpu()
        screen = self.screen_batch(images) if self.detector is not None else None
        out = []
        for i in range(logits.shape[0]):
            item = {"logits": logits[i].tolist(), "probabilities": logits[i].softmax(-1).tolist(),
                    "prediction": int(logits[i].argmax())}
            if screen is not None:
                item["score"] = screen[i]["score"]
            out.append(item)
        return out

    def attack(self, images: torch.Tensor, attack: str, epsilon: float, labels: list[int] | None,
               options: dict[str, Any], output: str) -> list[dict[str, Any]]:
        """Run one attack on a small batch; per image the adversarial image (PNG and/or tensor) and the outcome."""
        module, x = self.loaded.module, images.to(self.loaded.device)
        label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.long)
        result = ATTACK_SPECS[attack].bind(epsilon, options)(module, x, label_tensor)
        adversarial, norms, labels_out = result.adversarial, result.perturbation_norm, result.labels
        before, after, fooled = result.original_prediction, result.adversarial_prediction, result.fooled
        top = result.extras.get("top_eigenvalue")
        found = result.extras.get("found")  # a search's outcome (least-norm)
        if top is None:
            top = fisher_spectrum(module, x, k=1, method="auto").eigenvalues[:, 0]
        out = []
        for i in range(adversarial.shape[0]):
            item: dict[str, Any] = {
                "label": int(labels_out[i]), "original_prediction": int(before[i]),
                "adversarial_prediction": int(after[i]), "fooled": bool(fooled[i]),
                "perturbation_norm": float(norms[i]), "top_eigenvalue": float(top[i]),
            }
            if found is not None:
                item["found"] = bool(found[i])
                item["least_norm"] = float(result.extras["least_norm"][i]) if item["found"] else None
            adv = adversarial[i].detach().cpu().float()
            if output in ("png", "both"):
                item["adversarial_png"] = encode_png(adv)
            if output in ("tensor", "both"):
                item["adversarial"] = adv.tolist()
            out.append(item)
        return out

    def warm_up(self) -> float:
        """Each kind of batched work on blank images, at 1 image, at a few and at a large batch, with the worker's
        CPU settings for each size (allocators, kernels, and lazy imports: the first batched vector-Jacobian
        product alone imports torch._dynamo for over a second); seconds taken."""
        start = time.perf_counter()
        for size in sorted({1, 4, max(4, min(self.worker.max_batch, self.worker.large_batch))}):
            blank = torch.full((size, *self.shape), 0.5)
            self.worker.with_threads(lambda x: self.spectrum_batch(x, 1, "auto", "none"), blank)
            self.worker.with_threads(self.infer_batch, blank)
            if self.detector is not None:
                self.worker.with_threads(self.screen_batch, blank)
        return time.perf_counter() - start


def discover_cards(settings: Settings) -> list[tuple[ModelCard, Path]]:
    """Every model card in the settings' model folders (first folder wins a name clash), filtered by
    `serve_models` when set; other JSON files (detector cards) are skipped."""
    found = cards_by_name(settings.model_folders())
    if settings.serve_models:
        missing = [name for name in settings.serve_models if name not in found]
        if missing:
            raise ValueError(f"serve_models names unknown models: {', '.join(missing)} "
                             f"(known: {', '.join(sorted(found)) or 'none'})")
        return [found[name] for name in settings.serve_models]
    return list(found.values())


def load_served_model(card_path: Path, settings: Settings, worker: ModelWorker) -> ServedModel:
    """Load one model and its detector (`<model>.detector.npz` next to its card) and warm them up."""
    loaded = load_model(card_path, device=settings.device)
    detector, detector_file, detector_error = None, None, None
    candidate = find_detector(card_path.parent, loaded.name)
    if candidate.is_file():
        try:
            detector = load_detector(candidate, loaded.sha256, allow_pickle=settings.allow_pickled_detectors)
            detector_file = candidate
        except ValueError as exc:  # a stale detector must not take the model down; it is reported instead
            detector_error = str(exc)
            log.warning("model %s served without its detector: %s", loaded.name, exc)
    served = ServedModel(loaded, detector, worker, detector_file, detector_error,
                         memory_budget=settings.memory_budget_mb << 20)
    seconds = served.warm_up()
    log.info("model %s loaded on %s (sha256 %s, detector %s), warm-up %.2f s", loaded.name, loaded.device,
             loaded.sha256[:12], "yes" if detector else "no", seconds)
    return served
