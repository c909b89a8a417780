"""DropBlock's Triton kernels compile for real GPUs (sm_80, sm_90) ahead of time, without a GPU.

Every constexpr variant the launcher can choose is compiled with ``triton.compile`` for a
``GPUTarget`` (Triton's interpreter, which the other Triton tests use, accepts code that the
compiler refuses: the seed kernel once failed with "constexpr cannot be reassigned"), and the
apply kernel, which every element goes through, must not spill registers (``ptxas -v``).
``dev/triton_aot.py`` holds the variants and prints the register table.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install spatialdrop[triton])")

pytestmark = pytest.mark.triton


def _aot() -> Any:
    path = Path(__file__).resolve().parents[1] / "dev" / "triton_aot.py"
    spec = importlib.util.spec_from_file_location("triton_aot", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton_aot"] = module
    spec.loader.exec_module(module)
    return module


aot = _aot()
FEW = aot.variants(few=True)
ALL = aot.variants(few=False)


def _check(variant: Any, cc: int) -> None:
    regs, spills = aot.compile_variant(variant, cc)
    assert 0 < regs <= 255
    if variant.kernel == "apply_kernel":
        assert spills == 0, f"{variant.label} on sm_{cc}: {spills} bytes of registers spilled"


@pytest.mark.parametrize("variant", FEW, ids=[f"{v.kernel}-{v.label}" for v in FEW])
def test_every_kernel_compiles_for_sm90(variant: Any) -> None:
    _check(variant, 90)


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("variant", ALL, ids=[f"{v.kernel}-{v.label}" for v in ALL])
def test_every_variant_compiles_for_sm80_and_sm90(variant: Any, cc: int) -> None:
    _check(variant, cc)
