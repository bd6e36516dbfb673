"""The package's structure as a checked contract: its layers (``.ci/importlinter.ini``, run by
``lint-imports`` in ``.ci/run``), no module importing a whole sibling package, and no dead code."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_tissue_vit"
CONTRACT = REPO / ".ci" / "importlinter.ini"
SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contract on the package under ``root``."""
    pytest.importorskip("importlinter", reason="import-linter (the [test] extra) checks the layers")
    env = {**os.environ, "PYTHONPATH": str(root)}
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--config", str(CONTRACT), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_function_level_import_upwards_breaks_the_contract(tmp_path):
    """The cycle of issue 22 came back through an import inside a function: the contract sees it."""
    copy = tmp_path / "hf_tissue_vit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "templates"))
    with (copy / "modelfolder.py").open("a", encoding="utf-8") as handle:
        handle.write("\n\ndef _later():\n    from .hub import push_output_dir\n\n    return push_output_dir\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "hf_tissue_vit.modelfolder is not allowed to import hf_tissue_vit.hub" in result.stdout


def _imports_of_whole_packages(path: Path) -> list[str]:
    """``from ..pkg import name`` / ``from .. import pkg`` of a subpackage other than the module's own."""
    rel = path.relative_to(PACKAGE)
    own = rel.parts[0] if len(rel.parts) > 1 else None
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = list(rel.parts[:-1])[: len(rel.parts) - node.level]
        targets = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
        for target in targets:
            if len(target) == 1 and target[0] in SUBPACKAGES and target[0] != own:
                found.append(f"{rel}:{node.lineno} imports the package {target[0]}")
    return found


def test_no_module_imports_a_whole_sibling_package():
    """Modules import the module that defines a name (``from ..predict.predictor import TilePredictor``),
    so the import graph shows what depends on what, not whole packages."""
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in _imports_of_whole_packages(path)]
    assert found == []


# --------------------------------------------------------------------------------------------
# Dead code
# --------------------------------------------------------------------------------------------
# Found by name by their framework, never called by name in the repository.
CALLED_BY_FRAMEWORKS = {
    "evaluate_modules/tissue_classification/tissue_classification.py": "loaded by evaluate.load from its path",
}


def _definitions() -> dict[str, str]:
    """Public top-level functions and classes of the package: name -> module path."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel in CALLED_BY_FRAMEWORKS:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                found[node.name] = rel
    return found


def _uses() -> set[str]:
    """Names the library, scripts and benchmarks use: loaded names, attributes, imports outside the
    packages' ``__init__`` re-exports (ruff flags an import a module does not use)."""
    used = set()
    files = [*PACKAGE.rglob("*.py"), *(REPO / "scripts").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    for path in files:
        init = path.name == "__init__.py" and PACKAGE in path.parents
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Name) and not (init and node.id == "__all__"):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and not init:
                used.update(alias.name for alias in node.names)
    return used


def test_no_library_code_is_dead_or_used_only_by_tests():
    """Every public function and class of the package is used by the library, a script or a benchmark."""
    used = _uses()
    dead = sorted(f"{module}: {name}" for name, module in _definitions().items() if name not in used)
    assert dead == []


def test_package_docstrings_name_modules_that_exist():
    import re

    missing = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        for name in re.findall(r":mod:`\.(\w+)`", init.read_text(encoding="utf-8")):
            if not (init.parent / f"{name}.py").is_file() and not (init.parent / name / "__init__.py").is_file():
                missing.append(f"{init.relative_to(PACKAGE)} names .{name}")
    assert missing == []
