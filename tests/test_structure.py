"""Structure rules a reviewer would otherwise check by hand: import graph, layering, what docstrings cite."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Installed module name -> source file (``kernels/`` installs as ``lightning_peft.kernels``)."""
    mods = {}
    for p in sorted((ROOT / "lightning_peft").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["lightning_peft", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _module_level_imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """lightning_peft modules ``path`` imports when it is imported (not inside functions or TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {t for t in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if t in mods}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
    return found


def test_the_module_level_import_graph_has_no_cycles() -> None:
    mods = _modules()
    graph = {m: _module_level_imports(p, mods) - {m} for m, p in mods.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError(" -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_library_code_never_imports_the_cli() -> None:
    mods = _modules()
    offenders = []
    for m, p in mods.items():
        if m.startswith("lightning_peft.cli"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{m} imports {n}" for n in names if n.startswith("lightning_peft.cli")]
    assert not offenders, offenders


def test_package_docs_cite_papers_not_files_users_do_not_have() -> None:
    pattern = re.compile(r"methods\.md|integration\.md|style\.md|shared/reference")
    shipped = [p for d in ("lightning_peft", "kernels", "conf") for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in shipped for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, f"cite the paper and section or the upstream source instead: {hits}"
