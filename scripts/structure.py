"""Figures on the code's shape: the longest functions, the public functions with the most
parameters, and imports that run back up a layer.

Why: a structure change should be judged by numbers that can be measured again, not by
impression. The layer order is the one the README's architecture section describes: a module
may import from its own room or from a room below it, never from one above.

    python scripts/structure.py [--json]
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Rooms from the bottom up; a module may import only from its own rank or below.
RANKS = {
    "cag": 0, "cag.errors": 0, "cag.settings": 0, "cag.paths": 0, "cag.results": 0,
    "cag.stoptext": 0, "cag.sampling": 0, "cag.log": 0,
    "cag.engines": 1,
    "cag.cache": 2,
    "cag.kb": 3,
    "cag.drafts": 4, "cag.decode": 4, "cag.scheduler": 4,
    "cag.api": 5, "cag.catalog": 5, "cag.embed": 5, "cag.registry": 5, "cag.stores": 5,
    "cag.eval": 6, "cag.server": 6,
    "cag.cli": 7, "cag.cli_render": 7, "cag.cli_options": 7, "cag.__main__": 8,
}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def room(name: str) -> str:
    parts = name.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    raise KeyError(f"{name} has no rank in scripts/structure.py: add its room")


def imported(path: pathlib.Path, name: str, tree: ast.AST, root: pathlib.Path = ROOT):
    """Yield (module imported, line, lazy?) for every import of a cag module."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    top_level = {id(n) for n in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if _is_module(f"{mod}.{a.name}", root) else mod
                       for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        lazy = id(node) not in top_level and not _under_type_checking(tree, node)
        for t in targets:
            if t == "cag" or t.startswith("cag."):
                yield t, node.lineno, lazy


def _is_module(dotted: str, root: pathlib.Path) -> bool:
    p = root.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _under_type_checking(tree: ast.AST, target: ast.AST) -> bool:
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(n is target for n in ast.walk(node)):
                return True
    return False


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def hidden_loops(edges: dict[str, set[str]], lazy: list[dict]) -> list[dict]:
    """Lazy imports whose target reaches back to the importer by top-level imports: a loop
    that only works because one side waits until call time."""
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m in seen:
                continue
            seen.add(m)
            todo.extend(edges.get(m, ()))
        return False
    return [u for u in lazy if reaches(u["imports"], u["from"])]


def measure(root: pathlib.Path = ROOT) -> dict:
    """The figures for the package `cag` under `root` (this repository by default)."""
    rows, ups, lazy, edges = [], [], [], {}
    for path in sorted((root / "cag").rglob("*.py")):
        name = module_name(path, root)
        tree = ast.parse(path.read_text(), str(path))
        for fn in functions(tree):
            rows.append({"where": f"{path.relative_to(root)}:{fn.lineno}", "name": fn.name,
                         "lines": fn.end_lineno - fn.lineno + 1, "params": params(fn),
                         "public": not fn.name.startswith("_")})
        here = room(name)
        for target, line, is_lazy in imported(path, name, tree, root):
            record = {"where": f"{path.relative_to(root)}:{line}", "from": name,
                      "imports": target}
            if is_lazy:
                lazy.append(record)
            else:
                edges.setdefault(name, set()).add(target)
            if RANKS[room(target)] > RANKS[here]:
                ups.append(dict(record, lazy=is_lazy))
    public = [r for r in rows if r["public"]]
    return {
        "longest": sorted(rows, key=lambda r: -r["lines"])[:10],
        "most_params": sorted(public, key=lambda r: -r["params"])[:10],
        "functions_over_60_lines": sum(r["lines"] > 60 for r in rows),
        "imports_up_a_layer": ups,
        "lazy_imports_hiding_a_loop": hidden_loops(edges, lazy),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    figures = measure()
    if ap.parse_args().json:
        print(json.dumps(figures, indent=2))
        return 0
    print("longest functions:")
    for r in figures["longest"][:5]:
        print(f"  {r['lines']:4} lines  {r['name']}  {r['where']}")
    print(f"functions over 60 lines: {figures['functions_over_60_lines']}")
    print("public functions with the most parameters:")
    for r in figures["most_params"][:5]:
        print(f"  {r['params']:4} params {r['name']}  {r['where']}")
    print(f"imports that run back up a layer: {len(figures['imports_up_a_layer'])}")
    for u in figures["imports_up_a_layer"]:
        print(f"  {u['where']}  {u['from']} -> {u['imports']}{'  (lazy)' if u['lazy'] else ''}")
    print(f"lazy imports that hide a loop: {len(figures['lazy_imports_hiding_a_loop'])}")
    for u in figures["lazy_imports_hiding_a_loop"]:
        print(f"  {u['where']}  {u['from']} -> {u['imports']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
