"""Compile DropBlock's Triton kernels ahead of time for real GPUs, without one; report registers and spills.

``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", cc, 32))``
builds a kernel for a GPU architecture on a machine with none (Triton's own ptxas turns the PTX
into a cubin). This script compiles every constexpr variant the launcher
(``spatialdrop._dropblock.triton_kernels``) can choose for the block shapes given, for sm_80 and
sm_90, and reads each kernel's registers and spill bytes from ``ptxas -v`` (the ptxas Triton
itself uses, so the version matches). ``tests/test_triton_aot.py`` runs it in the test suite.
A build check, not a benchmark: nothing it prints says how fast the kernels run.

    python dev/triton_aot.py                 # markdown table: every variant, sm_80 and sm_90
    python dev/triton_aot.py --cc 90 --few   # the default test run's subset
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("fp32", "fp64", "bf16", "fp16")
MODES = ("scale", "noscale", "count")  # SCALE=True / SCALE=False / COUNT=True (scale="realized")
# block shapes (B0, B1, B2), padded to 3 dims: 1-D 7; the bench's 2-D 7x7 and 3-D 5x5x5; a last side
# over 32 (two 32-place windows); a block of one
BLOCKS = ((1, 1, 7), (1, 7, 7), (5, 5, 5), (1, 3, 40), (1, 1, 1))
APPLY_CONSTEXPRS = ("B0", "B1", "B2", "VALID", "SHARED", "COUNT", "SCALE", "BLOCK")
SEED_CONSTEXPRS = ("K", "LOG_K", "KEYED", "BLOCK")


@dataclass(frozen=True)
class Variant:
    """One kernel specialisation: the kernel, its argument types and its constexpr values."""

    kernel: str
    signature: dict[str, str] = field(hash=False)
    constexprs: dict[str, Any] = field(hash=False)
    label: str = ""


def _kernels() -> tuple[Any, Any]:
    from spatialdrop._dropblock.triton_kernels import kernels

    return kernels(interpret=False)


def seed_variants(ints: str = "i32") -> list[Variant]:
    """Every seed-kernel variant: chunk lengths K = 4 .. 1024, keyed or not."""
    from spatialdrop._dropblock.triton_kernels import SEED_BLOCK

    seed_kernel, _ = _kernels()
    out = []
    for log_k, keyed in itertools.product(range(2, 11), (True, False)):
        sig = {}
        for name in seed_kernel.arg_names:
            if name in SEED_CONSTEXPRS:
                sig[name] = "constexpr"
            elif name == "bits_ptr":
                sig[name] = "*i32"
            elif name.endswith("_ptr"):
                sig[name] = "*i64"
            else:
                sig[name] = "i64" if name in ("key0", "key1") else ints  # key words are biased past 2**32
        constexprs = {"K": 1 << log_k, "LOG_K": log_k, "KEYED": keyed, "BLOCK": SEED_BLOCK}
        out.append(Variant("seed_kernel", sig, constexprs, f"K={1 << log_k} keyed={keyed} {ints}"))
    return out


def apply_variant(dtype: str, mode: str, blocks: tuple[int, int, int], valid: bool, shared: bool) -> Variant:
    """The apply-kernel variant for one dtype, pass, block shape, seeding and channel sharing."""
    from spatialdrop._dropblock.triton_kernels import APPLY_BLOCK

    _, apply_kernel = _kernels()
    sig = {}
    for name in apply_kernel.arg_names:
        if name in APPLY_CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in ("x_ptr", "out_ptr"):
            sig[name] = "*" + dtype
        elif name == "factor_ptr":  # the count pass hands the bits there (unused)
            sig[name] = "*i32" if mode == "count" else ("*fp64" if dtype == "fp64" else "*fp32")
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "i32"
    b0, b1, b2 = blocks
    constexprs = {
        "B0": b0,
        "B1": b1,
        "B2": b2,
        "VALID": int(valid),
        "SHARED": shared,
        "COUNT": mode == "count",
        "SCALE": mode == "scale",
        "BLOCK": APPLY_BLOCK,
    }
    label = f"{dtype} {mode} block={blocks} valid={int(valid)} shared={int(shared)}"
    return Variant("apply_kernel", sig, constexprs, label)


def apply_variants(few: bool) -> list[Variant]:
    """Apply-kernel variants: every combination, or (``few``) a set covering each value of each option."""
    if not few:
        combos = itertools.product(DTYPES, MODES, BLOCKS, (False, True), (False, True))
        return [apply_variant(*c) for c in combos]
    out = [apply_variant(dt, mode, (1, 7, 7), False, False) for dt in DTYPES for mode in MODES]
    out += [apply_variant("fp32", "scale", b, False, False) for b in BLOCKS if b != (1, 7, 7)]
    out += [
        apply_variant("bf16", "scale", (1, 7, 7), True, True),
        apply_variant("fp32", "count", (5, 5, 5), True, True),
    ]
    return out


def ptxas_usage(ptx: str, cc: int) -> tuple[int, int]:
    """``(registers, spill store bytes)`` of a PTX kernel, from the ptxas Triton uses for ``cc``."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run(
            [get_ptxas(cc).path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    if regs is None:
        raise RuntimeError(f"ptxas -v printed no register count:\n{done.stderr}")
    return int(regs.group(1)), int(spills.group(1)) if spills else 0


def compile_variant(variant: Variant, cc: int) -> tuple[int, int]:
    """Compile ``variant`` for ``sm_<cc>`` (no GPU needed); return its registers and spill bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seed_kernel, apply_kernel = _kernels()
    fn = seed_kernel if variant.kernel == "seed_kernel" else apply_kernel
    from spatialdrop._dropblock.triton_kernels import apply_warps

    source = ASTSource(fn, signature=variant.signature, constexprs=variant.constexprs)
    options = {}
    if variant.kernel == "apply_kernel":  # as launched
        options["num_warps"] = apply_warps(bool(variant.constexprs["COUNT"]))
    compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
    assert compiled.asm.get("cubin"), "no cubin was produced"
    return ptxas_usage(compiled.asm["ptx"], cc)


def variants(few: bool) -> list[Variant]:
    """Every variant (``few``: the covering subset that the default test run compiles)."""
    out = seed_variants() + apply_variants(few)
    if not few:
        out += seed_variants("i64")[:2]  # 64-bit sizes (grids past 2**31 places)
    return out


def main(argv: list[str] | None = None) -> int:
    """Compile the variants for each ``--cc`` and print the markdown table of registers and spills."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--cc", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--few", action="store_true", help="the covering subset of the default test run")
    args = parser.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}; registers and spill stores per thread from ptxas -v\n")
    print("| kernel | variant | " + " | ".join(f"sm_{cc}" for cc in args.cc or (80, 90)) + " |")
    print("|---|---|" + "---|" * len(args.cc or (80, 90)))
    worst = 0
    for v in variants(args.few):
        cells = []
        for cc in args.cc or (80, 90):
            regs, spills = compile_variant(v, cc)
            worst = max(worst, spills)
            cells.append(f"{regs} regs" + (f", **{spills} B spilled**" if spills else ""))
        print(f"| {v.kernel} | {v.label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nlargest spill: {worst} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
