"""`evaluate`: the paper's reproduction report (Markdown and figures), zipped as the artifact."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.jobs.job_type import JobType
from service.jobs.running import TaskContext
from service.jobs.types import JobSpec


class EvaluateParams(BaseModel):
    """As `fisher-guard evaluate`."""

    model_config = ConfigDict(extra="forbid")
    quick: bool = Field(False, description="A small slice (about a minute) instead of the full reproduction.")
    seed: int = 0


def run(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """The reproduction report (service.reproduce), zipped as the artifact."""
    from service.reproduce.protocol import EvalConfig
    from service.reproduce.report import write_report
    from service.reproduce.run import run_evaluation

    ctx.progress(0, 1)
    with tempfile.TemporaryDirectory(prefix=f"fisher-guard-report-{spec.id}-") as tmp:
        out = Path(tmp) / "report"
        cfg = EvalConfig.make(out, quick=spec.params["quick"], seed=spec.params["seed"],
                              command=f"job {spec.id}: evaluate {json.dumps(spec.params, sort_keys=True)}")
        report = write_report(cfg, run_evaluation(cfg))
        archive = shutil.make_archive(str(Path(tmp) / "report"), "zip", root_dir=out)
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        ctx.save_artifact(f"report-{spec.id}.zip", "application/zip", Path(archive).read_bytes())
        summary = {"report": str(report.relative_to(out)), "files": files, "quick": cfg.quick,
                   "timing": {k: round(v, 2) for k, v in cfg.timings.items()}}
    ctx.progress(1, 1)
    return summary


JOB = JobType("evaluate", "The reproduction report (Markdown + figures, as a zip).", EvaluateParams, run,
              needs_model=False)
