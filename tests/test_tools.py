"""Every tool in bench/ and scripts/ runs as a module from the repository root and answers
``--help``, so a tool whose imports or flags break fails CI instead of rotting unseen.

The tools are found by listing the two packages, so a new one is covered without editing this
file. Each runs in a fresh interpreter, from the repository root and without ``PYTHONPATH``, as a
user runs it: a tool that only worked through pytest's ``pythonpath`` or an edit of ``sys.path``
would fail here.
"""
from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "scripts")


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


@pytest.mark.parametrize("module", tool_modules())
def test_tool_runs_as_a_module_and_prints_its_usage(module):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The usage line names the command that runs the tool.
    assert result.stdout.startswith(f"usage: python -m {module} "), result.stdout[:200]
    assert "Traceback" not in result.stderr
