"""`fisher-guard gate` (`fisher-guard-gate` where only this client is installed): screen a folder of images (or an
.npz / .npy) through a running server and exit non-zero when adversarial inputs are found: a CI step or a data
pipeline's gate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fisher_guard_client.console import run_handler

if TYPE_CHECKING:
    import numpy as np

EXIT_CLEAN, EXIT_ADVERSARIAL, EXIT_ERROR = 0, 1, 2
HELP = "screen files through a running server; exit 1 when adversarial inputs are found"
DESCRIPTION = ("Screen a folder of images (PNG/JPEG/.npy), single files, or an .npz/.npy batch through a running "
               "fisher-guard server. Prints a summary (or JSON) and exits 0 when at most --max-adversarial inputs "
               "are flagged, 1 when more are, 2 on errors (server unreachable, bad input), and 141 (128 + SIGPIPE) "
               "without a word when the reader of its output leaves early (`| head`).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """gate's options, shared by `fisher-guard gate` and `fisher-guard-gate`."""
    parser.add_argument("paths", nargs="+", type=Path, help="folders, image files, .npy or .npz files")
    parser.add_argument("--url", default=os.environ.get("FISHER_GUARD_URL", "http://127.0.0.1:8000"),
                        help="server address (env FISHER_GUARD_URL)")
    parser.add_argument("--api-key", default=os.environ.get("FISHER_GUARD_API_KEY"),
                        help="API key (env FISHER_GUARD_API_KEY)")
    parser.add_argument("--model", default="lenet5", help="model to screen with")
    parser.add_argument("--threshold", type=float, default=None,
                        help="verdict threshold on the score (default: the detector's)")
    parser.add_argument("--max-adversarial", type=int, default=0,
                        help="how many flagged inputs are tolerated before failing (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per request")
    parser.add_argument("--json", action="store_true", help="print the per-input results as JSON")
    parser.set_defaults(handler=run)


def register(sub: argparse._SubParsersAction) -> None:
    """`gate` as a subcommand of the main CLI (service.cli)."""
    add_arguments(sub.add_parser("gate", help=HELP, description=DESCRIPTION))


def build_parser() -> argparse.ArgumentParser:
    """The client-only install's own command, `fisher-guard-gate`."""
    parser = argparse.ArgumentParser(prog="fisher-guard-gate", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_handler(run, build_parser().parse_args(argv))


def load_array(path: Path) -> np.ndarray:
    from fisher_guard_client.client import numpy_module

    return numpy_module(f"{path}: reading .npy").load(path, allow_pickle=False)


def collect(paths: list[Path]) -> tuple[list[Path], list[tuple[str, np.ndarray]]]:
    """Image files to upload, and arrays (name, (N, C, H, W)) from .npz / .npy batches."""
    from fisher_guard_client.client import FILE_TYPES, numpy_module

    files: list[Path] = []
    arrays: list[tuple[str, np.ndarray]] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_TYPES and p.suffix != ".npy")
            arrays += [(str(p), load_array(p)) for p in sorted(path.rglob("*.npy"))]
        elif path.suffix.lower() == ".npz":
            with numpy_module(f"{path}: reading .npz").load(path, allow_pickle=False) as data:
                key = "images" if "images" in data.files else data.files[0]
                arrays.append((f"{path}:{key}", data[key]))
        elif path.suffix.lower() == ".npy":
            arrays.append((str(path), load_array(path)))
        else:
            files.append(path)
    return files, arrays


def run(args: argparse.Namespace) -> int:
    import httpx  # here, not at the top: the parser (every --help) does without it

    from fisher_guard_client.client import FisherGuardClient, FisherGuardError

    try:
        files, arrays = collect(args.paths)
        if not files and not arrays:
            raise ValueError("no images found in the given paths")
        rows: list[dict] = []
        with FisherGuardClient(args.url, args.api_key, batch_size=args.batch_size) as client:
            if files:
                answer = client.screen_files(args.model, files, args.threshold)
                rows += [{"input": str(f), **r} for f, r in zip(files, answer["results"], strict=True)]
            for name, array in arrays:
                batch = array if array.ndim == 4 else array[None]
                answer = client.screen(args.model, batch, args.threshold)
                rows += [{"input": f"{name}[{i}]", **r} for i, r in enumerate(answer["results"])]
    except (FisherGuardError, OSError, ValueError, ImportError) as exc:
        print(f"fisher-guard gate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except httpx.HTTPError as exc:  # transport errors: the server is unreachable or too slow
        print(f"fisher-guard gate: cannot reach {args.url}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    flagged = [r for r in rows if r["adversarial"]]
    if args.json:
        print(json.dumps({"screened": len(rows), "adversarial": len(flagged), "results": rows}, indent=2))
    else:
        print(f"screened {len(rows)} inputs with {args.model}: {len(flagged)} adversarial")
        for r in flagged:
            print(f"  ADVERSARIAL {r['input']}  score={r['score']:.3f}  prediction={r['prediction']}")
    return EXIT_ADVERSARIAL if len(flagged) > args.max_adversarial else EXIT_CLEAN
