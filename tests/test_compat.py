"""Importing spatialdrop prints nothing and loads no torch module that ``import torch`` does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import spatialdrop
from spatialdrop import _compat

SRC = str(Path(spatialdrop.__file__).parent.parent)


def run(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_import_with_warnings_as_errors_prints_nothing() -> None:
    out = run("import spatialdrop", "-W", "error")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout == ""


def test_import_loads_no_torch_module_beyond_import_torch() -> None:
    code = (
        "import sys, torch; before = set(sys.modules); import spatialdrop; "
        "print(sorted(m for m in set(sys.modules) - before if not m.startswith('spatialdrop')))"
    )
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_compat_answers_outside_any_tracing() -> None:
    assert _compat.is_compiling() is False
    assert _compat.dispatch_mode_active() is False
