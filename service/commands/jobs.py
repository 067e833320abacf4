"""`fisher-guard worker`, `fisher-guard jobs ...` (submit, run with a progress bar, status, list, cancel, result,
artifact) and `fisher-guard activate-detector`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("worker", help="run a job worker (Redis backend): models load once, jobs run in-process",
                       description="Take jobs from the Redis queue (FISHER_GUARD_REDIS_URL) and run them. Models and "
                       "detectors are loaded once per worker process and kept; jobs run in this process (no fork). "
                       "Start several workers, on as many machines as you like, to scale out.")
    w.add_argument("--name", help="worker name (default: rq's, host + pid based)")
    w.add_argument("--preload", action="append", default=[], metavar="MODEL",
                   help="load this model (and its detector) before taking jobs; repeatable")
    w.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: FISHER_GUARD_JOBS_WORKER_THREADS, 1)")
    w.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    w.add_argument("--log-level", default=None, help="default: the log_level setting")
    w.set_defaults(handler=run_worker)

    j = sub.add_parser("jobs", help="submit and follow long jobs (screening, least-norm, attacks, training, "
                       "evaluation)", description="Talk to the job queue: Redis when FISHER_GUARD_REDIS_URL is set, "
                       "else the in-process backend (then only `jobs run` makes sense: the job runs in this process).")
    js = j.add_subparsers(dest="jobs_command", required=True, metavar="action")
    for name, helptext in (("run", "submit a job and follow it with a progress bar; save the artifact"),
                           ("submit", "submit a job and print its id (Redis backend)")):
        p = js.add_parser(name, help=helptext)
        p.add_argument("type", help="screen, least-norm, attack, train-detector, evaluate")
        p.add_argument("files", nargs="*", type=Path, help="images: .npz, .npy, .zip of PNGs, PNG/JPEG files")
        p.add_argument("--model", help="model registry name, e.g. lenet5")
        p.add_argument("--dataset", help="server-side images instead of files, e.g. mnist:test")
        p.add_argument("--limit", type=int, help="only the first N images")
        p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a job parameter (value parsed as JSON when it can be); repeatable")
        p.add_argument("--params", default="{}", help="job parameters as a JSON object")
        if name == "run":
            p.add_argument("--out", type=Path, help="where to save the artifact (default: its own name, here)")
            p.add_argument("--no-progress", action="store_true")
        p.set_defaults(handler=run_jobs, jobs_command=name)
    for name, helptext in (("status", "a job's status (JSON)"), ("result", "a finished job's summary (JSON)"),
                           ("cancel", "cancel a queued or running job")):
        p = js.add_parser(name, help=helptext)
        p.add_argument("job_id")
        p.set_defaults(handler=run_jobs, jobs_command=name)
    p = js.add_parser("artifact", help="download a finished job's artifact")
    p.add_argument("job_id")
    p.add_argument("--out", type=Path)
    p.set_defaults(handler=run_jobs, jobs_command="artifact")
    p = js.add_parser("list", help="recent jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.set_defaults(handler=run_jobs, jobs_command="list")

    a = sub.add_parser("activate-detector", help="make a trained candidate detector the active one of its model "
                       "(or --rollback)",
                       description="Check a candidate detector (written by train-detector to models/candidates/) "
                       "against the model's weights and make it the model's active detector in one atomic step, "
                       "keeping the one it replaces for --rollback. Running API processes swap it in within "
                       "FISHER_GUARD_DETECTOR_POLL_S, job workers at their next job: no restart.")
    a.add_argument("path", type=Path, nargs="?", help="the candidate's .npz (or its card .json)")
    a.add_argument("--rollback", action="store_true",
                   help="restore the detector the last activation (or rollback) of --model replaced")
    a.add_argument("--model", default=None, help="the model (default: the one the candidate's card names)")
    a.set_defaults(handler=run_activate)


def run_worker(args: argparse.Namespace) -> int:
    import torch

    from service.config import get_settings
    from service.jobs import model_cache
    from service.jobs.redis_worker import run_worker as work
    from service.observability import configure_logging

    settings = get_settings()
    level = (args.log_level or settings.log_level).upper()
    configure_logging(level, settings.log_format)
    if not settings.redis_url:
        print("fisher-guard worker: set FISHER_GUARD_REDIS_URL (e.g. redis://localhost:6379/0)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or settings.jobs_worker_threads)
    model_cache.configure(settings.model_folders(), settings.device, settings.allow_pickled_detectors)
    for name in args.preload:
        bundle = model_cache.get_bundle(name)
        if bundle.detector is None:  # a model without detector still serves attacks and searches
            print(f"note: model {name} has no detector ({bundle.detector_error or 'none found'})", file=sys.stderr)
    work(settings, name=args.name, burst=args.burst, log_level=level)
    return 0


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params = json.loads(args.params)
    for item in args.param:
        key, _, value = item.partition("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def run_jobs(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.jobs import JobError, JobRequest, JobStatus, get_job_queue

    queue = get_job_queue(get_settings())
    if queue.backend == "in-process" and args.jobs_command == "run":  # the job runs in this process
        import torch

        torch.set_num_threads(get_settings().jobs_worker_threads)
    try:
        if args.jobs_command in ("run", "submit"):
            if args.jobs_command == "submit" and queue.backend != "redis":
                print("jobs submit needs the Redis backend (FISHER_GUARD_REDIS_URL); use `jobs run`", file=sys.stderr)
                return 2
            request = JobRequest(type=args.type, model=args.model, dataset=args.dataset, limit=args.limit,
                                 params=_params(args))
            files = [(f.name, f.read_bytes()) for f in args.files]
            info = queue.submit(request, files)
            if args.jobs_command == "submit":
                print(info.id)
                return 0
            info = follow(queue, info.id, progress=not args.no_progress)
            if info.status != JobStatus.succeeded:
                print(f"job {info.id} {info.status.value}: {info.error.reason if info.error else ''}", file=sys.stderr)
                return 1
            print(json.dumps(queue.result(info.id), indent=2))
            if info.has_artifact:
                artifact = queue.artifact(info.id)
                out = args.out or Path(artifact.filename)
                out.write_bytes(artifact.data)
                print(f"artifact: {out}", file=sys.stderr)
            return 0
        if args.jobs_command == "status":
            print(queue.status(args.job_id).model_dump_json(indent=2))
        elif args.jobs_command == "result":
            print(json.dumps(queue.result(args.job_id), indent=2))
        elif args.jobs_command == "cancel":
            print(queue.cancel(args.job_id).model_dump_json(indent=2))
        elif args.jobs_command == "artifact":
            artifact = queue.artifact(args.job_id)
            out = args.out or Path(artifact.filename)
            out.write_bytes(artifact.data)
            print(out)
        elif args.jobs_command == "list":
            status = JobStatus(args.status) if args.status else None
            for info in queue.list(args.limit, status):
                print(f"{info.id}  {info.type:14s} {info.status.value:9s} {info.progress.done}/{info.progress.total}"
                      f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created_at))}")
        return 0
    except JobError as exc:
        print(f"error ({exc.code}): {exc.detail}", file=sys.stderr)
        return 1
    finally:
        queue.close()


def follow(queue, job_id: str, progress: bool = True, poll_s: float = 0.2):
    """Poll a job until it ends, with a tqdm progress bar of items done."""
    from tqdm.auto import tqdm

    info = queue.status(job_id)
    with tqdm(total=info.progress.total or None, desc=f"{info.type} {job_id[:8]}", unit="img",
              disable=not progress) as bar:
        while True:
            info = queue.status(job_id)
            if info.progress.total and bar.total != info.progress.total:
                bar.total = info.progress.total
            bar.n = info.progress.done
            bar.set_postfix_str(info.status.value, refresh=False)
            bar.refresh()
            if info.status.finished:
                return info
            time.sleep(poll_s)


def run_activate(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.detect.files import activate_detector, card_path_for, rollback_detector
    from service.zoo.registry import find_card, sha256_file, weights_path

    if args.rollback == (args.path is not None):
        print("activate-detector: give a candidate PATH, or --rollback --model NAME", file=sys.stderr)
        return 2
    name = args.model
    try:
        if name is None:
            if args.path is None:
                print("activate-detector: --rollback needs --model NAME", file=sys.stderr)
                return 2
            name = (json.loads(card_path_for(args.path).read_text()).get("model") or {}).get("name")
            if not name:
                print(f"activate-detector: the card of {args.path} names no model: give --model", file=sys.stderr)
                return 2
        card, card_path = find_card(name, get_settings().model_folders())
        sha = sha256_file(weights_path(card, card_path))
        active = (rollback_detector(card_path, sha) if args.rollback else activate_detector(args.path, card_path, sha))
    except (ValueError, OSError) as exc:  # refusals: other weights, no previous, corrupt, ...
        print(f"activate-detector: {exc}", file=sys.stderr)
        return 1
    print(active.describe())
    return 0
