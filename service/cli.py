"""fisher-guard's one entry point: `fisher-guard <command> --help` explains each command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


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
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
