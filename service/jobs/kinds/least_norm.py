"""`least-norm`: per image, the smallest L2 epsilon at which a one-step attack (OSSA or FGM) fools the model (CSV)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.jobs import model_cache
from service.jobs.job_type import JobType
from service.jobs.running import TaskContext, batches, debug_delay, job_images
from service.jobs.types import JobSpec


class LeastNormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attack: Literal["ossa", "fgm"] = "ossa"
    low: float = Field(0.0, ge=0, allow_inf_nan=False)
    high: float = Field(6.0, gt=0, le=100, allow_inf_nan=False)
    tol: float = Field(1e-3, gt=0, allow_inf_nan=False)
    use_labels: bool = Field(True, description="Use the dataset's labels (else the model's predictions).")

    @model_validator(mode="after")
    def _bracket(self) -> LeastNormParams:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        return self


def run(spec: JobSpec, ctx: TaskContext) -> list[dict[str, Any]]:
    """Least-norm search (OSSA or FGM) per image: one row each."""
    from service.attacks import least_norm_search

    model = model_cache.get_bundle(spec.model or "").loaded
    images, labels, names = job_images(spec, ctx)
    p = spec.params
    rows: list[dict[str, Any]] = []
    ctx.progress(0, len(images))
    for start, stop in batches(len(images), ctx.settings.jobs_batch_size):
        x = torch.from_numpy(images[start:stop]).to(model.device)
        y = torch.from_numpy(labels[start:stop]).to(model.device) if labels is not None and p["use_labels"] else None
        out = least_norm_search(model.module, x, y, p["attack"], low=p["low"], high=p["high"], tol=p["tol"])
        for j in range(stop - start):
            rows.append({"name": names[start + j], "label": int(out.labels[j]),
                         "original_prediction": int(out.original_prediction[j]),
                         "least_norm": float(out.least_norm[j]), "lower": float(out.lower[j]),
                         "found": bool(out.found[j]), "adversarial_prediction": int(out.adversarial_prediction[j]),
                         "perturbation_norm": float(out.perturbation_norm[j])})
        debug_delay(ctx)
        ctx.progress(stop, len(images))
    return rows


def summarise(spec: JobSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    found = [r["least_norm"] for r in rows if r["found"]]
    return {"model": spec.model, "attack": spec.params["attack"], "searched": len(rows), "found": len(found),
            "median_least_norm": float(np.median(found)) if found else None,
            "mean_least_norm": float(np.mean(found)) if found else None}


JOB = JobType("least-norm", "Least-norm search (OSSA or FGM) per image: the smallest L2 epsilon that fools the "
              "model (CSV).", LeastNormParams, run, summarise, "csv", images=True)
