"""Running a job, whichever backend runs it: its type's `run`, then, for types that take images, the artifact
(CSV rows or .npz arrays) and the summary. A shard of a sharded job keeps its raw output for its parent, which
merges the shards' outputs in item order and summarises them with the same function as an unsharded job. The
artifact goes through the context, keyed by the job id, so a re-run after a crash overwrites the same result."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np

from service.jobs.catalogue import JOB_TYPES
from service.jobs.job_type import JobType
from service.jobs.running import TaskContext, csv_bytes, errors_summary, rows_with_errors
from service.jobs.types import JobSpec


def run_task(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Run one job to its summary."""
    kind = JOB_TYPES.get(spec.type)
    if kind is None:
        raise ValueError(f"unknown job type {spec.type!r}")
    started = time.perf_counter()
    if not kind.shardable:
        summary = kind.run(spec, ctx)
    elif spec.parent is not None:  # a shard: its raw output, for the parent's merge
        output = kind.run(spec, ctx)
        ctx.save_artifact(*_shard_output(kind, spec, output))
        summary = {"shard_of": spec.parent, "items": spec.count}
    else:
        output = _merged(kind, spec, ctx) if spec.shards else kind.run(spec, ctx)
        ctx.save_artifact(*_artifact(kind, spec, output))
        summary = kind.summarise(spec, output) | errors_summary(spec)  # type: ignore[misc]
        if spec.shards:
            summary["shards"] = len(spec.shards)
    summary.setdefault("timing", {})["elapsed_s"] = round(time.perf_counter() - started, 3)
    return summary


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _artifact(kind: JobType, spec: JobSpec, output: Any) -> tuple[str, str, bytes]:
    """(filename, media type, bytes) of a job's artifact."""
    if kind.artifact == "npz":
        return f"{spec.type}-{spec.id}.npz", "application/x-npz", _npz(output)
    return f"{spec.type}-{spec.id}.csv", "text/csv", csv_bytes(rows_with_errors(spec, output))


def _shard_output(kind: JobType, spec: JobSpec, output: Any) -> tuple[str, str, bytes]:
    if kind.artifact == "npz":
        return f"{spec.id}.npz", "application/x-npz", _npz(output)
    return f"{spec.id}.json", "application/json", json.dumps(output).encode()


def _merged(kind: JobType, spec: JobSpec, ctx: TaskContext) -> Any:
    """The shards' outputs joined in item order."""
    ctx.progress(spec.valid_items, spec.valid_items)
    parts = [ctx.load_artifact(shard)[1] for shard in spec.shards]
    if kind.artifact == "npz":
        loaded = [dict(np.load(io.BytesIO(data), allow_pickle=False)) for data in parts]
        return {key: np.concatenate([part[key] for part in loaded]) for key in loaded[0]}
    return [row for data in parts for row in json.loads(data)]
