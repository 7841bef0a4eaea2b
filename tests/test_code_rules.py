"""House rules of the code, checked on every test run: lint, import layers, reasoned local imports.

The layers are declared in pyproject.toml (``[tool.importlinter]``): a module imports only from
layers below its own, so a back-pointing import fails here. ruff checks line length, unused
imports and pyflakes' errors. A function-local import is allowed only with a comment saying why
(on its line or right above its block of imports).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_passes():
    if shutil.which("ruff") is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    result = run(["ruff", "check", "mlot_ds", "tools", "tests", "launch"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_imports_point_down_the_layers():
    result = run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"])
    assert result.returncode == 0 and "broken" not in result.stdout.split("Contracts:")[-1].replace("0 broken", ""), \
        result.stdout[-3000:] + result.stderr[-2000:]


def local_imports_without_a_reason(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    offenders = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for statement in ast.walk(node):
            if not isinstance(statement, (ast.Import, ast.ImportFrom)):
                continue
            row = statement.lineno - 1
            # Walk up over the imports of the same block to the line above it.
            while row > 0 and (lines[row - 1].lstrip().startswith(("import ", "from ")) or not lines[row - 1].strip()):
                row -= 1
            own = "#" in lines[statement.lineno - 1]
            above = row > 0 and lines[row - 1].lstrip().startswith("#")
            if not (own or above):
                offenders.append(f"{path.relative_to(REPO)}:{statement.lineno}: {lines[statement.lineno - 1].strip()}")
    return offenders


def test_every_function_local_import_says_why():
    offenders = [o for path in sorted((REPO / "mlot_ds").rglob("*.py")) for o in local_imports_without_a_reason(path)]
    assert offenders == []
