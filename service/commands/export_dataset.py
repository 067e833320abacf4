"""`fisher-guard export-dataset`: write a dataset the package ships (sklearn's digits, their RGB version, an MNIST
split) as an .npz, a folder of class folders or a zip of one, the formats `--dataset` / `--fit` and job uploads
read (service/data/datasets.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DATASETS = ("sklearn-digits", "rgb-digits", "mnist-train", "mnist-val", "mnist-test")
FORMATS = ("npz", "folder", "zip")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-dataset", help="write a bundled labelled dataset as .npz, a folder of class "
                       "folders or a zip of one",
                       description="Write sklearn's 8x8 digits (1x8x8), rgb-digits (the same digits upscaled and "
                       "colourised: 3 x SIZE x SIZE) or an MNIST split (1x28x28) as an .npz (images float32, labels "
                       "int64, class_names), a folder <class>/<index>.png (8-bit PNG) or a zip of that folder.")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--out", type=Path, required=True, help="file or folder to write")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="default: from --out (.npz, .zip; anything else is a folder)")
    p.add_argument("--size", type=int, default=None, help="rgb-digits: side of the images (default 32)")
    p.add_argument("--seed", type=int, default=None, help="rgb-digits: seed of the colours (default 0)")
    p.set_defaults(handler=export_dataset_command)


def export_dataset_command(args: argparse.Namespace) -> int:
    from service.data import sources

    fmt = args.format or {".npz": "npz", ".zip": "zip"}.get(args.out.suffix.lower(), "folder")
    if args.dataset != "rgb-digits" and (args.size is not None or args.seed is not None):
        print("export-dataset: --size and --seed are for rgb-digits", file=sys.stderr)
        return 2
    try:
        if args.dataset == "sklearn-digits":
            data = sources.sklearn_digits()
        elif args.dataset == "rgb-digits":
            data = sources.rgb_digits(32 if args.size is None else args.size, 0 if args.seed is None else args.seed)
        else:
            data = sources.mnist(args.dataset.removeprefix("mnist-"))
        writer = {"npz": sources.write_npz, "folder": sources.write_image_folder, "zip": sources.write_zip}[fmt]
        path = writer(data, args.out)
    except (ValueError, OSError) as exc:
        print(f"export-dataset: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({fmt}): {data.source}")
    return 0
