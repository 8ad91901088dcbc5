"""Layers: pcbench's import graph has no cycle (function-level imports included), and the
light modules (spec, grid, store, report) import neither torch nor transformers."""

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pcbench"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(base: str, modules: Set[str]) -> Optional[str]:
    """The pcbench module `base` names (itself, else its longest existing parent)."""
    while base:
        if base in modules:
            return base
        base = base.rpartition(".")[0]
    return None


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the pcbench modules it imports anywhere in its source (any scope).

    `from pcbench import x` and `from pcbench.x import y` resolve to the module x (or x.y when
    y is a submodule); relative imports are resolved against the importing module."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_resolves_imports():
    graph = import_graph()
    assert "pcbench.store" in graph and "pcbench.cli" in graph
    # the CLI reaches the launcher; the launcher reaches the grid
    assert "pcbench.launch" in graph["pcbench.cli"]
    assert "pcbench.grid" in graph["pcbench.launch"]


def test_find_cycle_detects_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


LIGHT = ["pcbench.config", "pcbench.grid", "pcbench.store", "pcbench.report"]
HEAVY = ["torch", "transformers", "lm_eval", "submitit"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_import_torch(module):
    code = (f"import sys, json, {module}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [], f"importing {module} imports {heavy}"


def test_param_count_without_torch_equals_the_model():
    """The grid's `params` template (tokens per parameter) counts from presets without torch; it
    must equal the built model's count for every preset and size override."""
    from pcbench import models, presets
    from pcbench.config import ModelSpec

    for name, p in presets.PRESETS.items():
        if p.weights == "path":
            continue  # sizes come from the checkpoint
        for over in ({}, {"kv_heads": 1, "d_ff": 96}, {"layers": 3, "head_dim": 8}):
            spec = ModelSpec(name=name, **over)
            for vocab in (512, 50257):
                want = models.count_params(models.build_config(spec, vocab, 64))["total"]
                assert presets.param_count(presets.resolved_preset(spec), vocab) == want, (name, over, vocab)


def test_parse_ref():
    from pcbench.store import is_ref, parse_ref

    assert parse_ref("run:base-0123") == "base-0123"
    assert parse_ref("/models/run:x") is None and parse_ref(None) is None
    assert is_ref("run:a") and not is_ref("a")
