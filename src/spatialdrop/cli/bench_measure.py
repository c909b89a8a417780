"""How ``spatialdrop bench`` measures: timing, saved bytes, drop rates, the allocator.

Timed implementations of a case run in one process, interleaved repeat by repeat (so that a busy
moment of the machine slows all of them alike), after a warm-up; the rows hold medians. An
implementation that raises (a compiler error, a peer that refuses a shape) gets a note instead of
numbers, and the others are still measured.

Page faults. With glibc's default allocator a large output sometimes comes back with fresh pages
(the heap was trimmed by an earlier free), and on a small virtual machine the first touch of a
25 MB output costs several times the op that writes it. Which call gets them depends on the
state of the process's heap, not on the op: a bare ``x * 2.0`` timed against a copy of itself
gets them in more or fewer of its calls at random (``benchmarks/page_faults.py``). Each
timed call's minor faults are counted (``getrusage``), and beside the medians of all calls a row
holds the median of its *clean* calls (those that faulted in less than an eighth of the
output's pages) and the ratio of that to the reference's clean median: the op's own cost.
"""

from __future__ import annotations

import ctypes
import gc
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows: faults are not counted there
    resource = None  # type: ignore[assignment]

import torch
from torch import Tensor

from .bench_cases import Case, Fn, reference

__all__ = ["Row", "drop_rates", "fp16_ok", "measure", "saved_bytes", "steady_malloc"]


@dataclass
class Row:
    """The measurements of one implementation in one case (``None``: not measured).

    ``fwd_vs_eager`` and ``fwd_bwd_vs_eager`` are set on compiled rows: their time over the eager
    implementation's time in the same case and run (below 1: compiling pays). ``vs_baseline``:
    in a case with a baseline implementation, the baseline's fwd+bwd time over this row's.
    ``fwd_bwd_faults``: minor page faults per fwd+bwd call (mean); ``fwd_bwd_clean_ms``: the
    median of the fwd+bwd calls that paid no fresh pages, ``clean_calls`` of them;
    ``fwd_bwd_clean_ratio``: that over the reference's (see the module docstring).
    """

    kind: str
    suite: str
    case: str
    shape: str
    p: float
    library: str
    call: str
    fwd_ms: float | None = None
    fwd_ratio: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_bwd_ratio: float | None = None
    fwd_bwd_best_ms: float | None = None
    fwd_bwd_faults: float | None = None
    fwd_bwd_clean_ms: float | None = None
    fwd_bwd_clean_ratio: float | None = None
    clean_calls: int | None = None
    calls: int | None = None
    vs_torchvision: float | None = None
    vs_baseline: float | None = None
    fwd_vs_eager: float | None = None
    fwd_bwd_vs_eager: float | None = None
    saved_bytes: int | None = None
    saved_fraction: float | None = None
    drop_mean: float | None = None
    drop_corner: float | None = None
    drop_centre: float | None = None
    fp16_ok: bool | None = None
    note: str = ""


def _failure(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"failed: {type(err).__name__}: {first}"[:200]


def saved_bytes(fn: Fn, x: Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in ``fn(x)``: each storage once, not ``x``'s."""
    leaf = x.detach().clone().requires_grad_(True)
    input_storage = leaf.untyped_storage().data_ptr()
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() != input_storage:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(leaf)
    return sum(seen.values())


def drop_rates(
    fn: Fn,
    shape: tuple[int, ...],
    spatial_axes: Sequence[int],
    min_samples: int,
    shared_channels: bool = False,
) -> tuple[float, float, float]:
    """Fraction of zeros in ``fn(ones)``: over all elements, at the map's corners, at its centre.

    Draws repeat until at least ``min_samples`` independent maps were seen (a map per sample and
    channel). A mask shared by the channels (channels-first input) is measured on 2048
    single-channel samples instead. The centre is the middle position (the middle 2 per even
    side).
    """
    if shared_channels:
        shape = (2048, 1, *shape[2:])
    dims = len(shape)
    axes = [a % dims for a in spatial_axes]
    corner_idx: dict[int, Tensor] = {}
    centre_idx: list[Any] = [slice(None)] * dims
    for a in axes:
        size = shape[a]
        corner_idx[a] = torch.tensor(sorted({0, size - 1}))
        centre_idx[a] = slice((size - 1) // 2, size // 2 + 1)
    per_draw = math.prod(s for i, s in enumerate(shape) if i not in axes)
    draws = max(1, math.ceil(min_samples / per_draw))
    total = corner = centre = 0.0
    corner_n = centre_n = 0
    ones = torch.ones(shape)
    with torch.no_grad():
        for _ in range(draws):
            dropped = (fn(ones) == 0).to(torch.float64)
            total += float(dropped.mean())
            c = dropped
            for a in axes:  # corners: every combination of {0, size-1} over the spatial axes
                c = c.index_select(a, corner_idx[a])
            corner += float(c.sum())
            corner_n += c.numel()
            m = dropped[tuple(centre_idx)]
            centre += float(m.sum())
            centre_n += m.numel()
    return total / draws, corner / corner_n, centre / centre_n


def fp16_ok(fn: Fn) -> bool:
    """Whether ``fn`` keeps a float16 input finite and not all zero (torchvision's overflows)."""
    with torch.no_grad():
        y = fn(torch.ones(8, 64, 56, 56, dtype=torch.float16))
    return bool(y.isfinite().all()) and bool((y != 0).any())


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


def steady_malloc(enable: bool) -> bool:
    """Make glibc keep freed memory for reuse (or restore its defaults); return whether it did.

    By default glibc serves every tensor larger than a threshold with a fresh ``mmap`` and
    returns it on free, so each call of an op on a big input pays page faults for its output,
    which can swamp the op's own cost on a small machine and differs between ops. With
    ``mmap`` off and no trimming, freed memory is reused, as with the jemalloc/tcmalloc
    allocators that PyTorch's CPU performance guide recommends. Linux with glibc only.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        values = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30} if enable else _GLIBC_DEFAULTS
        return all(libc.mallopt(k, v) == 1 for k, v in values.items())
    except (OSError, AttributeError):
        return False


def _faults() -> int:
    """Minor page faults of this process so far (0 where ``getrusage`` is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _clean_median(times: list[float], faults: list[int], limit: int) -> tuple[float | None, int]:
    """The median of the times whose call faulted in fewer than ``limit`` pages, and their count."""
    clean = [t for t, f in zip(times, faults) if f < limit]
    return (statistics.median(clean) if clean else None), len(clean)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def measure(
    case: Case, repeats: int, warmup: int, tick: Callable[[], None] | None = None, min_samples: int = 8192
) -> list[Row]:
    """Measure every implementation of ``case`` (interleaved when timed) and return one row each."""
    if not case.timed:
        return _calibrate(case, tick)
    if any(impl.eager for impl in case.impls):
        torch._dynamo.reset()  # each case's compiled graphs count alone against the recompile limit
    impls = [reference(), *case.impls]
    runnable = [i for i in impls if i.fn is not None]
    x = case.make_input(case.shape)
    xg = x.detach().clone().requires_grad_(True)
    grad_out = torch.ones_like(x)
    fwd: dict[int, list[float]] = {id(i): [] for i in runnable}
    both: dict[int, list[float]] = {id(i): [] for i in runnable if i.grad}
    both_faults: dict[int, list[int]] = {id(i): [] for i in runnable if i.grad}
    # a call that faulted in an eighth of the output's pages got fresh memory from the allocator
    fresh = max(16, x.numel() * x.element_size() // 4096 // 8)

    def forward(fn: Fn) -> Callable[[], Any]:
        return lambda: fn(x)

    def forward_backward(fn: Fn, params: tuple[Tensor, ...]) -> Callable[[], Any]:
        # allow_unused: a branch skipped for a whole batch (every sample dropped) has no gradient
        return lambda: torch.autograd.grad(fn(xg), (xg, *params), grad_out, allow_unused=bool(params))

    failed: dict[int, str] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(warmup + repeats):
            # alternate the order (A B C, C B A, ...) so that no implementation always goes first
            for impl in runnable if rep % 2 == 0 else runnable[::-1]:
                if id(impl) in failed:
                    continue
                assert impl.fn is not None
                try:
                    t_fwd = _timed(forward(impl.fn))
                    before = _faults()
                    t_both = _timed(forward_backward(impl.fn, impl.params)) if impl.grad else 0.0
                    faulted = _faults() - before
                except Exception as err:  # e.g. a compiler error: report it, time the others
                    failed[id(impl)] = _failure(err)
                    continue
                if rep >= warmup:
                    fwd[id(impl)].append(t_fwd)
                    if impl.grad:
                        both[id(impl)].append(t_both)
                        both_faults[id(impl)].append(faulted)
            if tick is not None:
                tick()
    finally:
        if gc_was_enabled:
            gc.enable()
    ref_fwd = statistics.median(fwd[id(runnable[0])])
    ref_both = statistics.median(both[id(runnable[0])])
    ref_clean, _ = _clean_median(both[id(runnable[0])], both_faults[id(runnable[0])], fresh)
    input_bytes = x.numel() * x.element_size()
    rows = []
    for impl in impls:
        row = Row("speed", case.suite, case.name, _shape_text(case.shape), case.p, impl.library, impl.call)
        row.note = failed.get(id(impl), impl.note)
        if impl.fn is not None and id(impl) not in failed:
            f = statistics.median(fwd[id(impl)])
            row.fwd_ms, row.fwd_ratio = f * 1e3, f / ref_fwd
            if impl.grad:
                b = statistics.median(both[id(impl)])
                row.fwd_bwd_ms, row.fwd_bwd_ratio = b * 1e3, b / ref_both
                row.fwd_bwd_best_ms = min(both[id(impl)]) * 1e3
                row.calls = len(both[id(impl)])
                if resource is not None:
                    row.fwd_bwd_faults = statistics.mean(both_faults[id(impl)])
                    clean, row.clean_calls = _clean_median(both[id(impl)], both_faults[id(impl)], fresh)
                    if clean is not None:
                        row.fwd_bwd_clean_ms = clean * 1e3
                        if ref_clean is not None:
                            row.fwd_bwd_clean_ratio = clean / ref_clean
                try:
                    row.saved_bytes = saved_bytes(impl.fn, x)
                    row.saved_fraction = row.saved_bytes / input_bytes
                except Exception as err:  # saved-tensor hooks are not supported everywhere
                    row.note = f"saved bytes not measured: {_failure(err)}"
            if impl.drops:
                try:
                    row.drop_mean, row.drop_corner, row.drop_centre = drop_rates(
                        impl.fn, case.shape, case.spatial_axes, min_samples, impl.shared_channels
                    )
                except Exception as err:
                    row.note = f"drop rates not measured: {_failure(err)}"
        rows.append(row)
    for row, impl in zip(rows, impls):
        if impl.eager:
            eager = next((r for r in rows if r.call == impl.eager), None)
            if eager is not None and eager.fwd_ms and row.fwd_ms:
                row.fwd_vs_eager = row.fwd_ms / eager.fwd_ms
            if eager is not None and eager.fwd_bwd_ms and row.fwd_bwd_ms:
                row.fwd_bwd_vs_eager = row.fwd_bwd_ms / eager.fwd_bwd_ms
    base = next((row for row, impl in zip(rows, impls) if impl.baseline and row.fwd_bwd_ms), None)
    if base is not None and base.fwd_bwd_ms is not None:
        for row, impl in zip(rows, impls):
            if row.fwd_bwd_ms is not None and impl is not impls[0]:
                row.vs_baseline = base.fwd_bwd_ms / row.fwd_bwd_ms
    tv = next((row for row in rows if row.library == "torchvision" and row.fwd_bwd_ms is not None), None)
    if tv is not None and tv.fwd_bwd_ms is not None:
        for row in rows:
            if row.fwd_bwd_ms is not None:
                row.vs_torchvision = tv.fwd_bwd_ms / row.fwd_bwd_ms
    return rows


def _calibrate(case: Case, tick: Callable[[], None] | None) -> list[Row]:
    rows = []
    for impl in case.impls:
        row = Row(
            "calibration", case.suite, case.name, _shape_text(case.shape), case.p, impl.library, impl.call
        )
        row.note = impl.note
        if impl.fn is not None:
            try:
                row.drop_mean, row.drop_corner, row.drop_centre = drop_rates(
                    impl.fn, case.shape, case.spatial_axes, min_samples=1
                )
                if case.fp16_check:
                    row.fp16_ok = fp16_ok(impl.fn)
            except (RuntimeError, ValueError) as err:  # e.g. a block that does not fit the map
                row.note = _failure(err)
        rows.append(row)
    if tick is not None:
        tick()
    return rows
