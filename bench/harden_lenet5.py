"""Hardening experiment on the validation split only: fit the paper's detector on mnist:val[:FIT] and harden it
(service.detect.hardening), save both, and write val[FIT:] as the selection images (evaluate-detector --test).

    .venv/bin/python bench/harden_lenet5.py --fit 700 --rounds 2 --out /tmp/harden
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from service.data.mnist import load_mnist
from service.detect.detector import train_detector
from service.detect.files import save_detector
from service.detect.hardening import Hardening, harden_detector
from service.zoo.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images-per-round", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/harden"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("lenet5", device="cpu")
    x, y = load_mnist("val")
    fit_x, fit_y = x[:args.fit], y[:args.fit]
    for name, part in (("fit", slice(0, args.fit)), ("select", slice(args.fit, None))):
        np.savez(args.out / f"val-{name}.npz", images=x[part].numpy(), labels=y[part].numpy())
    start = time.perf_counter()
    run = train_detector(loaded.module, model_name=loaded.name, model_sha256=loaded.sha256, fit_images=fit_x,
                         fit_labels=fit_y, command=f"bench/harden_lenet5.py --fit {args.fit}",
                         data_description=f"mnist:val[:{args.fit}]", progress=True)
    print(f"base trained in {time.perf_counter() - start:.0f} s", flush=True)
    save_detector(copy.deepcopy(run.detector), args.out / "base.detector.npz")
    hardened = harden_detector(loaded.module, run, fit_x, fit_y,
                               Hardening(rounds=args.rounds, images_per_round=args.images_per_round),
                               progress=True)
    print(f"hardened in {time.perf_counter() - start:.0f} s", flush=True)
    save_detector(hardened.detector, args.out / "hardened.detector.npz")


if __name__ == "__main__":
    main()
