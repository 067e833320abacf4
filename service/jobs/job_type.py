"""What a job type is (service.jobs.catalogue lists them; each is a module of service.jobs.kinds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from service.config import Settings
from service.jobs.running import TaskContext
from service.jobs.types import JobInputError, JobSpec


@dataclass(frozen=True)
class JobType:
    """One kind of job.

    `run(spec, ctx)` does the work. A type that takes images returns its per-image output (`artifact` "csv":
    a list of rows; "npz": a dict of arrays); the runner writes the artifact and calls `summarise(spec, output)`,
    as the merge of a sharded job does over its shards' outputs. Other types write their own artifact and return
    their summary. `check(spec, card_path, settings)` refuses at submission (JobInputError) what would fail later."""

    name: str
    description: str
    params: type[BaseModel]
    run: Callable[[JobSpec, TaskContext], Any]
    summarise: Callable[[JobSpec, Any], dict[str, Any]] | None = None
    artifact: Literal["csv", "npz"] | None = None
    check: Callable[[JobSpec, Path, Settings], None] | None = None
    images: bool = False
    labelled_upload: bool = False  # it may take ONE labelled upload (.npz with labels, zip of class folders), strictly
    needs_model: bool = True
    debug: bool = False  # only with settings.jobs_debug (tests)

    @property
    def shardable(self) -> bool:
        return self.images and self.summarise is not None

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params validated, with defaults filled in; JobInputError (422) when invalid."""
        try:
            return self.params.model_validate(params).model_dump(mode="json")
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
                                 for e in exc.errors())
            raise JobInputError(f"invalid parameters for a {self.name!r} job: {problems}",
                                code="invalid_params") from exc
