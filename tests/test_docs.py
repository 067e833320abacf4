"""README and docs/ stay honest: links resolve, commands and variables exist, the settings page is generated."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from service.cli import build_parser
from service.config import Settings, env_var, settings_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 8192  # bytes: the README is a front page; the rest lives in docs/
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINKED = [*DOCS, ROOT / "bench" / "README.md", *sorted((ROOT / "bench" / "results").glob("*.md"))]

# FISHER_GUARD_* variables the docs may name that are not settings, each with the file that reads it.
NOT_SETTINGS = {
    "FISHER_GUARD_URL": "client/fisher_guard_client/gate.py",  # gate's --url default
    "FISHER_GUARD_API_KEY": "client/fisher_guard_client/gate.py",  # gate's --api-key default
    "FISHER_GUARD_IMAGE": "docker-compose.yml",  # compose interpolation
    "FISHER_GUARD_PUBLISH_PORT": "docker-compose.yml",
    "FISHER_GUARD_USER_MODELS": "docker-compose.yml",
    "FISHER_GUARD_REDIS_PASSWORD": "docker-compose.yml",
    "FISHER_GUARD_MEM_LIMIT": "docker-compose.yml",
    "FISHER_GUARD_PROMETHEUS_PORT": "docker-compose.yml",
    "FISHER_GUARD_METRICS_KEY_FILE": "docker-compose.yml",
}

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
VARIABLE = re.compile(r"\bFISHER_GUARD_[A-Z0-9_]*[A-Z0-9]")
COMMAND = re.compile(r"\bfisher-guard[ \t]+([a-z][a-z0-9|-]*)((?:[ \t]+[^\s`#;&]+)*)")
SHELL_OPERATORS = {"|", "||", "&&"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without code: fenced blocks and inline spans (a link inside code is not a link)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def code(text: str) -> list[str]:
    """The lines of code: every line of a fenced block, and every inline span."""
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]
    return lines + [span.strip("`") for span in INLINE_CODE.findall(FENCE.sub("", text))]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action is not None else {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_the_pages_exist() -> None:
    for page in ("engine", "detector", "api", "jobs", "settings", "development", "security"):
        assert (ROOT / "docs" / f"{page}.md").is_file(), f"docs/{page}.md is missing"


def test_readme_is_a_front_page() -> None:
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail to docs/"
    assert "settings:begin" not in README.read_text(), "the settings table lives in docs/settings.md"


@pytest.mark.parametrize("page", LINKED, ids=rel)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{rel(page)} links to files that do not exist: {broken}"


@pytest.mark.parametrize("page", DOCS, ids=rel)
def test_every_command_is_a_cli_command(page: Path) -> None:
    """`fisher-guard <command>` in code is a real subcommand (and a sub-subcommand where it has them), and the
    --flags written after it on the same line are its options."""
    commands = subparsers(build_parser())
    problems = []
    for line in code(page.read_text()):
        for match in COMMAND.finditer(line):
            names, rest = match.group(1).split("|"), match.group(2).split()
            rest = rest[:next((i for i, arg in enumerate(rest) if arg in SHELL_OPERATORS), len(rest))]
            for name in names:
                if name not in commands:
                    problems.append(f"`fisher-guard {name}` is not a command (known: {', '.join(commands)})")
                    continue
                parser, args = commands[name], rest
                subs = subparsers(parser)
                if subs and args and not args[0].startswith("-"):
                    for sub in args[0].split("|"):
                        if sub not in subs:
                            problems.append(f"`fisher-guard {name} {sub}` is not a command "
                                            f"(known: {', '.join(subs)})")
                    if len(args[0].split("|")) > 1:
                        continue
                    parser, args = subs.get(args[0], parser), args[1:]
                known = options(parser)
                for arg in args:
                    flag = arg.split("=", 1)[0]
                    if flag.startswith("--") and flag != "--" and flag not in known:
                        problems.append(f"`fisher-guard {name}` has no option {flag} (line: {line.strip()!r})")
    assert not problems, f"{rel(page)}: " + "; ".join(problems)


@pytest.mark.parametrize("page", DOCS, ids=rel)
def test_every_variable_is_a_setting(page: Path) -> None:
    settings = {env_var(name) for name in Settings.model_fields}
    unknown = sorted(set(VARIABLE.findall(page.read_text())) - settings - set(NOT_SETTINGS))
    assert not unknown, (f"{rel(page)} names {unknown}, which are not settings (service/config.py); "
                         "a variable that is read elsewhere goes into NOT_SETTINGS with the file that reads it")


def test_the_allowed_variables_are_real_and_not_settings() -> None:
    settings = {env_var(name) for name in Settings.model_fields}
    for variable, source in NOT_SETTINGS.items():
        assert variable not in settings, f"{variable} is a setting now: drop it from NOT_SETTINGS"
        assert re.search(rf"\b{variable}\b", (ROOT / source).read_text()), f"{source} does not read {variable}"


def test_settings_page_is_the_generated_table() -> None:
    page = (ROOT / "docs" / "settings.md").read_text()
    block = re.search(r"<!-- settings:begin -->\n(.*?)<!-- settings:end -->", page, re.S)
    assert block, "docs/settings.md needs the generated table between settings:begin/end markers"
    assert block.group(1) == settings_markdown(), "docs/settings.md is stale: paste `fisher-guard settings` there"
