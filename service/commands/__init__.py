"""CLI commands, one module each; every module exposes `register(subparsers)` that sets `handler`.

Registering imports no torch, sklearn or scipy (tests/test_client.py checks it): every `--help` would pay
seconds for them. A parser takes engine names and defaults from their torch-free homes (service.zoo.train_config,
service.detect.defaults); a handler imports the engine it needs when it runs."""

from __future__ import annotations

import argparse
import importlib

# each adds its own subcommand(s); gate lives in the client-only distribution (client/), which this one uses
COMMAND_MODULES: list[str] = ["service.commands.settings", "service.commands.train_model", "service.commands.jobs",
                              "service.commands.serve", "service.commands.detect", "service.commands.evaluate_detector",
                              "service.commands.convert_detector",
                              "fisher_guard_client.gate", "service.commands.export_dataset"]


def register_all(sub: argparse._SubParsersAction) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
