"""The layering contract (pyproject.toml `[tool.importlinter]`, docs/layers.md) holds, and catches a back-edge.

import-linter runs in a subprocess, as `lint-imports` would: it finds `hatcli` by importing it from
the working folder, and this process has the real `hatcli` imported already. A back-edge is tried
on a copy of the package, so the tree under test is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
LINT_IMPORTS = ("import sys; from importlinter.cli import lint_imports; "
                "sys.exit(lint_imports(sys.argv[1], no_cache=True))")
"""What the `lint-imports` console script does, run with this interpreter (no cache folder left behind)."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def lint_imports(root: Path) -> tuple[int, str]:
    """Check the contract on the `hatcli` package under `root`; return the exit code and the plain output."""
    env = {**os.environ, "COLUMNS": "300"}  # one contract name per line, however long
    done = subprocess.run([sys.executable, "-c", LINT_IMPORTS, str(CONFIG)], cwd=root, capture_output=True,
                          text=True, timeout=120, env=env)
    return done.returncode, ANSI.sub("", done.stdout + done.stderr)


def test_layering_contract_holds_on_the_tree() -> None:
    code, output = lint_imports(ROOT)
    assert code == 0, output


@pytest.mark.parametrize(("module", "line", "edge", "contract"), [
    # grimp maps an import of a missing module to its nearest existing parent, so the back-edge is
    # caught (as `-> hatcli.engine`) even where hatcli/engine/stages.py no longer exists
    ("quant/flow.py", "import hatcli.engine.stages", r"hatcli\.quant\.flow -> hatcli\.engine(\.stages)? \(l\.\d+\)",
     "quant is the algorithms"),
    ("deploy/perf.py", "import hatcli.engine.trainer", r"hatcli\.deploy\.perf -> hatcli\.engine\.trainer \(l\.\d+\)",
     "engine trains, deploy builds"),
    ("plugins.py", "from hatcli import builtin", r"hatcli\.plugins -> hatcli\.builtin \(l\.\d+\)",
     "hatcli imports flow one way"),
], ids=["quant-imports-engine", "deploy-imports-engine", "plugins-imports-builtin"])
def test_layering_contract_fails_on_a_back_edge(tmp_path: Path, module: str, line: str, edge: str,
                                                contract: str) -> None:
    """`contract`: how the name of the contract that must break begins."""
    shutil.copytree(ROOT / "hatcli", tmp_path / "hatcli", ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "hatcli" / module).open("a") as source:
        source.write(f"\n{line}\n")
    code, output = lint_imports(tmp_path)
    assert code != 0
    assert re.search(edge, output), output
    assert re.search(rf"^{re.escape(contract)}.* BROKEN$", output, re.MULTILINE), output
