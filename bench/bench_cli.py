"""How long `fisher-guard <command> --help` takes, and which engine modules it loads: every command of the CLI,
`fisher-guard-gate --help` (the client-only install's command) and `import torch` for scale. Each row runs a fresh
interpreter `--repeats` times (wall clock, median and min; the first run also warms the file cache).

    .venv/bin/python bench/bench_cli.py                       # this tree; saves bench/results/cli-cpu.md
    .venv/bin/python bench/bench_cli.py --tree /tmp/fg-head   # another checkout, e.g. `git archive HEAD | tar -x`

The suite checks the same property without timing it: tests/test_client.py::test_parsers_import_no_engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ("torch", "torchvision", "sklearn", "scipy", "numpy")

# the command's subcommand names, from its own parser (so the rows follow the tree that is measured)
LIST_COMMANDS = ("from service.cli import build_parser\n"
                 "parser = build_parser()\n"
                 "action = next(a for a in parser._actions if hasattr(a, 'choices') and a.choices)\n"
                 "print('\\n'.join(action.choices))\n")
# runs a module as `python -m` would and reports which engine packages it loaded
ENGINE_LOADED = ("import json, runpy, sys\n"
                 "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
                 "try:\n"
                 "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
                 "except SystemExit:\n"
                 "    pass\n"
                 f"print(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}} & set({ENGINE!r}))), "
                 "file=sys.stderr)\n")


def seconds(command: list[str], cwd: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return times


def engine_loaded(module: str, args: list[str], cwd: Path) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", ENGINE_LOADED, module, *args], cwd=cwd, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stderr.strip().splitlines()[-1])


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def commit(tree: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    if tree != ROOT:
        return f"{head.strip()} (tree {tree})"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return head.strip() + (" + uncommitted changes" if dirty.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose CLI is measured (default: this one)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per row")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write (default: bench/results/cli-cpu.md for this tree, none else)")
    args = parser.parse_args()
    tree = args.tree.resolve()
    commands = subprocess.run([sys.executable, "-c", LIST_COMMANDS], cwd=tree, capture_output=True, text=True,
                              check=True).stdout.split()
    # (label, module run with -m, its arguments)
    rows = [(" ".join(["fisher-guard", *words, "--help"]), "service.cli", [*words, "--help"])
            for words in [[], *([name] for name in commands)]]
    if (tree / "client" / "fisher_guard_client").is_dir():
        rows.append(("fisher-guard-gate --help", "fisher_guard_client", ["--help"]))
    lines = ["| command | median s | min s | engine modules loaded |", "|---|---|---|---|"]
    for label, module, module_args in rows:
        times = seconds([sys.executable, "-m", module, *module_args], tree, args.repeats)
        loaded = ", ".join(engine_loaded(module, module_args, tree)) or "none"
        lines.append(f"| `{label}` | {statistics.median(times):.2f} | {min(times):.2f} | {loaded} |")
        print(lines[-1], flush=True)
    times = seconds([sys.executable, "-c", "import torch"], tree, args.repeats)
    lines.append(f"| `python -c 'import torch'` (for scale) | {statistics.median(times):.2f} | {min(times):.2f} | "
                 "torch, numpy |")
    print(lines[-1])
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    footer = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
              f"{version('torch')}, httpx {version('httpx')}; {args.repeats} runs per row; load average (1/5/15 min) "
              f"at the end: {load}; commit {commit(tree)}. Command: "
              f"`{' '.join(['python', 'bench/bench_cli.py', *sys.argv[1:]])}`")
    report = "# CLI start-up: `--help` of every command\n\n" + "\n".join(lines) + "\n\n" + footer + "\n"
    print("\n" + footer)
    out = args.out or (ROOT / "bench" / "results" / "cli-cpu.md" if tree == ROOT else None)
    if out is not None:
        out.write_text(report)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
