"""`fisher-guard convert-detector`: a legacy pickled detector (`.joblib`, format 1) rewritten in the pickle-free
format (`.npz` of arrays + the JSON card that records its sha256)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-detector", help="rewrite a legacy pickled detector (.joblib) as .npz + card; "
                       "run it only on files you trust",
                       description="Load a detector in the legacy pickled format (`<model>.detector.joblib`) and "
                       "write it as `.npz` (numeric arrays only) and its JSON card (metrics and provenance kept, "
                       "plus the .npz's sha256). Unpickling runs whatever code the file holds: run this only on "
                       "files you trust; naming the file here is the opt-in.")
    p.add_argument("path", type=Path, help="the legacy .joblib detector")
    p.add_argument("--out", type=Path, default=None,
                   help="the .npz to write (default: PATH with .npz); the card goes next to it as .json")
    p.set_defaults(handler=convert_detector_command)


def convert_detector_command(args: argparse.Namespace) -> int:
    import numpy as np

    from service.detect.files import load_detector, load_legacy_detector, save_detector

    out = args.out or args.path.with_suffix(".npz")
    try:
        legacy = load_legacy_detector(args.path)
        path, card = save_detector(legacy, out)
        converted = load_detector(path, legacy.model_sha256)
    except ValueError as exc:  # DetectorLoadError included
        print(f"convert-detector: {exc}", file=sys.stderr)
        return 1
    before, after = legacy.classifier.to_arrays(), converted.classifier.to_arrays()
    if before.keys() != after.keys() or not all(np.array_equal(before[k], after[k]) for k in before):
        print(f"convert-detector: {path} does not read back to the same arrays", file=sys.stderr)
        return 1
    print(f"wrote {path} and {card} ({converted.classifier.kind}, same arrays as {args.path})")
    return 0
