"""Fail when modules of dippy_studio import each other in a cycle, and list every cycle.

import-linter's `acyclic_siblings` contract (pyproject.toml) finds cycles between sibling
modules and packages, but not one through a package's own `__init__` (the package imports a
submodule that imports the package back). This finds every cycle between single modules.
Imports inside functions count, as grimp reads them. The exceptions are that contract's
`ignore_imports`, so there is one list of them; an exception that no longer matches an
import fails too, so the list cannot go stale.

    python dev_tools/check_cycles.py     # exit status 1 with the cycles, 0 without
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import grimp

PACKAGE = "dippy_studio"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def ignored_imports(pyproject: Path = PYPROJECT) -> list[tuple[str, str]]:
    """(importer, imported) pairs from the acyclic_siblings contract's `ignore_imports`."""
    contracts = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]
    pairs = []
    for contract in contracts:
        if contract["type"] == "acyclic_siblings":
            for expression in contract.get("ignore_imports", []):
                importer, imported = (part.strip() for part in expression.split("->"))
                pairs.append((importer, imported))
    return pairs


def cycle_groups(graph: grimp.ImportGraph) -> list[list[str]]:
    """Each group of modules that all reach one another through imports (one or more cycles)."""
    reaches = {module: graph.find_upstream_modules(module) for module in graph.modules}
    groups: list[list[str]] = []
    grouped: set[str] = set()
    for module in sorted(reaches):
        if module in grouped:
            continue
        group = {module} | {other for other in reaches[module] if module in reaches[other]}
        if len(group) > 1:
            groups.append(sorted(group))
            grouped |= group
    return groups


def problems(graph: grimp.ImportGraph, ignored: list[tuple[str, str]]) -> list[str]:
    """What is wrong, one paragraph per cycle or stale exception; empty when nothing is."""
    found = []
    modules = graph.modules
    for importer, imported in ignored:
        if {importer, imported} <= modules and graph.direct_import_exists(importer=importer, imported=imported):
            graph.remove_import(importer=importer, imported=imported)
        else:
            found.append(f"ignore_imports lists {importer} -> {imported}, which no longer exists: remove it")
    for group in cycle_groups(graph):
        members = set(group)
        lines = [f"import cycle between {', '.join(group)}:"]
        for importer in group:
            for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
                details = graph.get_import_details(importer=importer, imported=imported)
                where = ", ".join(f"line {detail['line_number']}" for detail in details)
                lines.append(f"    {importer} -> {imported} ({where})")
        found.append("\n".join(lines))
    return found


def main() -> int:
    found = problems(grimp.build_graph(PACKAGE, cache_dir=None), ignored_imports())
    for problem in found:
        print(problem)
    if found:
        print(f"{len(found)} import problem(s) in {PACKAGE}", file=sys.stderr)
        return 1
    print(f"no import cycles in {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
