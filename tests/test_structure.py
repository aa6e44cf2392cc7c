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


# Low to high. A module may import from its own layer and from the layers below it, never from one above; a
# module belongs to the layer of the longest prefix that names it. Function-level imports count (they run too);
# imports under `if TYPE_CHECKING:` do not (they never run).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation: files, tensors, settings", (
        "lightning_peft._deprecated", "lightning_peft.adapter_folder", "lightning_peft.atomic", "lightning_peft.budget",
        "lightning_peft.config", "lightning_peft.data", "lightning_peft.deltas", "lightning_peft.ffn_sites",
        "lightning_peft.kernels", "lightning_peft.metrics", "lightning_peft.optim", "lightning_peft.resume",
        "lightning_peft.targeting", "lightning_peft.wheels", "lightning_peft.zoo")),
    ("adapter core: registry, callback, checkpoints, folders, bank", (
        "lightning_peft.adapter_io", "lightning_peft.bank", "lightning_peft.callback", "lightning_peft.checkpointing",
        "lightning_peft.fingerprint", "lightning_peft.mixed_batch", "lightning_peft.registry")),
    ("adapter methods", ("lightning_peft.methods", "lightning_peft.peft_compat")),
    ("strategies", ("lightning_peft.plugins",)),
    ("training: tasks, module, regularisers, model loading", (
        "lightning_peft.model_loader", "lightning_peft.module", "lightning_peft.tasks", "lightning_peft.trans_peft")),
    ("drift analysis", ("lightning_peft.analysis",)),
    ("Trans-LoRA transfer", ("lightning_peft.transfer",)),
    ("fleet upgrade", ("lightning_peft.upgrade",)),
    ("public API and the deprecated aliases of moved modules", (
        "lightning_peft", "lightning_peft.evolve", "lightning_peft.methods.trans_peft")),
    ("commands", ("lightning_peft.cli",)),
)
LONG_FUNCTION_PACKAGES = ("upgrade", "transfer", "cli")  # the side that changes most: functions read at a glance
MAX_FUNCTION_LINES = 60


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree``, function bodies included, except what stands under ``if TYPE_CHECKING:``."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(name: str, path: Path, mods: dict[str, Path], function_level: bool = True) -> set[str]:
    """lightning_peft modules ``name`` imports: at module level, and (``function_level``) inside functions too.

    ``from lightning_peft import zoo`` imports ``lightning_peft.zoo``; ``from lightning_peft import LoRA`` the package.
    """
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(tree) if function_level else tree.body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .builder import ...
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & mods.keys()
            found |= subs | ({base} if base in mods and len(subs) < len(node.names) else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
    return found - {name}


def _graph(function_level: bool = True) -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods, function_level) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``a -> b -> a``), or ``None``."""
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> list[str] | None:
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return None
        for n in sorted(graph.get(m, ())):
            found = visit(n, [*path, m])
            if found:
                return found
        done.add(m)
        return None

    return next((c for c in (visit(m, []) for m in sorted(graph)) if c), None)


def _layer(module: str) -> int:
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of LAYERS; add it to the layer it belongs to"
    return max(matches)[1]


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """``"a (layer) imports b (higher layer)"`` for every import that points up."""
    return [f"{m} ({LAYERS[_layer(m)][0]}) imports {n} ({LAYERS[_layer(n)][0]})"
            for m in sorted(graph) for n in sorted(graph[m]) if _layer(n) > _layer(m)]


def test_the_module_level_import_graph_has_no_cycles() -> None:
    cycle = _cycle(_graph(function_level=False))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_import_graph_has_no_cycles_counting_function_level_imports() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle (function-level imports count): " + " -> ".join(cycle or [])


def test_imports_point_down_the_layers_counting_function_level_imports() -> None:
    upward = _upward(_graph())
    assert not upward, "imports that point up the layers (see LAYERS):\n" + "\n".join(upward)


def test_the_graph_checks_can_fail() -> None:
    """A deliberately bad graph: the checks above see an upward import and the circle it closes."""
    graph = _graph()
    graph["lightning_peft.callback"] = graph["lightning_peft.callback"] | {"lightning_peft.upgrade.fleet"}
    assert _upward(graph) == ["lightning_peft.callback (adapter core: registry, callback, checkpoints, folders, bank) "
                              "imports lightning_peft.upgrade.fleet (fleet upgrade)"]
    assert _cycle(graph) is not None
    mods = _modules()
    assert "lightning_peft.zoo.builder" in _imports("lightning_peft.zoo", mods["lightning_peft.zoo"], mods)  # `from .builder`


def test_functions_of_upgrade_transfer_and_cli_are_short() -> None:
    long = []
    for package in LONG_FUNCTION_PACKAGES:
        for path in sorted((ROOT / "lightning_peft" / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstring included); split them: {long}"


def test_only_the_adapter_folder_spells_the_names_of_its_files() -> None:
    """Code outside ``adapter_folder.py`` names no file of an adapter folder (docstrings may describe them)."""
    names = re.compile(r"adapter_config\.json|adapter_model|upgrade\.json|-discriminator|^discriminator/?$")
    hits = []
    for module, path in _modules().items():
        if module == "lightning_peft.adapter_folder":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        hits += [f"{path.relative_to(ROOT)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and names.search(n.value)]
    assert not hits, f"ask lightning_peft.adapter_folder.AdapterFolder instead: {hits}"


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
