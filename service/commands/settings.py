"""`fisher-guard settings`: every setting, its environment variable, default and meaning; or the current values."""

from __future__ import annotations

import argparse
import json
import re


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("settings", help="list the settings (environment variables, defaults, meanings)",
                            description="Print every setting as a Markdown table (docs/settings.md), or the "
                            "values this environment gives them with --current.")
    parser.add_argument("--current", action="store_true", help="print the values in effect here, as JSON "
                        "(API keys are hidden)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from service.config import Settings, settings_markdown  # pydantic-settings: a quarter second, not for --help

    if args.current:
        values = Settings().model_dump(mode="json")
        for secret in ("api_keys", "admin_api_keys"):
            if values.get(secret):
                values[secret] = "***"
        if values.get("redis_url"):  # its password, if it has one
            values["redis_url"] = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", values["redis_url"])
        print(json.dumps(values, indent=2))
    else:
        print(settings_markdown(), end="")
    return 0
