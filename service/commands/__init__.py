"""CLI commands, one module each; every module exposes `register(subparsers)` that sets `handler`."""

from __future__ import annotations

import argparse
import importlib

# module names under service.commands; each adds its own subcommand(s)
COMMAND_MODULES: list[str] = ["settings", "train_model", "jobs", "serve", "detect", "convert_detector", "gate",
                              "export_dataset"]


def register_all(sub: argparse._SubParsersAction) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"service.commands.{name}").register(sub)
