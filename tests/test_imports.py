"""The import rules hold: the import-linter contracts in pyproject.toml and no cycles between
modules (dev_tools/check_cycles.py). `./dev lint` runs the same checks."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
cycles = runpy.run_path(str(ROOT / "dev_tools" / "check_cycles.py"))


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_cycles():
    graph = grimp.build_graph("dippy_studio", cache_dir=None)
    assert cycles["problems"](graph, cycles["ignored_imports"]()) == []


def test_a_cycle_through_a_package_init_is_found():
    # The case import-linter's acyclic_siblings contract does not see: a package's __init__
    # imports a submodule that imports the package back.
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b"):
        graph.add_module(module)
    graph.add_import(importer="pkg", imported="pkg.a", line_number=1, line_contents="from pkg.a import A")
    graph.add_import(importer="pkg.a", imported="pkg", line_number=3, line_contents="from pkg import B")
    graph.add_import(importer="pkg.a", imported="pkg.b", line_number=4, line_contents="from pkg.b import C")

    (problem,) = cycles["problems"](graph, [])
    assert problem.splitlines() == [
        "import cycle between pkg, pkg.a:",
        "    pkg -> pkg.a (line 1)",
        "    pkg.a -> pkg (line 3)",
    ]


def test_an_exception_breaks_a_cycle_and_must_still_match_an_import():
    def graph_of(*imports: tuple[str, str]) -> grimp.ImportGraph:
        graph = grimp.ImportGraph()
        for importer, imported in imports:
            graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
        return graph

    ignored = [("pkg.b", "pkg.a")]
    assert cycles["problems"](graph_of(("pkg.a", "pkg.b"), ("pkg.b", "pkg.a")), ignored) == []
    assert cycles["problems"](graph_of(("pkg.a", "pkg.b")), ignored) == [
        "ignore_imports lists pkg.b -> pkg.a, which no longer exists: remove it"
    ]
