"""Serving layouts and what the screen costs over HTTP, on one machine in one run (LeNet-5 on MNIST, CPU or GPU).

Two tables, each from `fisher-guard serve` on loopback driven by the raw keep-alive clients of bench_api.py:

1. Concurrency: single-image screens (JSON, base64 PNG) from 32 clients, against three layouts of the same
   service: one process; `--workers 2` (two processes, each with its own model, batching only its own clients);
   `--workers 2 --model-process` (two API processes feeding one model process that batches all their requests).
   Images/s, p50/p95/p99 latency.
2. Latency at concurrency 1, one layout (one process): a v2 inference that asks for logits only (the plain
   forward pass round trip: no screen runs), the same with the detector's outputs, and the v1 screen; each as a
   ratio to the plain forward's p50.

    .venv/bin/python bench/bench_serving.py                 # saves bench/results/serving-cpu.md
    .venv/bin/python bench/bench_serving.py --duration 4 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import (  # noqa: E402
    REPO,
    RESULTS,
    Outcome,
    Scenario,
    device_name,
    drive,
    free_port,
    load_average,
    png_b64,
    wait_ready,
)
from provenance import commit  # noqa: E402

from service.data.mnist import load_mnist  # noqa: E402

LAYOUTS = {"one process": [], "--workers 2": ["--workers", "2"],
           "--workers 2 --model-process": ["--workers", "2", "--model-process"]}
SCREEN = "/v1/models/{model}/screen"
V2_INFER = "/v2/models/{model}/infer"


def start(port: int, flags: list[str], args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "FISHER_GUARD_SERVE_MODELS": args.model, "FISHER_GUARD_DEVICE": args.device,
           "FISHER_GUARD_LOG_LEVEL": "warning", "FISHER_GUARD_QUEUE_CAPACITY": "4096"}
    env.pop("FISHER_GUARD_API_KEYS", None)
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--threads", str(args.threads),
               *flags]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_all_ready(base: str, process: subprocess.Popen, processes: int) -> None:
    """Until /metrics, summed over the API processes, counts `processes` of them and all ready (warmed up)."""
    import httpx

    wait_ready(base, process)
    deadline = time.monotonic() + 300
    while True:
        text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}, timeout=10).text
        values = dict(re.findall(r"^(fisher_guard_processes|fisher_guard_ready) (\S+)$", text, re.M))
        if float(values.get("fisher_guard_processes", 0)) == processes and float(
                values.get("fisher_guard_ready", 0)) == 1:
            return
        if time.monotonic() > deadline:
            raise SystemExit("the API processes did not all become ready")
        time.sleep(0.5)


def cpu_seconds(serve: subprocess.Popen) -> dict[str, float]:
    """User + system CPU seconds so far of the server's process tree: the model process apart from the rest."""
    import psutil

    out = {"api": 0.0, "model": 0.0}
    root = psutil.Process(serve.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            role = "model" if "model-process" in " ".join(proc.cmdline()) and proc is not root else "api"
        except psutil.NoSuchProcess:
            continue
        out[role] += times.user + times.system
    return out


def v2_body(image: np.ndarray, outputs: list[str] | None) -> dict:
    body: dict = {"inputs": [{"name": "input", "shape": [1, *image.shape], "datatype": "FP32",
                              "data": image.flatten().round(4).tolist()}]}
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def row(name: str, o: Outcome, reference: float | None = None) -> str:
    ratio = f" | {o.percentile(50) / reference:.2f}x" if reference else ""
    return (f"| {name} | {o.scenario.concurrency} | {o.requests} | {o.images_per_s:.0f} | {o.percentile(50):.1f} | "
            f"{o.percentile(95):.1f} | {o.percentile(99):.1f} | {o.errors}{ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per row")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per layout: the table shows the median run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/serving-<device>.md")
    args = parser.parse_args()
    images = load_mnist("test")[0].numpy()
    screens = [{"images": [png_b64(images[i])]} for i in range(256)]
    load_before = load_average()
    layouts: list[tuple[str, Outcome, dict[str, float]]] = []
    everything: list[str] = []  # images/s of every run, by layout
    latency: list[tuple[str, Outcome]] = []
    for name, flags in LAYOUTS.items():
        port = free_port()
        process = start(port, flags, args)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_all_ready(base, process, 2 if "--workers" in flags else 1)
            scenario = Scenario(name, True, args.concurrency, 1)
            runs = []
            for _ in range(args.repeats):
                before = cpu_seconds(process)
                outcome = asyncio.run(drive("127.0.0.1", port, args.model, scenario, screens, args.duration))
                runs.append((outcome, {role: cpu_seconds(process)[role] - before[role] for role in before}))
            outcome, spent = sorted(runs, key=lambda run: run[0].images_per_s)[len(runs) // 2]  # the median run
            layouts.append((name, outcome, spent))
            everything.append(f"{name}: " + ", ".join(f"{o.images_per_s:.0f}" for o, _ in runs))
            print(f"{name}: {outcome.images_per_s:.0f} images/s, p99 {outcome.percentile(99):.1f} ms, CPU {spent}",
                  file=sys.stderr)
            if not flags:
                for label, path, bodies in (
                        ("v2 infer, logits only (plain forward)", V2_INFER,
                         [v2_body(images[i], ["logits"]) for i in range(64)]),
                        ("v2 infer, every output (screened)", V2_INFER, [v2_body(images[i], None) for i in range(64)]),
                        ("v1 screen (PNG)", SCREEN, screens)):
                    one = asyncio.run(drive("127.0.0.1", port, args.model, Scenario(label, True, 1, 1), bodies,
                                            args.duration, path))
                    latency.append((label, one))
                    print(f"{label}: p50 {one.percentile(50):.2f} ms", file=sys.stderr)
        finally:
            process.terminate()
            process.wait(timeout=60)
    plain = latency[0][1].percentile(50)
    command = "python bench/bench_serving.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"# Serving layouts and the screen over HTTP: LeNet-5 on MNIST, {device_name(args.device)}", "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average "
        f"(1/5/15 min) {load_before} before, {load_average()} after (the load generator shares the cores); commit "
        f"{commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.  ",
        f"Server: `fisher-guard serve`, torch threads {args.threads} per process, micro-batching at its defaults; "
        f"{args.duration:g} s per row, raw keep-alive HTTP/1.1 connections on loopback.", "",
        f"## Single-image screens from {args.concurrency} clients, by layout", "",
        "| layout | concurrency | requests | images/s | p50 ms | p95 ms | p99 ms | errors | server CPU ms / image: "
        "API processes + model process |",
        "|---|---|---|---|---|---|---|---|---|",
        *(row(name, outcome) + f" {1e3 * spent['api'] / max(1, outcome.requests):.2f} + "
          f"{1e3 * spent['model'] / max(1, outcome.requests):.2f} |" for name, outcome, spent in layouts), "",
        f"Each layout ran {args.repeats} times; the row is the median run by images/s (all runs, images/s: "
        f"{'; '.join(everything)}). Server CPU: user + system seconds of the server's processes over the run, per "
        "image answered; in the first two layouts the model runs inside the API processes (counted there).", "",
        "## One client, one image per request (one process)", "",
        "| request | concurrency | requests | images/s | p50 ms | p95 ms | p99 ms | errors | p50 / plain forward |",
        "|---|---|---|---|---|---|---|---|---|",
        *(row(name, outcome, plain) for name, outcome in latency), "",
    ])
    print(report)
    out = args.out or RESULTS / f"serving-{args.device.split(':')[0]}.md"
    out.write_text(report)



if __name__ == "__main__":
    main()
