"""Benchmark of screening for the user's own model: three models that are not the bundled MNIST ones, each taken
through the CLI as a user would (export the data, train the model, train the detector), then its screening cost.

- (a) sklearn's 8x8 digits, `small-cnn` (1x8x8, K = 10);
- (b) the RGB digits at 3x32x32 (sklearn's digits upscaled and colourised), torchvision ResNet-18 (K = 10);
- (c) a 1000-class torchvision MobileNetV3-small at 3x224x224 with random weights (nothing can be downloaded
  here; see `random_imagenet_model`): its 64 images are the RGB digits at 224x224 labelled by the model's own
  predictions, so that every image counts as correctly classified; FGM and OSSA only; its features take the
  truncated spectrum route (bounded cost).

For (a) and (b) the data is split once, 60% for the model (its own train / val / test inside `train-model`) and
40% held out for the detector (`train-detector --fit` with a 40% test part; for (b) its first 240 images and
C&W at 50 steps, for time). Per model the table gives the
model's training time, the detector's training time, the screening cost per image at batch 1 and batched (the
path the API and the workers share, `service.serving.screen`, medians after a warm-up) against the model's own
forward pass, and the detector card's held-out AUC, TPR and clean FPR.

    .venv/bin/python bench/bench_byom.py                 # all three (about 20 minutes on 2 CPU cores)
    .venv/bin/python bench/bench_byom.py --cases a --work /tmp/byom
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLI = [sys.executable, "-m", "service.cli"]


def run(args: list[str], env: dict[str, str], log) -> tuple[float, str]:
    """Run a CLI command (printed as `fisher-guard ...`); seconds taken and its stdout."""
    shown = "fisher-guard " + shlex.join(args)
    log(f"$ {shown}")
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shown} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def split_for_detector(data_path: Path, work: Path) -> tuple[Path, Path]:
    """60% of a labelled .npz for the model, 40% held out for the detector (stratified, seed 0)."""
    from service.data.datasets import DatasetLimits, read_labelled, split
    from service.data.sources import write_npz

    data = read_labelled(data_path, name=data_path.name, shape=None, num_classes=None, limits=DatasetLimits())
    model_part, detector_part = split(data, 0.4, 0)
    write_npz(model_part, work / "model-data.npz")
    write_npz(detector_part, work / "detector-data.npz")
    return work / "model-data.npz", work / "detector-data.npz"


IMAGENET_IMAGES = 64
LOGIT_SCALE = 1000.0  # a random net's outputs are uniform (p ~ 1/K); scaled, they spread like a trained model's


def random_imagenet_model(work: Path, models: Path, size: int) -> Path:
    """A random-weight 1000-class MobileNetV3-small (seed 0) with a card, and RGB digits at `size` labelled by it.
    Its BatchNorm statistics are those of the images (one pass in train mode), and its last layer is scaled by
    LOGIT_SCALE: then its top-20 classes hold ~80% of the probability, as a trained model's might."""
    import torchvision

    from service.data.sources import rgb_digits, write_npz
    from service.zoo.cards import ModelCard
    from service.zoo.registry import load_model, sha256_file

    torch.manual_seed(0)
    data = rgb_digits(size=size, seed=0).subset(list(range(IMAGENET_IMAGES)))
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=1000)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the one pass
    net.train()
    with torch.no_grad():
        net((torch.from_numpy(data.images) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        net.classifier[-1].weight.mul_(LOGIT_SCALE)
    net.eval()
    weights = models / "mobilenet-random.pt"
    torch.save(net.state_dict(), weights)
    ModelCard(name="mobilenet-random", framework="torchvision", architecture="mobilenet_v3_small",
              weights=weights.name, sha256=sha256_file(weights), input_shape=[3, size, size], mean=mean, std=std,
              class_names=[f"class {i}" for i in range(1000)], num_classes=1000,
              notes=f"random weights (seed 0), BatchNorm statistics of the benchmark's images, last layer x"
                    f"{LOGIT_SCALE:g}: a stand-in for an ImageNet model, for cost",
              ).write(models / "mobilenet-random.json")
    model = load_model("mobilenet-random", device="cpu", folders=[models]).module
    with torch.no_grad():
        data.labels = torch.cat([model(torch.from_numpy(data.images[i:i + 32])).argmax(-1)
                                 for i in range(0, len(data), 32)]).numpy()
    path = work / "imagenet-like.npz"
    write_npz(data, path)
    return path


def screening_cost(name: str, models: Path, batch: int, repeats: int) -> dict[str, float]:
    """ms per image of `service.serving.screen` and of the plain forward, at batch 1 and at `batch`."""
    from service import serving

    bundle = serving.load_bundle(name, "cpu", [models])
    assert bundle.detector is not None, bundle.detector_error
    shape = bundle.shape
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    out = {}
    work = {"screen": lambda v: serving.screen(bundle, v), "forward": lambda v: serving.logits(bundle, v)}
    for label, fn in work.items():
        for size in (1, batch):
            v = x[:size]
            fn(v)  # warm-up
            times = []
            for _ in range(repeats if size == 1 else max(2, repeats // 2)):
                start = time.perf_counter()
                fn(v)
                times.append((time.perf_counter() - start) * 1000 / size)
            out[f"{label}_{size if size == 1 else 'batched'}"] = statistics.median(times)
    return out


def case_digits(work: Path, env: dict, log, rgb: bool) -> dict:
    key = "rgb" if rgb else "digits"
    source = ["rgb-digits", "--size", "32"] if rgb else ["sklearn-digits"]
    data = work / f"{key}.npz"
    run(["export-dataset", *source, "--out", str(data)], env, log)
    model_data, detector_data = split_for_detector(data, work)
    name = "rgb-resnet18" if rgb else "digits-cnn"
    arch = ["--architecture", "torchvision:resnet18", "--epochs", "10", "--batch-size", "32"] if rgb else \
        ["--architecture", "small-cnn", "--epochs", "30"]
    model_s, _ = run(["train-model", "--dataset", str(model_data), *arch, "--name", name, "--out",
                      str(env["FISHER_GUARD_MODELS_DIR"]), "--threads", "2"], env, log)
    size = ["--images", "240", "--opt-steps", "50"] if rgb else []  # ResNet-18: a smaller set, for time
    detector_s, out = run(["train-detector", "--model", name, "--fit", str(detector_data), "--test-fraction", "0.4",
                           *size, "--activate", "--threads", "2"], env, log)
    return {"name": name, "model_s": model_s, "detector_s": detector_s, "batch": 64, "log": out}


def case_imagenet(work: Path, env: dict, log) -> dict:
    models = Path(env["FISHER_GUARD_MODELS_DIR"])
    data = random_imagenet_model(work, models, 224)
    detector_s, out = run(["train-detector", "--model", "mobilenet-random", "--fit", str(data), "--test-fraction",
                           "0.4", "--attacks", "fgm,ossa", "--activate", "--threads", "2"], env, log)
    return {"name": "mobilenet-random", "model_s": None, "detector_s": detector_s, "batch": 16, "log": out}


TITLES = {"a": "(a) sklearn digits 1x8x8, small-cnn, K=10", "b": "(b) RGB digits 3x32x32, ResNet-18, K=10",
          "c": "(c) 3x224x224, MobileNetV3-small (random weights), K=1000"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="abc")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fisher-guard-byom"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "byom-cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    models = args.work / "models"
    models.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FISHER_GUARD_MODELS_DIR": str(models), "PYTHONPATH": str(ROOT)}
    rows = []
    for key in args.cases:
        result = case_imagenet(args.work, env, log) if key == "c" else case_digits(args.work, env, log, key == "b")
        cost = screening_cost(result["name"], models, result["batch"], args.repeats)
        card = json.loads((models / f"{result['name']}.detector.json").read_text())
        rows.append((key, result, cost, card))
        log(f"{TITLES[key]}: {cost}")
    lines = ["| model | train model (s) | train detector (s) | feature set (route) | screen ms/img, batch 1 | "
             "screen ms/img, batched | forward ms/img, batch 1 / batched | screen / forward, batched | "
             "test AUC | TPR | clean FPR |", "|" + "---|" * 11]
    rows.sort(key=lambda row: row[0])
    for key, result, cost, card in rows:
        test = card["test"]
        route = card["features"]["spectrum"]
        route_text = route["method"] + (f", {route['max_classes']} classes" if route.get("max_classes") else "")
        model_s = "-" if result["model_s"] is None else f"{result['model_s']:.0f}"
        lines.append(
            f"| {TITLES[key]} | {model_s} | {result['detector_s']:.0f} | {card['features']['feature_set']} "
            f"({route_text}) | {cost['screen_1']:.1f} | {cost['screen_batched']:.2f} (batch {result['batch']}) | "
            f"{cost['forward_1']:.2f} / {cost['forward_batched']:.3f} | "
            f"{cost['screen_batched'] / cost['forward_batched']:.0f}x | {100 * test['auc']:.2f} | "
            f"{100 * test['tpr']:.1f}% | {100 * test['clean_fpr']:.1f}% |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    details = []
    for key, _result, _cost, card in rows:
        sel = card.get("feature_selection") or {}
        budgets = ", ".join(f"{a} {b['chosen']:.3g}" for a, b in card["budgets"].items())
        aucs = ", ".join(f"{n} {100 * v:.2f}" for n, v in (sel.get("candidates") or {}).items())
        details.append(f"- {TITLES[key]}: budgets (L2) {budgets}; out-of-fold AUC of the candidates: {aucs}; "
                       f"spectrum route: {json.dumps(card['features']['spectrum'])}")
    command = "python bench/bench_byom.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = ("\n".join(lines) + "\n\n" + "\n".join(details) + "\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, 2 threads; load average (1/5/15 min) at the end: {load}; commit {commit}. "
            f"Command: `{command}`\n")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    log(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
