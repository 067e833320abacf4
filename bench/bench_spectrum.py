"""Benchmark of the routes to the spectrum of G_x: the paper's Algorithm 1 against lanczos, truncated and exact.

Prints a Markdown table and saves it to bench/results/spectrum-<device>.md (or --output). Cases:
(a) LeNet-5 28x28 K=10, (b) torchvision resnet18 32x32 K=10, (c) torchvision resnet50 224x224 K=1000, all
with random weights in eval mode. Per method: ms per image at batch 1 and batched (medians after a warm-up),
and the relative error of the top eigenvalue against a dense float64 reference (G_x built from the full
Jacobian) where it fits, else against a tightly converged Lanczos run.

    .venv/bin/python bench/bench_spectrum.py            # all cases (about 10 minutes on 2 CPU cores)
    .venv/bin/python bench/bench_spectrum.py --quick --cases a
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.fisher import dense_fisher, fisher_spectrum  # noqa: E402
from service.zoo.architectures import LeNet5  # noqa: E402
from service.zoo.fold import fold_batchnorm  # noqa: E402
from service.zoo.registry import use_full_float32  # noqa: E402

METHODS = ("power", "power-alias", "lanczos", "truncated", "exact")


@dataclass
class Case:
    """One model and input size of the benchmark."""

    key: str
    title: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    num_classes: int
    batch: int
    k: int
    dense: bool  # whether the dense D x D reference fits
    error_images: int  # images over which the top-eigenvalue error is measured (the largest is reported)
    lanczos_tol: float = 1e-6
    lanczos_max_iter: int | None = None  # None: the engine's default


def build_resnet(depth: int, num_classes: int) -> nn.Module:
    import torchvision

    net = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
    return net(num_classes=num_classes)


CASES = {
    "a": Case("a", "(a) LeNet-5 28x28 K=10", lambda: LeNet5(num_classes=10), (1, 28, 28), 10, 256, 9, True, 4),
    "b": Case("b", "(b) ResNet-18 32x32 K=10", lambda: build_resnet(18, 10), (3, 32, 32), 10, 64, 9, True, 2),
    "c": Case("c", "(c) ResNet-50 224x224 K=1000", lambda: build_resnet(50, 1000), (3, 224, 224), 1000, 2, 20,
              False, 1, lanczos_tol=1e-4, lanczos_max_iter=40),
}


def method_kwargs(method: str, case: Case) -> dict:
    """The settings each route runs with: Algorithm 1 as written runs its 50 steps (tol=0)."""
    if method in ("power", "power-alias"):
        return dict(k=1, tol=0.0, max_iter=50)
    if method == "lanczos":
        return dict(k=case.k, tol=case.lanczos_tol, max_iter=case.lanczos_max_iter)
    if method == "truncated":
        return dict(k=case.k, mass=0.999)
    return dict(k=case.k)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device, warm_up: bool = True) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call. The process CPU time of each call is
    kept in CPU_MS (a guide when the machine is shared: wall time then includes waiting for the cores)."""
    if warm_up:
        fn()
        sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        LAST_RESULT[:] = [fn()]
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    CPU_MS.append(statistics.median(cpu))
    return statistics.median(times)


CPU_MS: list[float] = []  # the CPU time of the latest median_ms calls
LAST_RESULT: list[object] = []  # what the latest timed call returned (case c reuses it: one image, one run)


def dense_top(model: nn.Module, images: Tensor) -> Tensor:
    """Top eigenvalue of the dense float64 G_x per image."""
    tops = []
    for image in images:
        g, _, _ = dense_fisher(model, image.cpu())
        tops.append(torch.linalg.eigvalsh(g)[-1])
    return torch.stack(tops)


def lanczos_top(model: nn.Module, images: Tensor) -> Tensor:
    """Top eigenvalue from a tightly converged Lanczos run (the reference where the dense matrix does not fit)."""
    spectrum = fisher_spectrum(model, images, k=1, method="lanczos", tol=1e-8, max_iter=100)
    return spectrum.eigenvalues[:, 0].cpu()


def class_gradient_ms(model: nn.Module, x: Tensor, count: int, device: torch.device) -> float:
    """Median ms of one fresh class gradient at one image (the unit of Algorithm 1's cost), from `count`."""
    from service.fisher.power import _class_gradients

    classes = list(range(count))
    return median_ms(lambda: _class_gradients(model, x, classes), 1, device) / count


def estimate_ms(method: str, case: Case, grad_ms: float, forward_ms: float) -> float:
    """A route's time per image from its unit costs: Algorithm 1 runs 50 steps of K (as written) or ~K/5
    (alias) fresh gradients; the exact route K-1 backward passes after one forward."""
    if method == "exact":
        return (case.num_classes - 1) * grad_ms + forward_ms
    per_step = case.num_classes if method == "power" else max(1, round(case.num_classes / 5))
    return 50 * (per_step * grad_ms + forward_ms)


def run_case(case: Case, device: torch.device, repeats: int, full: bool, log: Callable[[str], None],
             fold: bool = True) -> list[dict]:
    """Time every method on one case; returns the table rows.

    Large K (case c) without --full: Algorithm 1 and the exact route are estimated from measured unit costs,
    the other routes are timed once on the reference image (the reference run has warmed up jvp and vjp),
    truncated also at batch 2.
    """
    torch.manual_seed(0)
    model = case.build().to(device).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(case.batch, *case.shape, generator=gen).to(device)
    if fold:  # as the registry serves models: eval-mode BatchNorm folded into the convolutions
        fold_batchnorm(model, images[:2])
    one = images[:1]
    err_images = images[: case.error_images]
    log(f"{case.title}: reference ...")
    start = time.perf_counter()
    if case.dense:
        reference, ref_name = dense_top(model, err_images), "dense float64 G_x"
    else:
        reference, ref_name = lanczos_top(model, err_images), "lanczos k=1 tol=1e-8"
    log(f"  reference ({ref_name}) in {time.perf_counter() - start:.1f} s")
    heavy = case.num_classes > 100 and not full
    unit = None
    rows = []
    for method in METHODS:
        kwargs = method_kwargs(method, case)
        row = dict(case=case.title, method=method, k=kwargs["k"], reference=ref_name, note="")
        if heavy and method in ("power", "power-alias", "exact"):
            if unit is None:
                with torch.inference_mode():
                    forward_ms = median_ms(lambda: model(one), repeats, device)
                unit = (class_gradient_ms(model, one, 4, device), forward_ms)
            row["batch1_ms"] = estimate_ms(method, case, *unit)
            row["batched_ms"] = row["rel_err"] = None
            what = {"power": "50 steps x K", "power-alias": "50 steps x K/5", "exact": "K-1"}[method]
            row["note"] = f"estimated: {what} gradients at {unit[0]:.0f} ms each (--full runs it)"
            log(f"  {method:12s} est. {row['batch1_ms']:.0f} ms/image")
            rows.append(row)
            continue
        run = partial(fisher_spectrum, model, method=method, **kwargs)
        timed = 1 if heavy else min(repeats, 2) if method.startswith("power") else repeats  # Alg. 1 is slow
        row["batch1_ms"] = median_ms(partial(run, one), timed, device, warm_up=not heavy)
        row["batch1_cpu"], single_result = CPU_MS[-1], LAST_RESULT[0]
        if method.startswith("power") or (heavy and method == "lanczos"):
            row["batched_ms"] = None  # Algorithm 1 takes one image at a time; Lanczos on K=1000: too slow here
        else:
            batched_ms = median_ms(partial(run, images), max(1, repeats // 2), device, warm_up=not heavy)
            row["batched_ms"], row["batched_cpu"] = batched_ms / case.batch, CPU_MS[-1] / case.batch
        if heavy or method.startswith("power"):  # the timed run on image 0 (Algorithm 1: too slow to repeat)
            spectrum, reference_used = single_result, reference[:1]
        else:
            spectrum, reference_used = fisher_spectrum(model, err_images, method=method, **kwargs), reference
        top = spectrum.eigenvalues[:, 0].cpu()
        row["rel_err"] = float(((top - reference_used).abs() / reference_used).max())
        if method == "truncated":
            row["note"] = f"discarded mass <= {float(spectrum.discarded_mass.max()):.1e}"
        elif method == "lanczos":
            row["note"] = f"tol {case.lanczos_tol:g}, {int(spectrum.iterations.max())} iterations"
            if not bool(torch.isfinite(spectrum.error_bound).all()):
                row["note"] += f" (capped at {case.lanczos_max_iter}, not converged to tol)"
        log(f"  {method:12s} batch 1 {row['batch1_ms']:.2f} ms, batched {fmt_ms(row['batched_ms'])} ms/image, "
            f"rel. err {row['rel_err']:.1e}")
        rows.append(row)
    return rows


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def table(rows: list[dict], cases: dict[str, Case]) -> str:
    """The Markdown table, with the speed-up of each route over Algorithm 1 as written (same case)."""
    lines = [
        "| case | method | k | batch 1 ms/image (CPU ms) | batched ms/image (CPU ms), batch | speed-up vs Alg. 1 "
        "| top eigenvalue rel. err | reference | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    batch_of = {c.title: c.batch for c in cases.values()}
    power_ms = {r["case"]: r["batch1_ms"] for r in rows if r["method"] == "power"}
    for r in rows:
        best = min(v for v in (r["batch1_ms"], r["batched_ms"]) if v is not None)
        speedup = power_ms[r["case"]] / best if r["case"] in power_ms else float("nan")
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        batch1 = fmt_ms(r["batch1_ms"]) + (f" ({fmt_ms(r['batch1_cpu'])})" if "batch1_cpu" in r else "")
        batched = "-"
        if r["batched_ms"] is not None:
            batched = f"{fmt_ms(r['batched_ms'])} ({fmt_ms(r['batched_cpu'])}), {batch_of[r['case']]}"
        lines.append(f"| {r['case']} | {r['method']} | {r['k']} | {batch1} | {batched} | "
                     f"{speedup:,.0f}x | {err} | {r['reference']} | {r['note']} |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    """One line on where the table was measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{name}; torch {torch.__version__}; load average (1/5/15 min) at the end: {load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (1 at batch 1), for a smoke run")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    parser.add_argument("--cases", default="abc", help="which cases to run, e.g. 'ab' (default: abc)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats at batch 1 (batched: half)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--full", action="store_true",
                        help="also run Algorithm 1 on K=1000 (hours on a CPU); by default it is estimated")
    parser.add_argument("--output", type=Path, default=None, help="where to save the table (Markdown)")
    parser.add_argument("--tf32", action="store_true", help="CUDA: keep cuDNN's TF32 convolutions (the service "
                        "turns them off when it loads a model on a GPU: registry.use_full_float32)")
    parser.add_argument("--no-fold", action="store_true", help="keep BatchNorm layers as they are (by default "
                        "they are folded into the convolutions, as `load_model` serves models)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not args.tf32:
        use_full_float32()
    repeats = 1 if args.quick else args.repeats
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"--cases: unknown case(s) {''.join(sorted(unknown))}; choose from {''.join(CASES)}")
    cases = {key: CASES[key] for key in CASES if key in args.cases}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    output = args.output or ROOT / "bench" / "results" / f"spectrum-{device.type}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    command = f"python bench/bench_spectrum.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    rows = []
    for case in cases.values():
        rows += run_case(case, device, repeats, args.full, log, fold=not args.no_fold)
        folding = "kept as built" if args.no_fold else "folded into the convolutions, as `load_model` serves models"
        precision = " cuDNN TF32 convolutions on." if device.type == "cuda" and args.tf32 else ""
        text = (f"{table(rows, cases)}\n\nBatchNorm: {folding}.{precision} Machine: {machine(device)}. Total time "
                f"{time.perf_counter() - started:.0f} s. Command: `{command}`\n")
        output.write_text(text)  # saved after each case, so a long run keeps what it measured
    print(text)
    log(f"saved {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
