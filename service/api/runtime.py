"""The models the API serves: discovered from the settings' model folders, loaded once with their detectors,
warmed up, each with its worker thread. The functions here run in that thread and return plain Python values
(and, for screening, the immutable detector state the batch used: its threshold and id go into the answer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service import serving
from service.api.model_worker import ModelWorker
from service.config import Settings
from service.data.images import encode_png, vector_png
from service.serving import ModelBundle
from service.zoo.cards import ModelCard
from service.zoo.registry import cards_by_name

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServedModel(ModelBundle):
    """A model bundle as the API serves it: with its worker thread, and each use case's answer formatted as one
    plain dict per image (the use cases themselves are service.serving's, which the job workers call too)."""

    worker: ModelWorker
    memory_budget: int = 1 << 30  # bytes of Jacobian the spectrum may hold at once (setting memory_budget_mb)

    # ---- work that runs in the worker thread; each returns one plain dict per image ----

    def screen_batch(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """The detector's score, eigenvalues, prediction and probabilities, and under "detector" the state whose
        detector scored them: read once per batch, so a batch never mixes two detectors while one is swapped in."""
        state = self.detector_state
        result = serving.screen(self, images, state)
        return [
            {"score": float(result.scores[i]), "eigenvalues": result.eigenvalues[i].tolist(),
             "prediction": int(result.predictions[i]), "probabilities": result.probabilities[i].tolist(),
             "detector": state}
            for i in range(len(result.scores))
        ]

    def spectrum_batch(self, images: torch.Tensor, k: int, method: str, vectors: str) -> list[dict[str, Any]]:
        """Top-k eigenvalues (and eigenvectors as PNG and/or nested lists when asked) per image."""
        spec = serving.spectrum(self, images, k, method, vectors != "none", self.memory_budget)
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

    def forward_batch(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """Logits, probabilities and prediction per image: the model's forward pass alone, no screen (Open
        Inference Protocol requests that ask for none of the detector's outputs)."""
        logits = serving.logits(self, images)
        return [{"logits": row.tolist(), "probabilities": row.softmax(-1).tolist(), "prediction": int(row.argmax())}
                for row in logits]

    def infer_batch(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """`forward_batch`'s outputs and the detector's score when there is one (Open Inference Protocol)."""
        out = self.forward_batch(images)
        if self.detector is None:
            return out
        for item, screened in zip(out, self.screen_batch(images), strict=True):
            state = screened["detector"]  # the score with the threshold of the detector that gave it
            item |= {"score": screened["score"], "threshold": state.detector.threshold, "detector_id": state.id}
        return out

    def attack(self, images: torch.Tensor, attack: str, epsilon: float, labels: list[int] | None,
               options: dict[str, Any], output: str) -> list[dict[str, Any]]:
        """Run one attack on a small batch; per image the adversarial image (PNG and/or tensor) and the outcome."""
        label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.long)
        result = serving.attack(self, images, attack, epsilon, label_tensor, options)
        adversarial, norms, labels_out = result.adversarial, result.perturbation_norm, result.labels
        before, after, fooled = result.original_prediction, result.adversarial_prediction, result.fooled
        top = result.extras.get("top_eigenvalue")
        found = result.extras.get("found")  # a search's outcome (least-norm)
        if top is None:
            top = serving.spectrum(self, images, 1).eigenvalues[:, 0]
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
                item["perturbation_png"] = vector_png(adv - images[i].detach().cpu().float())
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
            self.worker.with_threads(self.forward_batch, blank)
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
    """Load one model bundle (service.serving.load_bundle) and warm it up in its worker."""
    bundle = serving.load_bundle(card_path, settings.device, settings.model_folders(),
                                 settings.allow_pickled_detectors)
    served = ServedModel(**vars(bundle), worker=worker, memory_budget=settings.memory_budget_mb << 20)
    seconds = served.warm_up()
    log.info("model %s loaded on %s (sha256 %s, detector %s), warm-up %.2f s", bundle.name, bundle.device,
             bundle.sha256[:12], bundle.detector_state.id or "none", seconds)
    return served
