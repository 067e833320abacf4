"""Load test of the screen endpoint: `fisher-guard serve` (uvicorn) on loopback, LeNet-5 on MNIST, CPU or GPU.

Starts the server twice (micro-batching on, and off: FISHER_GUARD_BATCH_MAX_SIZE=1), drives it with an asyncio
load generator (raw keep-alive HTTP/1.1), and reports throughput and p50/p95/p99 latency for single-image
requests at concurrency 1, 8 and 32, for 64-image batches, and micro-batching on vs off at concurrency 32. Prints
a Markdown table and writes it to bench/results/api-<device>.md (api-cpu.md, api-cuda.md).

    .venv/bin/python bench/bench_api.py                  # models/ must hold lenet5 and its detector
    .venv/bin/python bench/bench_api.py --duration 5 --models-dir /path/to/models
    .venv/bin/python bench/bench_api.py --device cuda    # the model on the GPU
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.data.mnist import load_mnist  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclass
class Scenario:
    name: str
    batching: bool
    concurrency: int
    batch: int  # images per request


@dataclass
class Outcome:
    scenario: Scenario
    requests: int
    seconds: float
    latencies_ms: np.ndarray
    errors: int

    @property
    def images_per_s(self) -> float:
        return self.requests * self.scenario.batch / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray((image[0] * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def start_server(port: int, batching: bool, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "FISHER_GUARD_SERVE_MODELS": args.model, "FISHER_GUARD_DEVICE": args.device,
           "FISHER_GUARD_LOG_LEVEL": "warning", "FISHER_GUARD_BATCH_MAX_SIZE": str(args.max_batch if batching else 1),
           "FISHER_GUARD_BATCH_MAX_WAIT_MS": str(args.max_wait_ms), "FISHER_GUARD_QUEUE_CAPACITY": "4096"}
    env.pop("FISHER_GUARD_API_KEYS", None)
    if args.models_dir:
        env["FISHER_GUARD_MODELS_DIR"] = str(args.models_dir)
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--threads", str(args.threads)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(base: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


class RawClient:
    """One keep-alive HTTP/1.1 connection that posts prebuilt requests and reads each response by Content-Length.

    A few microseconds of CPU per request, where httpx takes about a millisecond: the load generator shares the
    machine's cores with the server, so its own cost would otherwise be measured as the server's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, request: bytes) -> int:
        """Send one request, read its whole response, return the status code."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        match = CONTENT_LENGTH.search(head)
        if match is None:
            raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
        await self.reader.readexactly(int(match.group(1)))
        return status

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def post_request(host: str, port: int, path: str, body: dict) -> bytes:
    """The bytes of one JSON POST request (built once, sent many times)."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    return head + payload


async def drive(host: str, port: int, model: str, scenario: Scenario, bodies: list[dict], duration: float,
                path: str = "/v1/models/{model}/screen") -> Outcome:
    """`concurrency` clients, each on its own keep-alive connection, sending the next request (a POST of one of
    `bodies` to `path`) as soon as the last is answered, for `duration` s."""
    requests = [post_request(host, port, path.format(model=model), body) for body in bodies]
    latencies: list[float] = []
    errors = 0
    clients = [await RawClient.connect(host, port) for _ in range(scenario.concurrency)]
    try:
        await asyncio.gather(*(client.send(requests[0]) for client in clients))  # warm-up: first batches
        start = time.perf_counter()
        stop = start + duration

        async def client_loop(client: RawClient, offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                status = await client.send(requests[i % len(requests)])
                if status == 200:
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                else:
                    errors += 1
                i += scenario.concurrency

        await asyncio.gather(*(client_loop(c, k) for k, c in enumerate(clients)))
        seconds = time.perf_counter() - start
    finally:
        for client in clients:
            await client.close()
    return Outcome(scenario, len(latencies), seconds, np.asarray(latencies), errors)


def table(outcomes: list[Outcome]) -> str:
    rows = ["| scenario | micro-batching | concurrency | images/request | requests | images/s | p50 ms | p95 ms | "
            "p99 ms | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        s = o.scenario
        rows.append(f"| {s.name} | {'on' if s.batching else 'off'} | {s.concurrency} | {s.batch} | {o.requests} | "
                    f"{o.images_per_s:.0f} | {o.percentile(50):.1f} | {o.percentile(95):.1f} | "
                    f"{o.percentile(99):.1f} | {o.errors} |")
    return "\n".join(rows)


def targets(outcomes: list[Outcome]) -> list[str]:
    by = {(o.scenario.name, o.scenario.batching, o.scenario.concurrency): o for o in outcomes}
    batch = max(o.images_per_s for o in outcomes if o.scenario.batch > 1)
    p50 = by[("single", True, 1)].percentile(50)
    on, off = by[("single", True, 32)].images_per_s, by[("single", False, 32)].images_per_s
    ok = lambda good: "met" if good else "MISSED"  # noqa: E731
    return [f"- batches: {batch:.0f} images/s (target >= 400): {ok(batch >= 400)}",
            f"- single image, concurrency 1: p50 {p50:.1f} ms (target <= 15 ms): {ok(p50 <= 15)}",
            f"- micro-batching at concurrency 32: {on:.0f} vs {off:.0f} images/s without, x{on / off:.1f} "
            f"(target >= 3x): {ok(on >= 3 * off)}"]


def engine_ms(args: argparse.Namespace, images: np.ndarray) -> dict[int, float]:
    """The detector's own time (no HTTP) per call for 1 and 64 images, in this process with the server's threads."""
    import torch

    from service.api.runtime import discover_cards
    from service.config import Settings
    from service.detect.files import detector_path, load_detector
    from service.zoo.registry import load_model

    torch.set_num_threads(args.threads)
    settings = Settings(models_dir=args.models_dir) if args.models_dir else Settings()
    card_path = next(path for card, path in discover_cards(settings) if card.name == args.model)
    loaded = load_model(card_path, device=args.device)
    detector = load_detector(detector_path(card_path.parent, args.model), loaded.sha256)
    out = {}
    for n in (1, 64):
        x = torch.from_numpy(images[:n])
        detector.score(loaded.module, x)
        start = time.perf_counter()
        for _ in range(5):
            detector.score(loaded.module, x)
        out[n] = (time.perf_counter() - start) / 5 * 1000.0
    return out


def device_name(device: str) -> str:
    if device == "cpu":
        return "CPU"
    import torch

    return f"GPU ({torch.cuda.get_device_name(torch.device(device))})"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--models-dir", type=Path, default=None, help="default: the settings' (models/)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per scenario")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--max-batch", type=int, default=64, help="FISHER_GUARD_BATCH_MAX_SIZE when batching")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="FISHER_GUARD_BATCH_MAX_WAIT_MS")
    parser.add_argument("--device", default="cpu", help="the server's FISHER_GUARD_DEVICE: cpu (default) or cuda")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/api-<device>.md")
    args = parser.parse_args()

    images = load_mnist("test")[0].numpy()
    singles = [{"images": [png_b64(images[i])]} for i in range(256)]
    batches = [{"images": [png_b64(images[j]) for j in range(i, i + 64)]} for i in range(0, 256, 64)]
    plan = {
        True: [Scenario("single", True, 1, 1), Scenario("single", True, 8, 1), Scenario("single", True, 32, 1),
               Scenario("batch", True, 1, 64), Scenario("batch", True, 4, 64)],
        False: [Scenario("single", False, 1, 1), Scenario("single", False, 32, 1)],
    }
    load_before = load_average()
    engine = engine_ms(args, images)
    outcomes: list[Outcome] = []
    for batching, scenarios in plan.items():
        port = free_port()
        process = start_server(port, batching, args)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process)
            for scenario in scenarios:
                bodies = batches if scenario.batch > 1 else singles
                outcome = asyncio.run(drive("127.0.0.1", port, args.model, scenario, bodies, args.duration))
                outcomes.append(outcome)
                print(f"{scenario}: {outcome.images_per_s:.0f} images/s, p50 {outcome.percentile(50):.1f} ms",
                      file=sys.stderr)
        finally:
            process.terminate()
            process.wait(timeout=60)
    load_after = load_average()
    command = "python bench/bench_api.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"# HTTP API benchmark: screen endpoint, LeNet-5 on MNIST, {device_name(args.device)}", "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average "
        f"(1/5/15 min) {load_before} before, {load_after} after (the load generator shares the cores).  ",
        f"Server: `fisher-guard serve`, 1 uvicorn worker, torch threads {args.threads}, micro-batching max "
        f"{args.max_batch} images / {args.max_wait_ms:g} ms (off: max 1). Requests: JSON with base64 PNG digits; "
        f"{args.duration:g} s per row, raw keep-alive HTTP/1.1 connections on loopback (prebuilt requests, "
        "see RawClient), each sending its next request when answered.", "",
        table(outcomes), "",
        f"The detector alone (no HTTP, same process settings) took {engine[1]:.1f} ms for 1 image and "
        f"{engine[64]:.1f} ms for 64 ({64000 / engine[64]:.0f} images/s): the ceiling for the rows above. Batching "
        f"alone ({args.threads} torch thread) makes an image x{engine[1] * 64 / engine[64]:.1f} cheaper in the engine "
        "here: the ceiling of the micro-batching ratio before HTTP costs (it differs between machines).", "",
        "Targets:", *targets(outcomes), "",
    ])
    print(report)
    out = args.out or RESULTS / f"api-{args.device.split(':')[0]}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)


if __name__ == "__main__":
    main()
