"""Layers: every room of pcbench (a top-level package or module) imports only the rooms below it
in `LAYERS` (function-level imports included), the import graph has no cycle, and the light
rooms (spec, grid, store, report) import neither torch nor transformers."""

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pcbench"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
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


def import_graph(package: Path = PACKAGE) -> Dict[str, Set[str]]:
    """Module -> the pcbench modules it imports anywhere in its source (any scope).

    `from pcbench import x` and `from pcbench.x import y` resolve to the module x (or x.y when
    y is a submodule); relative imports are resolved against the importing module."""
    files = {_module_name(p, package.parent): p for p in package.rglob("*.py")}
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


# The rooms, from the bottom; a room may import only rooms before it (and `pcbench` itself, for
# `__version__`). The same list, with what each room holds, opens `pcbench/__init__.py`.
LAYERS = ["util", "tracking", "data", "spec", "store", "card", "grid", "report", "models", "compress",
          "methods", "evaluate", "train", "run", "bench", "cli"]


def room(module: str) -> str:
    """The room of a pcbench module: its top-level package or module under `pcbench`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pcbench"


def layer_violations(graph: Dict[str, Set[str]], layers: List[str]) -> List[str]:
    """`a -> b` for every import of a module in room A from room B at A's level or above it
    (another room of the same level included), or from a room missing from `layers`."""
    rank = {name: i for i, name in enumerate(layers)}
    bad = []
    for module, targets in sorted(graph.items()):
        source = room(module)
        if source == "pcbench":
            continue  # the package root: its facade functions import rooms lazily (`test_root_stays_light`)
        for target in sorted(targets):
            dest = room(target)
            if dest in (source, "pcbench"):
                continue
            if source not in rank or dest not in rank or rank[dest] >= rank[source]:
                bad.append(f"{module} -> {target}")
    return bad


def test_every_room_is_in_the_layers():
    rooms = {room(m) for m in import_graph()} - {"pcbench"}
    assert rooms == set(LAYERS), f"rooms not in LAYERS: {rooms - set(LAYERS)}; gone: {set(LAYERS) - rooms}"
    top = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()), clean=False)
    listed = [line.split()[0] for line in top.splitlines() if line.startswith("    ") and line.split()]
    assert listed == LAYERS, "pcbench/__init__.py lists the rooms in another order than LAYERS"


def test_rooms_import_only_lower_rooms():
    bad = layer_violations(import_graph(), LAYERS)
    assert bad == [], "imports against the layering:\n" + "\n".join(bad)


def test_layer_check_catches_a_planted_violation(tmp_path):
    """A lower room importing a higher one, here `util` importing the training loop inside a
    function, is reported; so is a room missing from the list."""
    graph = import_graph()
    planted = {k: set(v) for k, v in graph.items()}
    planted["pcbench.util.atomic"].add("pcbench.train.loop")
    assert layer_violations(planted, LAYERS) == ["pcbench.util.atomic -> pcbench.train.loop"]
    # the same through the parser: a copy of the package with the import written into a file
    import shutil
    copy = tmp_path / "pcbench"
    shutil.copytree(PACKAGE, copy)
    atomic = copy / "util" / "atomic.py"
    atomic.write_text(atomic.read_text() + "\n\ndef _planted():\n    from pcbench.run import launch\n")
    parsed = import_graph(copy)
    assert layer_violations(parsed, LAYERS) == ["pcbench.util.atomic -> pcbench.run.launch"]
    # two rooms at one level may not import each other either
    assert layer_violations({"pcbench.a.x": {"pcbench.b.y"}}, ["a", "b"]) == ["pcbench.a.x -> pcbench.b.y"]
    assert layer_violations({"pcbench.b.y": {"pcbench.a.x"}}, ["a", "b"]) == []


def test_graph_resolves_imports():
    graph = import_graph()
    assert "pcbench.store" in graph and "pcbench.cli" in graph
    # the CLI reaches the launcher; the launcher reaches the grid
    assert "pcbench.run.launch" in graph["pcbench.cli"]
    assert "pcbench.grid" in graph["pcbench.run.launch"]


def test_find_cycle_detects_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    graph["pcbench"] = set()  # the root's lazy imports (inside functions) run after every room is loaded
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_root_stays_light():
    """The package root imports no room at module level: what it offers (`load_study`) imports its
    room inside the function, so `import pcbench` (which every room does for `__version__`) is light."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(not (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pcbench")) and
               not (isinstance(n, ast.Import) and any(a.name.startswith("pcbench") for a in n.names))
               for n in top), "pcbench/__init__.py imports a room at module level"


LIGHT = ["pcbench.spec.config", "pcbench.grid", "pcbench.store", "pcbench.report", "pcbench.tracking",
         "pcbench.card", "pcbench"]
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
    from pcbench import models
    from pcbench.spec import presets
    from pcbench.spec.config import ModelSpec

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
