"""`screen`: Fisher screening of a batch; one CSV row per image (score, verdict, eigenvalues, prediction)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from service import serving
from service.jobs import model_cache
from service.jobs.job_type import JobType
from service.jobs.running import TaskContext, batches, debug_delay, job_images
from service.jobs.types import JobSpec


class ScreenParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(5, ge=1, le=100, description="Top eigenvalues reported per image.")


def run(spec: JobSpec, ctx: TaskContext) -> list[dict[str, Any]]:
    """Detector score, verdict, top eigenvalues and prediction of every image: one row each."""
    bundle = model_cache.get_bundle(spec.model or "")
    state = bundle.detector_state  # one detector for the whole job, even if another is activated meanwhile
    detector = state.require(bundle.name)
    images, labels, names = job_images(spec, ctx)
    k = int(spec.params.get("k", 5))
    size = ctx.settings.jobs_batch_size
    rows: list[dict[str, Any]] = []
    ctx.progress(0, len(images))
    for start, stop in batches(len(images), size):
        out = serving.screen(bundle, torch.from_numpy(np.ascontiguousarray(images[start:stop], dtype=np.float32)),
                             state)
        confidence = out.probabilities.max(axis=1)
        for j in range(stop - start):
            i = start + j
            row: dict[str, Any] = {"name": names[i]}
            if labels is not None:
                row["label"] = int(labels[i])
            row |= {"prediction": int(out.predictions[j]), "confidence": float(confidence[j]),
                    "score": float(out.scores[j]), "adversarial": bool(out.adversarial[j])}
            row |= {f"eigenvalue_{e + 1}": float(v) for e, v in enumerate(out.eigenvalues[j, :k])}
            row |= {"threshold": detector.threshold, "detector_id": state.id}
            rows.append(row)
        debug_delay(ctx)
        ctx.progress(stop, len(images))
    return rows


def summarise(spec: JobSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    flagged = sum(bool(r["adversarial"]) for r in rows)
    summary: dict[str, Any] = {"model": spec.model, "screened": len(rows), "flagged": int(flagged),
                               "flagged_fraction": flagged / len(rows) if rows else 0.0,
                               "threshold": rows[0]["threshold"] if rows else None,
                               "detector_ids": sorted({r["detector_id"] for r in rows})}
    if rows and "label" in rows[0]:
        summary["accuracy"] = float(np.mean([r["prediction"] == r["label"] for r in rows]))
    return summary


def check(spec: JobSpec, card_path: Any, settings: Any) -> None:
    """The model's active detector lies next to its card (as the API and the workers load it)."""
    from service.detect.files import find_detector
    from service.jobs.types import JobInputError

    path = find_detector(card_path.parent, spec.model or "")
    if not path.is_file():
        raise JobInputError(f"model {spec.model!r} has no active detector ({path.name}); train one with a "
                            "'train-detector' job and activate it", code="no_detector")


JOB = JobType("screen", "Fisher screening of a batch: per-image detector score, verdict, top eigenvalues, "
              "prediction (CSV).", ScreenParams, run, summarise, "csv", check, images=True)
