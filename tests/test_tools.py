"""Every tool in bench/ and scripts/ runs as a module from the repository root and answers
``--help``, so a tool whose imports or flags break fails CI instead of rotting unseen.

The tools are found by listing the two packages, so a new one is covered without editing this
file. They run in a fresh interpreter, from the repository root and without ``PYTHONPATH``, as a
user runs them: a tool that only worked through pytest's ``pythonpath`` or an edit of ``sys.path``
would fail here. One interpreter serves every tool (``runpy``, as ``python -m`` does), which saves
a torch import per tool; between tools it forgets the repository's own modules and restores
``sys.path``, so each tool imports what it needs itself.
"""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "scripts")

#: Runs ``python -m MODULE --help`` for each module named in argv, in this one interpreter, and
#: prints a JSON list of {module, code, stdout, stderr}.
RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback
repo = os.getcwd()
results = []
for module in sys.argv[1:]:
    path, argv = list(sys.path), list(sys.argv)
    sys.argv = [module, "--help"]
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"module": module, "code": code, "stdout": out.getvalue(),
                    "stderr": err.getvalue()})
    sys.path[:], sys.argv = path, argv
    for name, loaded in list(sys.modules.items()):  # the next tool imports the repo anew
        where = getattr(loaded, "__file__", None) or ""
        if where.startswith(repo + os.sep) and os.sep + ".venv" + os.sep not in where:
            del sys.modules[name]
print(json.dumps(results))
"""


def tool_modules() -> list[str]:
    """``package.module`` of every tool, read from the folders (no tool is imported here)."""
    return [f"{package}.{info.name}" for package in PACKAGES
            for info in pkgutil.iter_modules([str(REPO_ROOT / package)])]


def test_the_tools_are_found():
    modules = tool_modules()
    # Two known members of each package: the listing itself works.
    assert {"bench.inference", "bench.kill_test", "scripts.convert_checkpoint",
            "scripts.verify_conversion"} <= set(modules)
    assert len(modules) == len(set(modules)) >= 10


@pytest.fixture(scope="module")
def usages() -> dict[str, dict]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", RUNNER, *tool_modules()], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {entry["module"]: entry for entry in json.loads(result.stdout.splitlines()[-1])}


@pytest.mark.parametrize("module", tool_modules())
def test_tool_runs_as_a_module_and_prints_its_usage(module, usages):
    result = usages[module]
    assert result["code"] == 0, result["stderr"][-3000:]
    # The usage line names the command that runs the tool.
    assert result["stdout"].startswith(f"usage: python -m {module} "), result["stdout"][:200]
    assert "Traceback" not in result["stderr"]


def test_the_runner_reports_a_tool_that_cannot_import(tmp_path):
    # The shared interpreter must not hide a broken tool: one whose import fails reports it.
    package = tmp_path / "broken_tools"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text("import not_a_module_anywhere\n")
    (package / "good.py").write_text("import sys\nprint('usage: python -m broken_tools.good x')\n"
                                     "sys.exit(0)\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", RUNNER, "broken_tools.bad",
                             "broken_tools.good"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    bad, good = json.loads(result.stdout.splitlines()[-1])
    assert bad["code"] == 1 and "ModuleNotFoundError" in bad["stderr"]
    assert good["code"] == 0 and good["stdout"] == "usage: python -m broken_tools.good x\n"
