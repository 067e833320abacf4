"""The task functions: what a job of each type does, whichever backend runs it. Each takes the job's spec and a
context (inputs, progress, cancellation, artifact) and returns the JSON summary; the artifact goes through the
context, keyed by the job id, so a re-run after a crash overwrites the same result (idempotent)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from service.config import Settings
from service.jobs import engine
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


def run_task(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Run one job to its summary (a sharded job's parent merges its shards' outputs)."""
    handler = merge_shards if spec.shards else TASKS.get(spec.type)
    if handler is None:
        raise ValueError(f"unknown job type {spec.type!r}")
    started = time.perf_counter()
    summary = handler(spec, ctx)
    summary.setdefault("timing", {})["elapsed_s"] = round(time.perf_counter() - started, 3)
    return summary


def _images(spec: JobSpec, ctx: TaskContext) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """The job's valid images, labels (when known) and their names."""
    if spec.dataset:
        images, labels = load_dataset(spec.dataset, spec.limit)
        names = [f"{spec.dataset}[{i}]" for i in range(len(images))]
    else:
        images, labels = ctx.load_upload()
        names = valid_names(spec.item_names, spec.item_errors)
    if spec.count is not None:  # a shard: its slice of the valid items
        part = slice(spec.offset, spec.offset + spec.count)
        images, labels, names = images[part], None if labels is None else labels[part], names[part]
    return images, labels, names


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _debug_delay(ctx: TaskContext) -> None:
    if ctx.settings.jobs_debug and ctx.settings.jobs_debug_delay_s > 0:
        time.sleep(ctx.settings.jobs_debug_delay_s)


def _rows_with_errors(spec: JobSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Valid rows and the bad items' rows, in upload order, each with its item index and status (a shard's rows
    are only its valid items: the parent puts the bad ones in when it merges)."""
    if spec.count is not None:
        return [{"index": spec.offset + i, **row, "status": "ok", "reason": ""} for i, row in enumerate(rows)]
    errors = {e.index: e for e in spec.item_errors}
    out, valid = [], iter(rows)
    total = len(rows) + len(errors)
    for index in range(total):
        if index in errors:
            out.append({"index": index, "name": errors[index].name, "status": "error", "reason": errors[index].reason})
        else:
            out.append({"index": index, **next(valid), "status": "ok", "reason": ""})
    return out


def _csv(rows: list[dict[str, Any]]) -> bytes:
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
    """A number as this module writes it ('-3.5e-07'), which a shard's CSV gives back as text to the merge."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _errors_summary(spec: JobSpec) -> dict[str, Any]:
    return {"item_errors": [e.model_dump() for e in spec.item_errors]}


def screen_task(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Detector score, verdict, top eigenvalues and prediction of every image; CSV artifact."""
    model = engine.get_model(spec.model or "")
    images, labels, names = _images(spec, ctx)
    k = int(spec.params.get("k", 5))
    size = ctx.settings.jobs_batch_size
    rows: list[dict[str, Any]] = []
    threshold = float("nan")
    ctx.progress(0, len(images))
    for start, stop in _batches(len(images), size):
        out = engine.screen(model, images[start:stop])
        threshold = out.threshold
        for j in range(stop - start):
            i = start + j
            row: dict[str, Any] = {"name": names[i]}
            if labels is not None:
                row["label"] = int(labels[i])
            row |= {"prediction": int(out.predictions[j]), "confidence": float(out.confidence[j]),
                    "score": float(out.scores[j]), "adversarial": bool(out.adversarial[j])}
            row |= {f"eigenvalue_{e + 1}": float(v) for e, v in enumerate(out.eigenvalues[j, :k])}
            rows.append(row)
        _debug_delay(ctx)
        ctx.progress(stop, len(images))
    ctx.save_artifact(f"screen-{spec.id}.csv", "text/csv", _csv(_rows_with_errors(spec, rows)))
    flagged = sum(r["adversarial"] for r in rows)
    summary: dict[str, Any] = {"model": model.name, "screened": len(rows), "flagged": int(flagged),
                               "flagged_fraction": flagged / len(rows) if rows else 0.0, "threshold": threshold}
    if labels is not None and rows:
        summary["accuracy"] = float(np.mean([r["prediction"] == r["label"] for r in rows]))
    return summary | _errors_summary(spec)


def least_norm_task(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Least-norm search (OSSA or FGM) per image; CSV artifact."""
    from service.attacks import least_norm_search

    model = engine.get_model(spec.model or "")
    images, labels, names = _images(spec, ctx)
    p = spec.params
    rows: list[dict[str, Any]] = []
    ctx.progress(0, len(images))
    for start, stop in _batches(len(images), ctx.settings.jobs_batch_size):
        x = torch.from_numpy(images[start:stop]).to(model.device)
        y = torch.from_numpy(labels[start:stop]).to(model.device) if labels is not None and p["use_labels"] else None
        out = least_norm_search(model.module, x, y, p["attack"], low=p["low"], high=p["high"], tol=p["tol"])
        for j in range(stop - start):
            rows.append({"name": names[start + j], "label": int(out.labels[j]),
                         "original_prediction": int(out.original_prediction[j]),
                         "least_norm": float(out.least_norm[j]), "lower": float(out.lower[j]),
                         "found": bool(out.found[j]), "adversarial_prediction": int(out.adversarial_prediction[j]),
                         "perturbation_norm": float(out.perturbation_norm[j])})
        _debug_delay(ctx)
        ctx.progress(stop, len(images))
    ctx.save_artifact(f"least-norm-{spec.id}.csv", "text/csv", _csv(_rows_with_errors(spec, rows)))
    found = [r["least_norm"] for r in rows if r["found"]]
    return {"model": model.name, "attack": p["attack"], "searched": len(rows), "found": len(found),
            "median_least_norm": float(np.median(found)) if found else None,
            "mean_least_norm": float(np.mean(found)) if found else None} | _errors_summary(spec)


def attack_task(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Craft adversarial images with any attack; .npz artifact (adversarial, labels, predictions, norms)."""
    from service.attacks import attack_spec

    model = engine.get_model(spec.model or "")
    images, labels, names = _images(spec, ctx)
    p = spec.params
    attack = attack_spec(p["attack"]).bind(p.get("epsilon"), p.get("options", {}))
    parts: dict[str, list[np.ndarray]] = {key: [] for key in
                                          ("adversarial", "labels", "original_prediction", "adversarial_prediction",
                                           "fooled", "perturbation_norm")}
    ctx.progress(0, len(images))
    for start, stop in _batches(len(images), ctx.settings.jobs_batch_size):
        x = torch.from_numpy(images[start:stop]).to(model.device)
        y = torch.from_numpy(labels[start:stop]).to(model.device) if labels is not None and p["use_labels"] else None
        out = attack(model.module, x, y)
        for key in parts:
            parts[key].append(getattr(out, key).detach().cpu().numpy())
        _debug_delay(ctx)
        ctx.progress(stop, len(images))
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays, names=np.asarray(names), clean=images.astype(np.float32))
    ctx.save_artifact(f"attack-{p['attack']}-{spec.id}.npz", "application/x-npz", buffer.getvalue())
    return _attack_summary(spec, arrays)


def _attack_summary(spec: JobSpec, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """An attack job's summary from its artifact's arrays (the task's, or the shards' merged)."""
    from service.attacks import attack_spec

    p, fooled = spec.params, arrays["fooled"]
    options = attack_spec(p["attack"]).check_options(p.get("options", {})).model_dump()
    return {"model": spec.model, "attack": p["attack"], "epsilon": p.get("epsilon"), "options": options,
            "attacked": int(len(fooled)), "fooling_rate": float(fooled.mean()) if len(fooled) else 0.0,
            "mean_perturbation_norm": float(arrays["perturbation_norm"].mean()) if len(fooled) else None,
            } | _errors_summary(spec)


def candidate_path(settings: Settings, model_name: str, job_id: str) -> Path:
    """Where a detector-training job writes its detector: not the active one (activation is a separate step)."""
    return Path(settings.models_dir) / "candidates" / f"{model_name}.detector.{job_id}.npz"


def train_detector_task(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Train a detector for the model and write it (+ card) as a candidate; JSON card artifact."""
    from service.detect.detector import train_detector

    model = engine.get_model(spec.model or "")
    p = dict(spec.params)
    fit_x, fit_y = load_dataset(p.pop("fit_dataset"), p.pop("fit_limit"))
    test_name, test_limit = p.pop("test_dataset"), p.pop("test_limit")
    test_x, test_y = load_dataset(test_name, test_limit) if test_name else (None, None)
    if p.get("attacks") is None:
        p.pop("attacks", None)
    else:
        p["attacks"] = tuple(p["attacks"])
    ctx.progress(0, 1)
    detector = train_detector(
        model.module, model_name=model.name, model_sha256=model.sha256,
        fit_images=torch.from_numpy(fit_x), fit_labels=torch.from_numpy(fit_y),
        test_images=None if test_x is None else torch.from_numpy(test_x),
        test_labels=None if test_y is None else torch.from_numpy(test_y),
        command=f"job {spec.id}: {json.dumps(spec.params, sort_keys=True)}",
        data_description=f"fit: {spec.params['fit_dataset']}, test: {test_name}", **p)
    path, card_path = detector.save(candidate_path(ctx.settings, model.name, spec.id))
    ctx.progress(1, 1)
    ctx.save_artifact(card_path.name, "application/json", card_path.read_bytes())
    return {"model": model.name, "detector_path": str(path), "card_path": str(card_path), "active": False,
            "activate_with": f"fisher-guard activate-detector {path}",
            "validation": detector.card.get("validation"), "test": detector.card.get("test"),
            "threshold": detector.threshold}


def activate_detector(path: str | Path) -> Path:
    """Make a candidate detector the active one of its model: the .npz and its card copied to
    `<model>.detector.npz` / `.json` next to the model's card (where the API and the workers load it from), after
    checking it (sha256 against its card, trained for the model's current weights). API and workers pick it up on
    restart."""
    from service.detect.detector import card_path_for, detector_path, load_detector
    from service.zoo.registry import find_card, sha256_file, weights_path

    path = Path(path)
    card = json.loads(card_path_for(path).read_text())
    model_name = card.get("model", {}).get("name")
    if not model_name:
        raise ValueError(f"detector {path} names no model in its card")
    model_card, card_path = find_card(model_name)
    load_detector(path, sha256_file(weights_path(model_card, card_path)))  # refuses a detector of other weights
    target = detector_path(card_path.parent, model_name)
    shutil.copyfile(path, target)
    shutil.copyfile(card_path_for(path), card_path_for(target))
    engine.forget(model_name)
    return target


def evaluate_task(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """The reproduction report (service.detect.evaluation.run_evaluation), zipped as the artifact."""
    from service.detect.evaluation import EvalConfig, run_evaluation

    ctx.progress(0, 1)
    with tempfile.TemporaryDirectory(prefix=f"fisher-guard-report-{spec.id}-") as tmp:
        out = Path(tmp) / "report"
        cfg = EvalConfig.make(out, quick=spec.params["quick"], seed=spec.params["seed"],
                              command=f"job {spec.id}: evaluate {json.dumps(spec.params, sort_keys=True)}")
        report = run_evaluation(cfg)
        archive = shutil.make_archive(str(Path(tmp) / "report"), "zip", root_dir=out)
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        ctx.save_artifact(f"report-{spec.id}.zip", "application/zip", Path(archive).read_bytes())
        summary = {"report": str(report.relative_to(out)), "files": files, "quick": cfg.quick,
                   "timing": {k: round(v, 2) for k, v in cfg.timings.items()}}
    ctx.progress(1, 1)
    return summary


def debug_crash_task(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """Tests only: kill the process running the job (a poison job), or raise."""
    ctx.progress(0, 1)
    if spec.params.get("mode") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("debug-crash: raised on purpose")


def _csv_rows(data: bytes) -> list[dict[str, Any]]:
    """A shard's CSV rows without the columns the merge puts back (index, status, reason)."""
    return [{k: v for k, v in row.items() if k not in ("index", "status", "reason")}
            for row in csv.DictReader(io.StringIO(data.decode()))]


def merge_shards(spec: JobSpec, ctx: TaskContext) -> dict[str, Any]:
    """The parent of a sharded job: join its shards' artifacts (in item order) into one, and summarise them."""
    ctx.progress(spec.valid_items, spec.valid_items)
    parts = [ctx.load_artifact(shard) for shard in spec.shards]
    model = {"model": spec.model}
    if spec.type == "attack":
        with_arrays = [dict(np.load(io.BytesIO(data), allow_pickle=False)) for _, data in parts]
        arrays = {key: np.concatenate([a[key] for a in with_arrays]) for key in with_arrays[0]}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        ctx.save_artifact(f"attack-{spec.params['attack']}-{spec.id}.npz", "application/x-npz", buffer.getvalue())
        return _attack_summary(spec, arrays) | {"shards": len(parts)}
    rows = [row for _, data in parts for row in _csv_rows(data)]
    ctx.save_artifact(f"{spec.type}-{spec.id}.csv", "text/csv", _csv(_rows_with_errors(spec, rows)))
    if spec.type == "screen":
        flagged = sum(r["adversarial"] == "true" for r in rows)
        threshold = engine.get_detector(engine.get_model(spec.model or "")).threshold
        summary: dict[str, Any] = model | {"screened": len(rows), "flagged": flagged,
                                           "flagged_fraction": flagged / len(rows), "threshold": threshold}
        if rows and "label" in rows[0]:
            summary["accuracy"] = float(np.mean([r["prediction"] == r["label"] for r in rows]))
    else:
        found = [float(r["least_norm"]) for r in rows if r["found"] == "true"]
        summary = model | {"attack": spec.params["attack"], "searched": len(rows), "found": len(found),
                           "median_least_norm": float(np.median(found)) if found else None,
                           "mean_least_norm": float(np.mean(found)) if found else None}
    return summary | {"shards": len(parts)} | _errors_summary(spec)


TASKS: dict[str, Callable[[JobSpec, TaskContext], dict[str, Any]]] = {
    "screen": screen_task, "least-norm": least_norm_task, "attack": attack_task,
    "train-detector": train_detector_task, "evaluate": evaluate_task, "debug-crash": debug_crash_task,
}
