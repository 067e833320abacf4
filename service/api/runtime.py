"""The models the API serves: discovered from the settings' model folders, loaded once with their detectors,
warmed up, each with its worker thread. The functions here run in that thread and return plain Python values
(and, for screening, the immutable detector state the batch used: its threshold and id go into the answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service import serving
from service.api.metrics import Execution
from service.api.model_link import RemoteWorker
from service.api.model_worker import ModelWorker
from service.config import Settings
from service.data.images import encode_png, vector_png
from service.serving import DetectorState, ModelBundle
from service.zoo.cards import ModelCard
from service.zoo.registry import cards_by_name

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServedModel(ModelBundle):
    """A model bundle as the API serves it: with its worker thread, and each use case's answer formatted as one
    plain dict per image (the use cases themselves are service.serving's, which the job workers call too)."""

    worker: ModelWorker | RemoteWorker
    memory_budget: int = 1 << 30  # bytes of Jacobian the spectrum may hold at once (setting memory_budget_mb)
    served_device: str | None = None  # where the model process runs it, when one does (else: `device`)

    # ---- work that runs in the worker thread; each returns one plain dict per image ----

    def screen_batch(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """The detector's score, eigenvalues, prediction and probabilities, and under "detector" what the answer
        says of the detector that scored them (`detector_summary`): its state is read once per batch, so a batch
        never mixes two detectors while one is swapped in."""
        state = self.detector_state
        result = serving.screen(self, images, state)
        summary = detector_summary(state, self.name)
        return [
            {"score": float(result.scores[i]), "eigenvalues": result.eigenvalues[i].tolist(),
             "prediction": int(result.predictions[i]), "probabilities": result.probabilities[i].tolist(),
             "detector": summary}
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

    def infer_batch(self, images: torch.Tensor, screened: bool = True) -> list[dict[str, Any]]:
        """`forward_batch`'s outputs, and with `screened` the detector's score when there is one, with the
        threshold and id of the detector that gave it (Open Inference Protocol)."""
        out = self.forward_batch(images)
        if not screened or self.detector is None:
            return out
        for item, screen in zip(out, self.screen_batch(images), strict=True):
            item |= {"score": screen["score"], "threshold": screen["detector"]["threshold"],
                     "detector_id": screen["detector"]["id"]}
        return out

    def work(self, key: tuple) -> Callable[[torch.Tensor], list[dict[str, Any]]]:
        """The batch function that a work key names: (kind, *arguments after the images), kind a row of WORK. The
        key says all there is to the work, so a model process is sent the key, never a function."""
        kind, *arguments = key
        method = WORK.get(kind)
        if method is None:
            raise ValueError(f"unknown work {kind!r} (known: {', '.join(WORK)})")
        return lambda images: method(self, images, *arguments)

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
            for key in (("spectrum", 1, "auto", "none"), ("infer", True), ("infer", False)):
                self.worker.with_threads(self.work(key), blank)
            if self.detector is not None:
                self.worker.with_threads(self.screen_batch, blank)
        return time.perf_counter() - start


def detector_summary(state: DetectorState, model_name: str) -> dict[str, Any]:
    """What a screening answer says of the detector that scored it (plain values: they cross to API processes)."""
    detector = state.require(model_name)
    classifier = (detector.card.get("classifier") or {}).get("name", "classifier")
    return {"id": state.id, "threshold": detector.threshold, "auc": state.measured["auc"],
            "method": f"detector: {classifier} on Fisher features '{detector.feature_set}' (k={detector.k}, exact "
                      "spectrum)"}


# The model's work by kind: a work key is (kind, *the arguments after the images), see ServedModel.work
WORK: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "screen": ServedModel.screen_batch,  # ()
    "spectrum": ServedModel.spectrum_batch,  # (k, method, vectors)
    "infer": ServedModel.infer_batch,  # (screened,)
    "attack": ServedModel.attack,  # (attack, epsilon, labels, options, output)
}


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


def local_worker(settings: Settings, name: str, *, on_batch: Callable[[str, int], None] | None = None,
                 on_pending: Callable[[int], None] | None = None,
                 on_execution: Callable[[Execution], None] | None = None) -> ModelWorker:
    """A model's worker thread with the settings' capacity, micro-batching and CPU-kernel policy."""
    return ModelWorker(name, settings.queue_capacity, settings.batch_max_size, settings.batch_max_wait_ms,
                       on_batch=on_batch, threads=settings.api_torch_threads, on_pending=on_pending,
                       large_batch_threads=settings.api_torch_threads_large_batch, large_batch=settings.api_large_batch,
                       small_batch_onednn=settings.api_small_batch_onednn, on_execution=on_execution)


def load_served_model(card_path: Path, settings: Settings, worker: ModelWorker | RemoteWorker) -> ServedModel:
    """Load one model bundle (service.serving.load_bundle) and warm it up in its worker. With a RemoteWorker the
    model runs in the model process: this process keeps a copy on the CPU for what it answers itself (cards,
    detector figures), never runs it, and shows the model process's device."""
    remote = isinstance(worker, RemoteWorker)
    bundle = serving.load_bundle(card_path, "cpu" if remote else settings.device, settings.model_folders(),
                                 settings.allow_pickled_detectors)
    served = ServedModel(**vars(bundle), worker=worker, memory_budget=settings.memory_budget_mb << 20,
                         served_device=worker.device if remote else None)
    seconds = 0.0 if remote else served.warm_up()
    log.info("model %s loaded on %s (sha256 %s, detector %s), warm-up %.2f s", bundle.name,
             served.served_device or bundle.device, bundle.sha256[:12], bundle.detector_state.id or "none", seconds)
    return served


async def watch_detectors(models: dict[str, ServedModel], poll_s: float) -> None:
    """Every `poll_s` seconds, stat each model's active detector card; on a change, load the new detector in a
    thread (every check: a refusal is logged and the old detector stays) and swap it in whole. A screening batch
    reads the model's detector state once: it uses the old detector or the new, never a mix."""
    while True:
        await asyncio.sleep(poll_s)
        for model in list(models.values()):
            try:
                await asyncio.to_thread(serving.refresh_detector, model)
            except Exception:  # a watcher that dies would leave the process on a stale detector for good
                log.exception("watching the detector of model %s failed", model.name)
