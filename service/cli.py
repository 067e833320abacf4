"""fisher-guard's one entry point: `fisher-guard <command> --help` explains each command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import MutableMapping

from fisher_guard_client.console import Handler, run_handler

# Iterations an idle OpenMP worker thread spins before it sleeps (libgomp's default: 300000, up to about a
# millisecond of a core after every parallel region). The API's model thread runs batches on 2 torch threads; the
# spinning worker took ~75% of a core from the event loop on a 2-core machine, and 10000 raised micro-batched
# throughput at concurrency 32 by ~6-10% (docs/decisions/gomp-spincount.md; 1000, 3000, 30000 and 100000 did
# less) and cost 64-image requests at concurrency 4 ~6%.
OPENMP_SPIN_COUNT = "10000"


def configure_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set GOMP_SPINCOUNT unless the user chose OpenMP's waiting already; libgomp reads it once, when torch
    loads, so this runs before any command imports torch (child processes inherit it)."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisher-guard",
        description="Screen images for adversarial attacks with the Fisher information of the input "
        "(Zhao et al., AAAI 2019): spectra, attacks, detectors, the HTTP service and its workers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    from service.commands import register_all

    register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status, or 141 without a traceback when its output's reader has gone
    (`fisher-guard gate --json | head`: fisher_guard_client.console)."""
    configure_openmp()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return run_handler(handler, args)


if __name__ == "__main__":
    sys.exit(main())
