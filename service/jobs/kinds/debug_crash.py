"""`debug-crash` (tests only, with settings.jobs_debug): a job that kills the worker running it, or raises."""

from __future__ import annotations

import os
import signal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from service.jobs.job_type import JobType
from service.jobs.running import TaskContext
from service.jobs.types import JobSpec


class DebugCrashParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["kill", "raise"] = "kill"


def run(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Tests only: kill the process running the job (a poison job), or raise."""
    ctx.progress(0, 1)
    if spec.params.get("mode") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("debug-crash: raised on purpose")


JOB = JobType("debug-crash", "Tests only: kill the worker running the job, or raise.", DebugCrashParams, run,
              needs_model=False, debug=True)
