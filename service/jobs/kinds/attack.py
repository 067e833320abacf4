"""`attack`: craft adversarial images with any attack of the table (service.attacks.specs); .npz artifact."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.jobs import model_cache
from service.jobs.job_type import JobType
from service.jobs.running import TaskContext, batches, debug_delay, job_images
from service.jobs.types import JobInputError, JobSpec, one_of


class AttackParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attack: str = "ossa"
    epsilon: float | None = Field(1.0, gt=0, le=100, allow_inf_nan=False,
                                  description="L2 budget (attacks that take one).")
    options: dict[str, int | float | str | bool] = Field(default_factory=dict,
                                                         description="Extra keyword arguments of the attack.")
    use_labels: bool = True

    @field_validator("attack")
    @classmethod
    def _known(cls, value: str) -> str:
        from service.attacks import ATTACK_NAMES

        return one_of(value, ATTACK_NAMES, "attack")


def run(spec: JobSpec, ctx: TaskContext) -> dict[str, np.ndarray]:
    """Craft adversarial images with any attack: the arrays of the .npz artifact (adversarial, labels,
    predictions, norms, names, clean images)."""
    from service.attacks import attack_spec

    model = model_cache.get_bundle(spec.model or "").loaded
    images, labels, names = job_images(spec, ctx)
    p = spec.params
    attack = attack_spec(p["attack"]).bind(p.get("epsilon"), p.get("options", {}))
    parts: dict[str, list[np.ndarray]] = {key: [] for key in
                                          ("adversarial", "labels", "original_prediction", "adversarial_prediction",
                                           "fooled", "perturbation_norm")}
    ctx.progress(0, len(images))
    for start, stop in batches(len(images), ctx.settings.jobs_batch_size):
        x = torch.from_numpy(images[start:stop]).to(model.device)
        y = torch.from_numpy(labels[start:stop]).to(model.device) if labels is not None and p["use_labels"] else None
        out = attack(model.module, x, y)
        for key in parts:
            parts[key].append(getattr(out, key).detach().cpu().numpy())
        debug_delay(ctx)
        ctx.progress(stop, len(images))
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    return arrays | {"names": np.asarray(names), "clean": images.astype(np.float32)}


def summarise(spec: JobSpec, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    from service.attacks import attack_spec

    p, fooled = spec.params, arrays["fooled"]
    options = attack_spec(p["attack"]).check_options(p.get("options", {})).model_dump()
    return {"model": spec.model, "attack": p["attack"], "epsilon": p.get("epsilon"), "options": options,
            "attacked": int(len(fooled)), "fooling_rate": float(fooled.mean()) if len(fooled) else 0.0,
            "mean_perturbation_norm": float(arrays["perturbation_norm"].mean()) if len(fooled) else None,
            }


def check(spec: JobSpec, card_path: Any, settings: Any) -> None:
    """The attack's options, and its steps against jobs_max_attack_steps (a batch cannot be interrupted)."""
    from service.attacks import attack_spec, check_steps

    try:
        chosen = attack_spec(spec.params["attack"])
        options = chosen.check_options(spec.params.get("options", {}))
        check_steps(chosen, options, settings.jobs_max_attack_steps, "jobs_max_attack_steps")
    except ValueError as exc:
        raise JobInputError(str(exc), code="invalid_params") from exc


JOB = JobType("attack", "Craft adversarial images with any attack; the adversarial set as .npz.", AttackParams,
              run, summarise, "npz", check, images=True)
