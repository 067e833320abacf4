"""What a running job sees and the helpers its type uses: the task context (inputs, progress, cancellation,
artifacts), the job's images, batching, and the CSV rows of per-image results."""

from __future__ import annotations

import csv
import io
import time
from typing import Any, Protocol

import numpy as np

from service.config import Settings
from service.jobs.inputs import load_dataset, valid_names
from service.jobs.types import JobSpec


class TaskContext(Protocol):
    """What a backend gives a running task."""

    settings: Settings

    def load_upload(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The staged upload (images, labels)."""
        ...

    def progress(self, done: int, total: int) -> None:
        """Report progress; raises JobCancelled when the job was cancelled."""
        ...

    def save_artifact(self, filename: str, media_type: str, data: bytes) -> None:
        ...

    def load_artifact(self, job_id: str) -> tuple[str, bytes]:
        """Another job's artifact (filename, data): a sharded job's shards (Redis backend only)."""
        ...


def job_images(spec: JobSpec, ctx: TaskContext) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """The job's valid images, labels (when known) and their names."""
    if spec.dataset:
        images, labels = load_dataset(spec.dataset, spec.limit, ctx.settings)
        names = [f"{spec.dataset}[{i}]" for i in range(len(images))]
    else:
        images, labels = ctx.load_upload()
        names = valid_names(spec.item_names, spec.item_errors)
    if spec.count is not None:  # a shard: its slice of the valid items
        part = slice(spec.offset, spec.offset + spec.count)
        images, labels, names = images[part], None if labels is None else labels[part], names[part]
    return images, labels, names


def batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def debug_delay(ctx: TaskContext) -> None:
    if ctx.settings.jobs_debug and ctx.settings.jobs_debug_delay_s > 0:
        time.sleep(ctx.settings.jobs_debug_delay_s)


def rows_with_errors(spec: JobSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Valid rows and the bad items' rows, in upload order, each with its item index and status."""
    errors = {e.index: e for e in spec.item_errors}
    out, valid = [], iter(rows)
    total = len(rows) + len(errors)
    for index in range(total):
        if index in errors:
            out.append({"index": index, "name": errors[index].name, "status": "error", "reason": errors[index].reason})
        else:
            out.append({"index": index, **next(valid), "status": "ok", "reason": ""})
    return out


def csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return buffer.getvalue().encode()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula


def _fmt(value: Any) -> Any:
    """A cell: floats to 9 digits, booleans as true/false, and text that a spreadsheet would run as a formula
    (an uploaded file named '=HYPERLINK(...)') quoted with a leading apostrophe, as OWASP advises."""
    if isinstance(value, float | np.floating):
        return f"{float(value):.9g}"
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _is_number(value):
        return "'" + value
    return value


def _is_number(text: str) -> bool:
    """A number written as text ('-3.5e-07'): a spreadsheet reads it as a number, not a formula."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def errors_summary(spec: JobSpec) -> dict[str, Any]:
    return {"item_errors": [e.model_dump() for e in spec.item_errors]}



