"""Counts that show the code's shape: import cycles, `Any` in the agent, largest files and functions.

Import cycles are strongly connected components of the import graph between the project's own modules
(agent, coordinator, starling_proto), counted twice: with every import (also those inside functions and
under `if TYPE_CHECKING:`), and with module-level runtime imports only (the ones that can fail at start).

Run from the repository root (or point --root at another checkout, e.g. a `git worktree` of an older
commit, to compare side by side):  .venv/bin/python bench/shape.py [--root DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("agent", "coordinator", "starling_proto")


@dataclass
class Module:
    name: str
    path: Path
    imports_all: set[str] = field(default_factory=set)
    imports_runtime: set[str] = field(default_factory=set)


def modules(root: Path) -> dict[str, Module]:
    out: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = Module(".".join(parts), path)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, module: str, known: dict[str, Module]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")
            is_package = known[module].path.name == "__init__.py"
            package = package if is_package else package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            yield full if full in known else base


def _owner(name: str, known: dict[str, Module]) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def scan(root: Path) -> dict[str, Module]:
    known = modules(root)
    for mod in known.values():
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        runtime_nodes: list[ast.AST] = []
        for top in tree.body:
            if isinstance(top, ast.If) and _is_type_checking(top):
                continue
            if isinstance(top, (ast.Import, ast.ImportFrom)):
                runtime_nodes.append(top)
        for node in ast.walk(tree):
            for name in _imports(node, mod.name, known):
                owner = _owner(name, known)
                if owner and owner != mod.name:
                    mod.imports_all.add(owner)
        for node in runtime_nodes:
            for name in _imports(node, mod.name, known):
                owner = _owner(name, known)
                if owner and owner != mod.name:
                    mod.imports_runtime.add(owner)
    return known


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def any_count(root: Path, package: str) -> int:
    count = 0
    for path in (root / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Name) and node.id == "Any") or (
                isinstance(node, ast.Attribute) and node.attr == "Any"
            ):
                count += 1
    return count


def largest(root: Path, package: str) -> tuple[tuple[int, str], tuple[int, str]]:
    files: list[tuple[int, str]] = []
    funcs: list[tuple[int, str]] = []
    for path in (root / package).rglob("*.py"):
        text = path.read_text()
        rel = str(path.relative_to(root))
        files.append((len(text.splitlines()), rel))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                funcs.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
    return max(files), max(funcs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--root", type=Path, default=Path.cwd())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    known = scan(args.root)
    result: dict[str, object] = {}
    for kind in ("all", "runtime"):
        graph = {m.name: (m.imports_all if kind == "all" else m.imports_runtime) for m in known.values()}
        found = cycles(graph)
        result[f"import_cycles_{kind}"] = found
        print(f"import cycles ({kind} imports): {len(found)}")
        for component in found:
            print("   " + " <-> ".join(component))
    for package in ("agent", "coordinator"):
        (file_lines, file_name), (func_lines, func_name) = largest(args.root, package)
        n_any = any_count(args.root, package)
        result[package] = {
            "any": n_any,
            "largest_file": [file_lines, file_name],
            "largest_function": [func_lines, func_name],
        }
        print(
            f"{package}: Any x{n_any}; largest file {file_name} ({file_lines} lines); "
            f"largest function {func_name} ({func_lines} lines)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
