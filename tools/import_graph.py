"""Draw seqfast's import graph from the source and check it against the package's layers.

Every import is read from the AST, at module level or inside a function, so an import deferred into a function
still counts. Importing `a.b.c` also runs the packages `a.b` and `a`, so each import adds an edge to the parent
packages too (not to the importer's own parents, which have already run). The check fails, exit status 1, on a
cycle or on an import from a lower layer into a higher one (LAYERS, top to bottom).

    python tools/import_graph.py          # the graph by layer, then any problems
    python tools/import_graph.py --dot    # Graphviz source of the graph
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "seqfast"

# Import order, top to bottom: a module may import modules of its own layer or of a layer below it. A module
# belongs to the layer of the longest prefix naming it. docs/design.md ("Layers") explains the order.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("package and commands", ("seqfast", "seqfast.cli", "seqfast.bench")),
    ("kits and demos", ("seqfast.demos", "seqfast.seq2seq", "seqfast.training")),
    ("conformance kit", ("seqfast.testing",)),
    ("modules", ("seqfast.nn",)),
    ("functional", ("seqfast.functional",)),
    ("calibration", ("seqfast.calibration",)),
    ("backends", ("seqfast.backends",)),
    ("registry", ("seqfast.registry",)),
    ("config", ("seqfast.config", "seqfast.config_file")),
    ("cells", ("seqfast.cells",)),
    ("records", ("seqfast.spec", "seqfast._memo", "seqfast._env", "seqfast._version")),
)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{module name: file} of every module of the package."""
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports, directly or as the parents of what it names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            named.add(target)
            named.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    found = set()
    for name in named:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the module and every package above it
            candidate = ".".join(parts[:i])
            if candidate in known and candidate != module and candidate not in own_parents:
                found.add(candidate)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    if index is None:
        raise ValueError(f"module {module!r} is in no layer of tools/import_graph.py's LAYERS; add it there")
    return index


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Each import of a module in a higher layer, as a sentence."""
    problems = []
    for src in sorted(edges):
        for dst in sorted(edges[src]):
            if layer_of(dst) < layer_of(src):
                problems.append(f"{src} (layer {LAYERS[layer_of(src)][0]!r}) imports {dst} "
                                f"(layer {LAYERS[layer_of(dst)][0]!r}, above it)")
    return problems


def problems(edges: dict[str, set[str]]) -> list[str]:
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    return found + [f"upward import: {p}" for p in upward_imports(edges)]


def to_dot(edges: dict[str, set[str]]) -> str:
    lines = ["digraph seqfast {", "  rankdir=TB; node [shape=box, fontsize=10];"]
    for i, (name, _) in enumerate(LAYERS):
        members = sorted(m for m in edges if layer_of(m) == i)
        lines.append(f'  subgraph cluster_{i} {{ label="{name}"; ' + " ".join(f'"{m}";' for m in members) + " }")
    lines += [f'  "{src}" -> "{dst}";' for src in sorted(edges) for dst in sorted(edges[src])]
    return "\n".join(lines + ["}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz source instead of the listing")
    args = parser.parse_args(argv)
    edges = graph()
    if args.dot:
        print(to_dot(edges))
    else:
        for i, (name, _) in enumerate(LAYERS):
            print(f"[{name}]")
            for module in sorted(m for m in edges if layer_of(m) == i):
                print(f"  {module} -> {', '.join(sorted(edges[module])) or '-'}")
    found = problems(edges)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
