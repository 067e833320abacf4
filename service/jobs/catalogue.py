"""The job catalogue: every job type in one table. A type is a module of service/jobs/kinds with its params
model, its run, its summary (the same function for a whole job and for a sharded one's merge), its submission
check, and whether it takes images (those can be sharded). Adding a job type is one module plus one entry here.
"""

from __future__ import annotations

from service.config import Settings
from service.jobs.job_type import JobType
from service.jobs.types import JobInputError


def _table() -> dict[str, JobType]:
    from service.jobs.kinds import (
        attack,
        debug_crash,
        evaluate,
        evaluate_detector,
        least_norm,
        screen,
        train_detector,
    )

    return {kind.JOB.name: kind.JOB for kind in (screen, least_norm, attack, train_detector, evaluate,
                                                         evaluate_detector, debug_crash)}


JOB_TYPES: dict[str, JobType] = _table()


def job_type(name: str, settings: Settings) -> JobType:
    """The type called `name` that these settings allow; JobInputError listing the known ones."""
    known = {n: t for n, t in JOB_TYPES.items() if settings.jobs_debug or not t.debug}
    if name not in known:
        raise JobInputError(f"unknown job type {name!r} (known: {', '.join(known)})", code="unknown_job_type")
    return known[name]


def public_types() -> dict[str, str]:
    """Name -> description of the types users may submit."""
    return {n: t.description for n, t in JOB_TYPES.items() if not t.debug}
