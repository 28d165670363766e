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


#: The training modules of utils/: deployment (deploy/, export.py) imports none of them, directly
#: or through another module of ours.
TRAINING_MODULES = {
    "utils.random_state", "utils.summaries", "utils.metrics", "utils.losses", "utils.lr_scheduler",
    "utils.optim", "utils.plan", "utils.figures", "utils.run_folder", "utils.stopping",
    "utils.evaluation_report",
}


def module_file(name: str) -> Path | None:
    """The file of our module ``name`` (dotted), or None when it is not one of ours."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The dotted names of our modules that ``path`` imports (``from package import module``
    counts the module), also inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if module_file(name) is not None}


def reachable_modules(paths: list[Path]) -> dict[str, Path]:
    """Every module of ours that ``paths`` import, directly or not, with a file importing it."""
    seen: dict[str, Path] = {}
    todo = list(paths)
    while todo:
        path = todo.pop()
        for name in imported_modules(path) - seen.keys():
            seen[name] = path
            todo.append(module_file(name))
    return seen


def test_the_import_reader_follows_imports_through_our_modules():
    reached = reachable_modules([REPO / "train.py"])
    assert "utils.run_folder" in reached and "utils.fileio" in reached  # the latter through run_folder


@pytest.mark.parametrize("entry", ["deploy", "export.py"])
def test_deployment_imports_no_training_module(entry):
    paths = sorted((REPO / entry).rglob("*.py")) if entry == "deploy" else [REPO / entry]
    wrong = {f"{name} (imported by {path.relative_to(REPO)})"
             for name, path in reachable_modules(paths).items() if name in TRAINING_MODULES}
    assert not wrong, "deployment must run without the training code"


def our_sources() -> list[Path]:
    """Every Python file of the project outside tests/ (and hidden folders such as .venv)."""
    return [path for path in sorted(REPO.rglob("*.py"))
            if not any(part.startswith(".") or part == "tests"
                       for part in path.relative_to(REPO).parts)]


def functions_calling(path: Path, is_wanted) -> set[str]:
    """The functions in ``path`` with a call for which ``is_wanted(call)``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {function.name for function in ast.walk(tree)
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(isinstance(node, ast.Call) and is_wanted(node)
                    for node in ast.walk(function))}


def project_functions_calling(is_wanted) -> set[str]:
    """``file:function`` of each function outside tests with a call ``is_wanted`` picks."""
    return {f"{path.relative_to(REPO).as_posix()}:{name}" for path in our_sources()
            for name in functions_calling(path, is_wanted)}


def builds_from_settings(call: ast.Call) -> bool:
    """``<anything>.from_settings(...)`` or ``.from_state_dict(...)``: a DeepLab from a
    checkpoint's settings."""
    return isinstance(call.func, ast.Attribute) and call.func.attr in ("from_settings",
                                                                        "from_state_dict")


def loads_checkpoint_weights(call: ast.Call) -> bool:
    """``<model>.load_state_dict(<x>["model"])`` and the like: a checkpoint's weights loaded by
    hand."""
    return (isinstance(call.func, ast.Attribute) and call.func.attr.startswith("load_")
            and any(isinstance(arg, ast.Subscript) and isinstance(arg.slice, ast.Constant)
                    and arg.slice.value == "model" for arg in call.args))


def test_the_call_finder_sees_both_ways_of_loading_by_hand(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def a(c):\n    return DeepLab.from_state_dict(c['settings'], c['model'])\n"
                      "def b(m, c):\n    m.load_state_dict(c['model'])\n"
                      "def c(m, s):\n    m.load_state_dict(s)\n")
    assert functions_calling(source, builds_from_settings) == {"a"}
    assert functions_calling(source, loads_checkpoint_weights) == {"b"}


def test_one_function_builds_a_model_from_a_checkpoint():
    # DeepLab.from_state_dict builds through from_settings; load_model is the one caller.
    assert project_functions_calling(builds_from_settings) == {
        "modeling/deeplab.py:from_state_dict", "modeling/checkpoint.py:load_model"}
    by_hand = project_functions_calling(loads_checkpoint_weights)
    assert not by_hand, "load a checkpoint's weights with modeling.checkpoint.load_model"


# ------------------------------------------------------------------ pieces a reader can hold

#: Every Python file outside tests/: the scripts at the top, the packages and the tools.
SOURCES = sorted([*REPO.glob("*.py"), *(path for folder in (*PACKAGES, "bench", "scripts")
                                        for path in (REPO / folder).rglob("*.py"))])
#: A function past this many lines (its docstring included) or parameters is a piece waiting
#: for a name (STYLE.md); ``self`` and ``cls`` are not counted.
MAX_FUNCTION_LINES, MAX_PARAMETERS = 60, 8
#: train.py keeps the parser, the builders, main with its epoch loop, one epoch, one step,
#: evaluate and cli; the run folder, the stop policy and the reports live in utils/.
TRAIN_PY_MAX_LINES = 450


def oversized_functions(path: Path) -> list[str]:
    """``<name> (<lines> lines, <parameters> parameters)`` for each function of ``path`` past
    :data:`MAX_FUNCTION_LINES` or :data:`MAX_PARAMETERS` (positional and keyword-only)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arguments = node.args
        parameters = [argument.arg for argument in (*arguments.posonlyargs, *arguments.args,
                                                    *arguments.kwonlyargs)
                      if argument.arg not in ("self", "cls")]
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES or len(parameters) > MAX_PARAMETERS:
            found.append(f"{node.name} ({lines} lines, {len(parameters)} parameters)")
    return found


def test_reader_counts_lines_and_parameters(tmp_path):
    source = tmp_path / "m.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    source.write_text(
        f"def fits(a, /, b, *, c):\n{body}"                       # 60 lines: fits
        f"def too_long():\n{body}    return x0\n"                   # 61 lines
        "def nine(a, b, c, d, e, f, g, h, *, i):\n    pass\n"
        "class C:\n"
        "    def method(self, a, b, c, d, e, f, g, h):\n        pass\n"  # self not counted
        "    @classmethod\n"
        "    def build(cls, a, b, c, d, e, f, g, h, i=0):\n        pass\n")
    assert oversized_functions(source) == ["too_long (61 lines, 0 parameters)",
                                           "nine (2 lines, 9 parameters)",
                                           "build (2 lines, 9 parameters)"]


def test_no_function_is_longer_than_60_lines_or_takes_more_than_8_parameters():
    assert len(SOURCES) > 30  # the scan sees the packages, scripts and tools
    offenders = [f"{path.relative_to(REPO)}: {function}" for path in SOURCES
                 for function in oversized_functions(path)]
    assert not offenders, "split these into pieces with names"


def test_train_py_reads_in_one_sitting():
    lines = len((REPO / "train.py").read_text().splitlines())
    assert lines <= TRAIN_PY_MAX_LINES, f"train.py has {lines} lines"
