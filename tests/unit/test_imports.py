"""The package's imports point one way (issues 16, 23): no module reaches itself again through
others, counting imports inside functions too, and each sub-package imports only from the
sub-packages below it in docs/ARCHITECTURE.md's picture (LAYERS)."""

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "spiral_megatron"

# The packages bottom to top, as docs/ARCHITECTURE.md draws them: a package imports only from
# packages on lower rows (packages on one row do not import each other).
LAYERS = (
    ("spiral_megatron.errors", "spiral_megatron.functional_spiral", "spiral_megatron.extras"),
    ("spiral_megatron.config",),
    ("spiral_megatron.parallel",),
    ("spiral_megatron.model",),
    ("spiral_megatron.hf",),
    ("spiral_megatron.job.data",),
    ("spiral_megatron.job.settings",),
    ("spiral_megatron.job.build",),
    ("spiral_megatron.job.checkpoint",),
    ("spiral_megatron.conversion", "spiral_megatron.job.run"),
    ("spiral_megatron.quantization", "spiral_megatron.analysis"),
    ("spiral_megatron", "spiral_megatron.job"),  # the package's lazy names; job/__init__ is empty
)


def modules() -> Dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known) -> Set[str]:
    """The package modules `name` imports anywhere in its file (module level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from package import name`: the submodule `name`, else the package itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> Dict[str, Set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_package():
    edges = graph()
    assert len(edges) > 60 and "spiral_megatron.job.settings.resolve" in edges["spiral_megatron.job.build"]
    assert "spiral_megatron.config.spiral_config" in edges["spiral_megatron"]  # imports inside functions count


def package_of(module: str) -> str:
    """The package of LAYERS that `module` belongs to (the longest name that prefixes it)."""
    names = [p for row in LAYERS for p in row if module == p or module.startswith(p + ".")]
    return max(names, key=len)


def upward(edges: Dict[str, Set[str]]) -> List[str]:
    """`module -> target` for every import of a package on the same or a higher row of LAYERS."""
    row = {p: i for i, ps in enumerate(LAYERS) for p in ps}
    return sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts
                  if package_of(m) != package_of(t) and row[package_of(t)] >= row[package_of(m)])


def test_packages_import_downward_only():
    assert upward(graph()) == []


def test_an_upward_import_is_found():
    edges = {"spiral_megatron.job.settings.checks": {"spiral_megatron.job.build"},
             "spiral_megatron.job.build": {"spiral_megatron.model.init"},
             "spiral_megatron.conversion.x": {"spiral_megatron.job.run.loop"}}
    assert upward(edges) == ["spiral_megatron.conversion.x -> spiral_megatron.job.run.loop",
                             "spiral_megatron.job.settings.checks -> spiral_megatron.job.build"]


def test_no_import_cycle():
    edges = graph()
    assert cycles(edges) == [], "\n".join(
        f"{m} -> {sorted(edges[m] & set(c))}" for c in cycles(edges) for m in c)


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

