"""The GPU check of issue 12: the CUDA tests, then timings against the peers, as one markdown table.

    python benchmarks/gpu_check.py                  # on a GPU: tests + full table (under 5 minutes)
    python benchmarks/gpu_check.py --device cpu --quick   # the CPU-safe parts, small shapes

(a) runs ``pytest -m cuda tests/test_cuda.py`` in a process of its own (every layer on CUDA,
forward and backward in every dtype, keyed CPU == GPU bit for bit, no host synchronisation under
``torch.cuda.set_sync_debug_mode("error")``, the Triton DropBlock); (b) times forward and
forward + backward (CUDA events on a GPU, ``perf_counter`` on the CPU; median of the repeats)
of spatialdrop's layers against torch's ``dropout2d``, torchvision's ``drop_block2d/3d`` and
``stochastic_depth``, timm's ``DropBlock2d`` and ``drop_path`` (when installed) and a bare
``x * 2.0``, all in the same run, with the ratio to ``x * 2.0`` and the bytes per element that
autograd keeps for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``).
Everything goes through the public API: DropBlock on CUDA takes the Triton kernels by default
(the default-dispatch rows; their note names the path the profiler saw) and the dense torch ops
with ``SPATIALDROP_BACKEND=torch``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spatialdrop as sd
from spatialdrop import keyed_masks, mask_context

ROOT = Path(__file__).resolve().parent.parent


def _optional(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


@contextlib.contextmanager
def _backend(name: str | None) -> Iterator[None]:
    """Set ``SPATIALDROP_BACKEND`` for the block (``None``: leave it)."""
    old = os.environ.get("SPATIALDROP_BACKEND")
    if name is not None:
        os.environ["SPATIALDROP_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPATIALDROP_BACKEND", None)
        else:
            os.environ["SPATIALDROP_BACKEND"] = old


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def cuda_time(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    def cpu_time(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cuda_time if device.type == "cuda" else cpu_time


def _median_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    timer = _timer(device)
    for _ in range(2):
        timer(fn)
    return statistics.median(timer(fn) for _ in range(reps))


def _saved_bytes(fn: Callable[[Tensor], Tensor], x: Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward when ``fn(x)`` runs (not counting ``x``)."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        if t.data_ptr() != x.data_ptr():  # the input itself is alive anyway
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


class Row:
    """One line of the table."""

    def __init__(self, group: str, impl: str, fwd: float, both: float, saved: float, note: str = "") -> None:
        self.group, self.impl, self.fwd, self.both, self.saved, self.note = (
            group,
            impl,
            fwd,
            both,
            saved,
            note,
        )


def _measure(
    group: str, impl: str, fn: Callable[[Tensor], Tensor], x: Tensor, reps: int, note: str = ""
) -> Row:
    xg = x.detach().clone().requires_grad_(True)
    grad = torch.ones_like(x)

    def fwd() -> None:
        with torch.no_grad():
            fn(x)

    def both() -> None:
        y = fn(xg)
        y.backward(grad)
        xg.grad = None

    return Row(
        group,
        impl,
        _median_ms(fwd, x.device, reps),
        _median_ms(both, x.device, reps),
        _saved_bytes(fn, xg) / x.numel(),
        note,
    )


def _keyed(module: nn.Module, n: int, device: torch.device) -> Callable[[Tensor], Tensor]:
    net = keyed_masks(nn.Sequential(module), 1).to(device)
    ids = torch.arange(n, device=device)
    step = torch.tensor(0, device=device)

    def run(x: Tensor) -> Tensor:
        with mask_context(step=step, sample_ids=ids):
            out: Tensor = net(x)
        return out

    return run


# what the profiler sees of each DropBlock path, first match wins (see _path_taken)
PATHS_SEEN = (
    ("drop_block_triton", "Triton kernels"),
    ("FusedFunction", "fused C pass"),
    ("EagerFunction", "sparse torch ops"),
)


def _path_taken(fn: Callable[[Tensor], Tensor], x: Tensor) -> str:
    """Which DropBlock path ``fn(x)`` took, read from the ops the profiler saw: CUDA input takes
    the Triton kernels (``spatialdrop::drop_block_triton``) when ``triton`` is installed and
    ``SPATIALDROP_BACKEND`` is not ``torch``, else the dense torch ops; CPU input the fused C
    pass or the sparse torch ops."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(x.detach().clone().requires_grad_(True)).sum().backward()
    names = " ".join(e.key for e in prof.key_averages())
    return next((path for marker, path in PATHS_SEEN if marker in names), "torch ops")


def benchmark(device: torch.device, quick: bool, reps: int) -> list[Row]:
    """All the timings, grouped by the case they answer."""
    tv = _optional("torchvision")
    timm = _optional("timm")
    rows: list[Row] = []
    p = 0.1

    def twice(x: Tensor) -> Tensor:
        return x * 2.0

    cases = {
        "DropBlock 2-D per channel": ((4, 32, 28, 28) if quick else (32, 256, 28, 28), 7, False),
        "DropBlock 2-D shared": ((4, 32, 28, 28) if quick else (32, 256, 28, 28), 7, True),
        "DropBlock 3-D per channel": ((2, 8, 16, 16, 16) if quick else (8, 32, 32, 32, 32), 5, False),
    }
    for group, (shape, block, shared) in cases.items():
        x = torch.randn(shape, device=device)
        rank = len(shape) - 2
        cls = {1: sd.DropBlock1d, 2: sd.DropBlock2d, 3: sd.DropBlock3d}[rank]
        layer = cls(p, block, shared_channels=shared).to(device)
        rows.append(_measure(group, "x * 2.0", twice, x, reps))
        path = _path_taken(layer, x)
        rows.append(_measure(group, "spatialdrop", layer, x, reps, f"default dispatch: {path}"))
        with _backend("torch"):
            path = _path_taken(layer, x)
            rows.append(
                _measure(
                    group, "spatialdrop (torch path)", layer, x, reps, f"SPATIALDROP_BACKEND=torch: {path}"
                )
            )
        rows.append(
            _measure(
                group,
                "spatialdrop keyed",
                _keyed(cls(p, block, shared_channels=shared), shape[0], device),
                x,
                reps,
            )
        )
        if tv is not None and not shared:
            from torchvision.ops import drop_block2d, drop_block3d

            op = drop_block2d if rank == 2 else drop_block3d
            rows.append(
                _measure(group, "torchvision", lambda t, op=op, block=block: op(t, p, block), x, reps)
            )
        if timm is not None and rank == 2:
            from timm.layers import DropBlock2d as TimmDropBlock2d

            try:
                peer = TimmDropBlock2d(p, block, couple_channels=shared).to(device)
            except TypeError:  # older timm: one mask shared by the channels only
                peer = TimmDropBlock2d(p, block).to(device) if shared else None
            if peer is not None:
                rows.append(_measure(group, "timm", peer.train(), x, reps))
    # spatial dropout and DropPath against torch's own
    x = torch.randn((4, 16, 28, 28) if quick else (32, 64, 56, 56), device=device)
    group = "SpatialDropout2d"
    rows.append(_measure(group, "x * 2.0", twice, x, reps))
    rows.append(_measure(group, "torch dropout2d", lambda t: F.dropout2d(t, p), x, reps))
    rows.append(_measure(group, "spatialdrop", sd.SpatialDropout2d(p).to(device), x, reps))
    rows.append(
        _measure(group, "spatialdrop keyed", _keyed(sd.SpatialDropout2d(p), x.shape[0], device), x, reps)
    )
    group = "DropPath"
    rows.append(_measure(group, "x * 2.0", twice, x, reps))
    if tv is not None:
        from torchvision.ops import stochastic_depth

        rows.append(
            _measure(group, "torchvision stochastic_depth", lambda t: stochastic_depth(t, p, "row"), x, reps)
        )
    if timm is not None:
        from timm.layers import drop_path as timm_drop_path

        rows.append(_measure(group, "timm drop_path", lambda t: timm_drop_path(t, p, True), x, reps))
    rows.append(_measure(group, "spatialdrop", sd.DropPath(p).to(device), x, reps))
    rows.append(_measure(group, "spatialdrop keyed", _keyed(sd.DropPath(p), x.shape[0], device), x, reps))
    return rows


def table(rows: list[Row]) -> str:
    """The markdown table: times, ratios to ``x * 2.0`` and to the peers, bytes kept for backward."""
    lines = [
        "| case | implementation | fwd ms | fwd+bwd ms | fwd+bwd / x*2.0 | saved for bwd (B/elem) | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    base: dict[str, float] = {}
    for r in rows:
        if r.impl == "x * 2.0":
            base[r.group] = r.both
    for r in rows:
        ratio = r.both / base[r.group] if base.get(r.group) else float("nan")
        lines.append(
            f"| {r.group} | {r.impl} | {r.fwd:.3f} | {r.both:.3f} | {ratio:.2f}x | {r.saved:.3g} | {r.note} |"
        )
    return "\n".join(lines)


def goals(rows: list[Row]) -> list[str]:
    """Issue 12's GPU goals, checked against the table (meaningful on a GPU at full size only)."""
    t = {(r.group, r.impl): r for r in rows}
    out: list[str] = []

    def ratio(group: str, a: str, b: str) -> float | None:
        if (group, a) in t and (group, b) in t:
            return t[(group, b)].both / t[(group, a)].both
        return None

    def check(text: str, value: float | None, ok: Callable[[float], bool]) -> None:
        if value is None:
            out.append(f"- {text}: not measured (not installed or not on this device)")
        else:
            out.append(f"- {text}: {value:.2f} -> {'met' if ok(value) else 'NOT met'}")

    g2, gs, g3 = "DropBlock 2-D per channel", "DropBlock 2-D shared", "DropBlock 3-D per channel"
    check(
        "per-channel DropBlock fwd+bwd / x*2.0 (<= 1.5)",
        ratio(g2, "x * 2.0", "spatialdrop"),
        lambda v: v <= 1.5,
    )
    check(
        "torchvision / per-channel DropBlock (>= 30)",
        ratio(g2, "spatialdrop", "torchvision"),
        lambda v: v >= 30,
    )
    check("shared DropBlock / x*2.0 (<= 1.3)", ratio(gs, "x * 2.0", "spatialdrop"), lambda v: v <= 1.3)
    check("torchvision 3-D / DropBlock3d (>= 30)", ratio(g3, "spatialdrop", "torchvision"), lambda v: v >= 30)
    saved = t.get((g2, "spatialdrop"))
    check(
        "Triton DropBlock bytes/element saved for backward (0)",
        saved.saved if saved is not None and saved.note.endswith("Triton kernels") else None,
        lambda v: v < 0.01,
    )
    check(
        "torch dropout2d / SpatialDropout2d (>= 0.95)",
        ratio("SpatialDropout2d", "spatialdrop", "torch dropout2d"),
        lambda v: v >= 0.95,
    )
    check(
        "keyed / unkeyed SpatialDropout2d (<= 1.1)",
        ratio("SpatialDropout2d", "spatialdrop", "spatialdrop keyed"),
        lambda v: v <= 1.1,
    )
    check(
        "keyed / unkeyed DropPath (<= 1.1)",
        ratio("DropPath", "spatialdrop", "spatialdrop keyed"),
        lambda v: v <= 1.1,
    )
    return out


def run_tests(device: torch.device) -> int:
    """``pytest -m cuda tests/test_cuda.py`` in a fresh process (deselects everything without CUDA)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "cuda",
        str(ROOT / "tests" / "test_cuda.py"),
    ]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT / "src"))
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    # without a CUDA device the conftest deselects every cuda test: pytest's "no tests ran" (5)
    return 0 if rc == 5 and device.type != "cuda" else rc


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns non-zero when the tests fail."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    parser.add_argument("--no-tests", action="store_true", help="only the timings")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed repeats per entry (default 20, 5 quick)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    status = 0 if args.no_tests else run_tests(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    started = time.perf_counter()
    rows = benchmark(device, args.quick, args.reps or (5 if args.quick else 20))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 thread"
    text = "\n".join(
        [
            f"GPU check on {name}, torch {torch.__version__}"
            + (", quick shapes" if args.quick else "")
            + f" ({time.perf_counter() - started:.0f} s of timing)",
            "",
            table(rows),
            "",
            "Goals (issue 12):",
            *goals(rows),
        ]
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
