"""The packages import one way: utils -> dataloader / modeling -> deploy -> the scripts and tools.

Read from the source with ``ast`` (every import, also those inside functions), so a new module
that imports against the direction fails here before it grows a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "dataloader", "modeling", "deploy")
#: Our top-level names each package may import (besides the standard library and third parties).
ALLOWED = {
    "utils": {"utils"},
    "dataloader": {"utils", "dataloader"},
    "modeling": {"utils", "modeling"},
    "deploy": {"utils", "dataloader", "modeling", "deploy"},
}
OURS = set(PACKAGES) | {"mypath", "train", "inference", "export", "bench", "scripts", "tests"}


def our_imports(path: Path) -> set[str]:
    """The top-level names of this repository that ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


def test_reader_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import utils.fileio\nfrom deploy.engines import x\nimport os, train\n"
                      "def f():\n    from modeling import deeplab\n")
    assert our_imports(source) == {"utils", "deploy", "train", "modeling"}


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_lies_below_it(package):
    wrong = {f"{path.relative_to(REPO)} imports {sorted(found - ALLOWED[package])}"
             for path in sorted((REPO / package).rglob("*.py"))
             if (found := our_imports(path)) - ALLOWED[package]}
    assert not wrong, "imports against the direction utils -> dataloader / modeling -> deploy"


def test_training_never_imports_deployment():
    assert "deploy" not in our_imports(REPO / "train.py")
