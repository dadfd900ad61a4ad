"""The import graph of megajepa: no cycles (function-level imports included), one way through data/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megajepa"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the megajepa modules it imports anywhere in its body."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


# folder -> the folders it may import (README.md, "Layout of the code"); "megajepa" is the top level
ALLOWED = {
    "megajepa.data": {"megajepa", "megajepa.config", "megajepa.files"},
    "megajepa.model": {"megajepa", "megajepa.config", "megajepa.dist"},
    "megajepa.jepa": {
        "megajepa", "megajepa.config", "megajepa.files", "megajepa.dist", "megajepa.model", "megajepa.kernels",
    },
    "megajepa.kernels": set(),
    "megajepa.train": {
        "megajepa", "megajepa.config", "megajepa.files", "megajepa.dist", "megajepa.data", "megajepa.model",
        "megajepa.jepa",
    },
}


# Known exceptions, each to be removed when fixed (README.md names them too).
EXCEPTIONS: set[tuple[str, str]] = set()


def folder(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else parts[0]


def test_folders_import_only_what_the_readme_allows():
    wrong = []
    for module, targets in import_graph().items():
        allowed = ALLOWED.get(folder(module))
        if allowed is None:
            continue
        for target in targets:
            into = target if target in ("megajepa.config", "megajepa.files", "megajepa.dist") else folder(target)
            if into != folder(module) and into not in allowed and (module, target) not in EXCEPTIONS:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_transformers_imports_from_the_repository_root():
    """transformers 5 imports Hugging Face's `kernels` distribution at import time; a top-level
    package of that name (on sys.path from the repository root, or installed over it) breaks it."""
    import subprocess
    import sys

    code = "import transformers.integrations.hub_kernels, megajepa.kernels.ema"
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
