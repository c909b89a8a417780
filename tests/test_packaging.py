"""What the source distribution ships, and the test run's warning configuration (pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a checkout holds beside the sources, never part of an sdist build's input
NOT_SOURCES = shutil.ignore_patterns(
    ".*", "__pycache__", "*.egg-info", "build", "dist", "venv", "spatialdrop-demo", "*.png", "*.so"
)


def _build_sdist(tmp_path: Path) -> Path:
    """Build the sdist with setuptools' backend from a copy of the tree (nothing is written here)."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=NOT_SOURCES)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in done.stderr, done.stderr[-3000:]
    return tmp_path / "dist" / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_sdist(tmp_path_factory.mktemp("sdist"))


def _members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        return {m.name.removeprefix(top + "/"): m for m in tar.getmembers() if m.isfile()}


def test_the_sdist_holds_everything_its_tests_need(sdist: Path) -> None:
    names = set(_members(sdist))
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    assert {"tests/conftest.py", "tests/optable.py"} <= tests
    assert tests <= names, sorted(tests - names)
    scripts = {
        p.relative_to(ROOT).as_posix()
        for d in ("benchmarks", "dev", "examples")
        for p in (ROOT / d).glob("*.py")
    }
    assert "dev/triton_aot.py" in scripts  # tests/test_triton_aot.py loads it
    assert "benchmarks/goals.py" in scripts  # tests/test_cli_bench.py runs it
    assert scripts <= names, sorted(scripts - names)
    # test_readme runs README.md's code blocks; the package and its type marker
    assert {"README.md", "LICENSE", "pyproject.toml", "src/spatialdrop/py.typed"} <= names
    assert all("__pycache__" not in n and not n.endswith(".pyc") for n in names)
    # the fused DropBlock pass's C source (built by pip install), never a built library
    assert "src/spatialdrop/_dropblock/_cfused.c" in names
    assert not any(n.endswith((".so", ".pyd")) for n in names)


def test_the_sdist_states_the_license_as_an_spdx_expression(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        handle = tar.extractfile(member)
        assert handle is not None
        info = handle.read().decode()
    assert "License-Expression: MIT" in info
    assert "License-File: LICENSE" in info
    assert "Classifier: License ::" not in info  # superseded by the expression (PEP 639)


@pytest.mark.slow
def test_the_tests_of_an_unpacked_sdist_collect(sdist: Path, tmp_path: Path) -> None:
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(tmp_path, filter="data")
        else:  # pragma: no cover
            tar.extractall(tmp_path)
    (unpacked,) = tmp_path.iterdir()
    env = {**os.environ, "PYTHONPATH": str(unpacked / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=unpacked,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.splitlines()[-1].lower(), done.stdout[-3000:]


# --- warnings: the test run turns spatialdrop's own UserWarnings into errors ------------------


def _warn_from(module: str, message: str) -> None:
    # the origin module of a warning is what the filters match (after stacklevel)
    warnings.warn_explicit(message, UserWarning, f"{module}.py", 1, module=module)


@pytest.mark.parametrize("module", ["spatialdrop", "spatialdrop.tools", "spatialdrop._dropblock.ops"])
def test_a_user_warning_from_a_spatialdrop_module_fails_the_test(module: str) -> None:
    with pytest.raises(UserWarning, match="from the library"):
        _warn_from(module, f"from the library ({module})")
    # the warnings the library gives on purpose are still caught where a test expects them
    with pytest.warns(UserWarning, match="expected"):
        _warn_from(module, f"expected ({module})")


@pytest.mark.parametrize("module", ["spatialdropx", "tests.test_tools", "torch._dynamo.convert_frame"])
def test_user_warnings_from_other_modules_stay_warnings(module: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        _warn_from(module, f"a warning from {module}")
    assert [str(w.message) for w in caught] == [f"a warning from {module}"]
