"""What the screen costs next to the model's own forward pass, stage by stage, on one machine in one run.

For one model and its detector, on MNIST test images, at batch 64 and at batch 1 (medians over repeats, after a
warm-up): the model's forward pass (eager, as a production pipeline runs it, and its frozen twin), the exact
spectrum as the detector asks for it (eigenvalues, eigenvectors, margin gradient), the probe round (the feature
blocks' forward-only passes), the features (spectrum + probes + columns) and the whole screen (`Detector.score`,
features + classifier). Each row is given in ms per image and as a ratio to the eager forward pass: the figure that
transfers between machines. Saves a Markdown table with the machine, versions and commit.

    .venv/bin/python bench/bench_screen_cost.py                      # saves bench/results/screen-cost-cpu.md
    .venv/bin/python bench/bench_screen_cost.py --device cuda        # saves bench/results/screen-cost-cuda.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from provenance import commit

from service.data.mnist import load_mnist
from service.detect.features import FEATURE_SETS, _probe_round, fisher_features
from service.detect.files import find_detector, load_detector
from service.fisher import fisher_spectrum
from service.zoo.frozen import frozen_twin
from service.zoo.registry import SHIPPED_MODELS, load_model

RESULTS = Path(__file__).resolve().parent / "results"



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_image_ms(fn: Callable[[torch.Tensor], object], chunks: list[torch.Tensor], repeats: int,
                 device: torch.device) -> float:
    """Median over `repeats` of the wall time of fn over every chunk, per image, after one warm-up chunk."""
    fn(chunks[0])
    _sync(device)
    images = sum(int(c.shape[0]) for c in chunks)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for chunk in chunks:
            fn(chunk)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / images


def stages(model: torch.nn.Module, detector, device: torch.device) -> dict[str, Callable[[torch.Tensor], object]]:
    """The timed stages, each a function of one batch of images."""
    blocks = FEATURE_SETS[detector.feature_set].blocks
    vectors, margin = any(b.vectors for b in blocks), any(b.margin for b in blocks)

    def forward(x: torch.Tensor) -> object:
        with torch.no_grad():
            return model(x)

    def twin(x: torch.Tensor) -> object:
        with torch.no_grad():
            return frozen_twin(model, x)(x)

    def spectrum(x: torch.Tensor) -> object:
        return fisher_spectrum(model, x, k=detector.k, method=detector.route.method,
                               max_classes=detector.route.max_classes, return_vectors=vectors, return_margin=margin)

    held: dict[int, object] = {}

    def probes(x: torch.Tensor) -> object:  # the spectrum is computed once per batch, outside the timing
        key = id(x)
        if key not in held:
            held[key] = spectrum(x)
        spec = held[key]
        return _probe_round(model, x, [block.probes(x, spec) for block in blocks])

    return {
        "forward pass, eager": forward,
        "forward pass, frozen twin": twin,
        "exact spectrum (eigenvectors + margin)": spectrum,
        "probe round (forward-only, twin)": probes,
        "features (spectrum + probes + columns)":
            lambda x: fisher_features(model, x, detector.feature_set, detector.k, detector.route),
        "screen (Detector.score)": lambda x: detector.score(model, x),
    }


def probe_count(detector, x: torch.Tensor, model: torch.nn.Module) -> int:
    spec = fisher_spectrum(model, x[:1], k=detector.k, return_vectors=True, return_margin=True)
    return sum(int(p.shape[1]) for b in FEATURE_SETS[detector.feature_set].blocks
               if (p := b.probes(x[:1], spec)) is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--detector", type=Path, default=None, help="default: the model's active detector")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--single-images", type=int, default=32, help="images timed one at a time at batch 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = load_model(args.model, device=device)
    model = loaded.module
    detector = load_detector(args.detector or find_detector(SHIPPED_MODELS, args.model), loaded.sha256)
    x = load_mnist("test")[0][:args.images].to(device)
    functions = stages(model, detector, device)
    table: dict[str, dict[int, float]] = {name: {} for name in functions}
    for batch in args.batches:
        chunks = list(x[:args.single_images].split(1)) if batch == 1 else list(x.split(batch))
        for name, fn in functions.items():
            table[name][batch] = per_image_ms(fn, chunks, args.repeats, device)
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    command = (f"`.venv/bin/python bench/bench_screen_cost.py --images {args.images} --batches "
               f"{' '.join(map(str, args.batches))} --repeats {args.repeats} --threads {args.threads} "
               f"--device {args.device}`")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    base = "forward pass, eager"
    lines = [f"# What the screen costs next to the forward pass ({args.model}, detector "
             f"{detector.feature_set}, {probe_count(detector, x, model)} probe images per image)", "", command, "",
             f"Machine: {machine}; torch {torch.__version__}, {args.threads} thread(s); load average {load} at the "
             f"end; commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Medians of "
             f"{args.repeats} repeats over {args.images} images (batch 1: {args.single_images} images one at a "
             "time).", "",
             "| stage | " + " | ".join(f"batch {b}: ms / image | batch {b}: x forward" for b in args.batches) + " |",
             "|---|" + "---|---|" * len(args.batches)]
    for name, row in table.items():
        cells = " | ".join(f"{row[b]:.4f} | {row[b] / table[base][b]:.1f}x" for b in args.batches)
        lines.append(f"| {name} | {cells} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or RESULTS / f"screen-cost-{device.type}.md"
    out.write_text(text)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
