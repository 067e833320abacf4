"""The package's module-level imports form no cycle (a cycle makes import order matter: a module that works when
imported after another fails when imported first), and the math packages import no service layer."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "service"
PURE = ("service.fisher", "service.attacks", "service.detect", "service.zoo", "service.data")
LAYERS = ("fastapi", "starlette", "redis", "rq", "service.api", "service.jobs", "service.config")


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """Modules imported when `path` is imported: module-level imports (also inside module-level if/try blocks),
    not those inside functions or classes or under `if TYPE_CHECKING:`. `from package import submodule` is an
    import of the submodule (Python resolves it while the package is still initialising)."""
    found: set[str] = set()
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found |= submodules if len(submodules) == len(node.names) else submodules | {node.module}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SERVICE.rglob("*.py")}
    names = set(modules)
    return {name: {m for m in top_level_imports(path, names) if m in names and m != name}
            for name, path in modules.items()}


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_math_packages_know_nothing_of_http_redis_or_settings() -> None:
    for path in SERVICE.rglob("*.py"):
        name = module_name(path)
        if not name.startswith(PURE):
            continue
        text = path.read_text()
        imported = {node.module or "" for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Import)
                     for alias in node.names}
        bad = {m for m in imported if m.startswith(LAYERS)}
        assert not bad, f"{name} imports {sorted(bad)}"
