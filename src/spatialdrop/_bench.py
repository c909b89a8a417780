"""``spatialdrop bench``: time our layers side by side with torch's, torchvision's and timm's.

Speed cases run their implementations in one process, interleaved repeat by repeat (so that a busy
moment of the machine slows all of them alike), after a warm-up, and report the median of:

- forward time, and forward + backward time (``torch.autograd.grad`` with a ones gradient), each
  also as a ratio to a bare ``x * 2.0`` measured on the same input in the same run, and the
  forward + backward speed-up over torchvision where torchvision has the op;
- the bytes that autograd saves for backward, counted with
  :func:`torch.autograd.graph.saved_tensors_hooks`, each storage once, the input itself not
  counted (it is alive anyway), also as a fraction of the input's bytes;
- the realised drop rate on an all-ones input: over every element, at the corners of the
  spatial map and at its centre (a calibrated layer drops ``p`` everywhere).

Calibration cases (DropBlock suite) only measure the drop rates, on many independent
single-channel maps of a few sizes, and whether float16 input gives a finite, non-zero output.

Peers that are not installed are listed with a note instead of numbers. The measuring code lives
in the package (``benchmarks/`` is not installed); the scripts in ``benchmarks/`` call it.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import importlib.metadata
import io
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._optional import progress

__all__ = [
    "REFERENCE",
    "Case",
    "Impl",
    "Row",
    "calibration_cases",
    "cases_for",
    "drop_rates",
    "dropblock_cases",
    "environment",
    "format_rows",
    "measure",
    "run_bench",
    "saved_bytes",
    "spatial_cases",
]

CMD = "bench"
REFERENCE = "x * 2.0"
Fn = Callable[[Tensor], Tensor]


@dataclass
class Impl:
    """One implementation in a case: a callable ``input -> output``, or a note saying why not."""

    library: str
    call: str
    fn: Fn | None
    note: str = ""
    drops: bool = True
    shared_channels: bool = False
    grad: bool = True


@dataclass
class Case:
    """One input shape and the implementations compared on it.

    ``timed`` cases get the ``x * 2.0`` reference and every measurement; the others (calibration)
    only the drop rates, plus the float16 check when ``fp16_check`` is set.
    """

    suite: str
    name: str
    shape: tuple[int, ...]
    spatial_axes: tuple[int, ...]
    impls: list[Impl]
    p: float
    timed: bool = True
    fp16_check: bool = False
    make_input: Callable[[tuple[int, ...]], Tensor] = field(default=lambda shape: torch.randn(shape))


@dataclass
class Row:
    """The measurements of one implementation in one case (``None``: not measured)."""

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
    vs_torchvision: float | None = None
    saved_bytes: int | None = None
    saved_fraction: float | None = None
    drop_mean: float | None = None
    drop_corner: float | None = None
    drop_centre: float | None = None
    fp16_ok: bool | None = None
    note: str = ""


# --- the implementations ------------------------------------------------------------------------


def _missing(library: str, call: str, err: Exception) -> Impl:
    return Impl(library, call, None, note=f"{library} not installed ({type(err).__name__})")


def _reference() -> Impl:
    return Impl("torch", REFERENCE, lambda x: x * 2.0, drops=False)


def spatial_cases(quick: bool, p: float) -> list[Case]:
    """Issue 2's suite: channel dropout against torch's ``dropout1d/2d/3d`` and the permute habit."""
    from .spatial_dropout import spatial_dropout

    def ours(channel_dim: int = 1) -> Impl:
        call = "spatial_dropout(x, p" + ("" if channel_dim == 1 else f", channel_dim={channel_dim}") + ")"
        return Impl("spatialdrop", call, lambda x: spatial_dropout(x, p, channel_dim=channel_dim))

    def torch_fn(rank: int) -> Impl:
        fn = {1: F.dropout1d, 2: F.dropout2d, 3: F.dropout3d}[rank]
        return Impl("torch", f"F.dropout{rank}d(x, p)", lambda x: fn(x, p))

    habit = Impl(
        "torch",
        "F.dropout1d(x.permute(0, 2, 1), p).permute(0, 2, 1)",
        lambda x: F.dropout1d(x.permute(0, 2, 1), p).permute(0, 2, 1),
    )
    if quick:
        shapes = [(8, 64, 28, 28), (16, 128, 14, 14), (2, 16, 16, 16, 16), (8, 256, 128)]
    else:
        shapes = [(32, 64, 56, 56), (64, 256, 14, 14), (8, 32, 32, 32, 32), (32, 512, 256)]
    return [
        Case("spatial", "2-D maps", shapes[0], (2, 3), [ours(), torch_fn(2)], p),
        Case("spatial", "2-D maps, many channels", shapes[1], (2, 3), [ours(), torch_fn(2)], p),
        Case("spatial", "3-D volumes", shapes[2], (2, 3, 4), [ours(), torch_fn(3)], p),
        Case("spatial", "channels-last sequences (N, L, C)", shapes[3], (1,), [ours(-1), habit], p),
    ]


def _timm_drop_block() -> Callable[..., Tensor]:
    try:
        from timm.layers import drop_block_2d
    except ImportError:  # older timm
        from timm.models.layers import drop_block_2d
    fn: Callable[..., Tensor] = drop_block_2d
    return fn


def _torchvision(rank: int, p: float, block: int) -> Impl:
    call = f"torchvision.ops.drop_block{rank}d(x, p, {block})"
    try:
        import torchvision.ops as ops
    except ImportError as err:
        return _missing("torchvision", call, err)
    fn = {2: ops.drop_block2d, 3: ops.drop_block3d}[rank]
    return Impl("torchvision", call, lambda x: fn(x, p, block))


def _timm(p: float, block: int, couple: bool) -> Impl:
    call = f"timm drop_block_2d(x, p, {block}, couple_channels={couple})"
    try:
        fn = _timm_drop_block()
    except ImportError as err:
        return _missing("timm", call, err)
    return Impl("timm", call, lambda x: fn(x, p, block, couple_channels=couple), shared_channels=couple)


def _package(rank: int, p: float, block: int) -> Impl:
    call = f"dropblock.DropBlock{rank}D(p, {block})"
    try:
        import dropblock
    except ImportError as err:
        return _missing("dropblock", call, err)
    layer = {2: dropblock.DropBlock2D, 3: dropblock.DropBlock3D}[rank](p, block)
    return Impl("dropblock", call, layer, shared_channels=True)


def _ours_block(p: float, block: int, shared: bool = False, seeding: str = "uniform") -> Impl:
    from .drop_block import drop_block

    options = (", shared_channels=True" if shared else "") + (
        f", seeding={seeding!r}" if seeding != "uniform" else ""
    )
    call = f"drop_block(x, p, {block}{options})"
    return Impl(
        "spatialdrop",
        call,
        lambda x: drop_block(x, p, block, shared_channels=shared, seeding=seeding),
        shared_channels=shared,
    )


def dropblock_cases(quick: bool, p: float) -> list[Case]:
    """Issue 3's speed suite: DropBlock against torchvision, timm and the ``dropblock`` package."""
    two = (8, 64, 28, 28) if quick else (32, 256, 28, 28)
    three = (2, 16, 16, 16, 16) if quick else (8, 32, 32, 32, 32)
    one = (8, 64, 784) if quick else (32, 256, 784)
    return [
        Case(
            "dropblock",
            "2-D, block 7, a mask per channel",
            two,
            (2, 3),
            [_ours_block(p, 7), _torchvision(2, p, 7), _timm(p, 7, couple=False)],
            p,
        ),
        Case(
            "dropblock",
            "2-D, block 7, one mask shared by the channels",
            two,
            (2, 3),
            [_ours_block(p, 7, shared=True), _timm(p, 7, couple=True), _package(2, p, 7)],
            p,
        ),
        Case(
            "dropblock",
            "3-D, block 5, a mask per channel",
            three,
            (2, 3, 4),
            [_ours_block(p, 5), _torchvision(3, p, 5)],
            p,
        ),
        Case(
            "dropblock",
            "3-D, block 5, one mask shared by the channels",
            three,
            (2, 3, 4),
            [_ours_block(p, 5, shared=True), _package(3, p, 5)],
            p,
        ),
        Case(
            "dropblock",
            "1-D, block 7 (no peer has a DropBlock1d)",
            one,
            (2,),
            [_ours_block(p, 7), _ours_block(p, 7, shared=True)],
            p,
        ),
    ]


def family_cases(quick: bool, p: float) -> list[Case]:
    """Issue 4's layers: DropPath, Gaussian and alpha spatial dropout, filter dropout, and peers."""
    from torch import nn

    from .filter_dropout import filter_dropout
    from .functional import alpha_spatial_dropout, drop_path, gaussian_spatial_dropout

    maps = (8, 64, 28, 28) if quick else (32, 64, 56, 56)
    path = [Impl("spatialdrop", "drop_path(x, p)", lambda x: drop_path(x, p), shared_channels=True)]
    try:
        from timm.layers import drop_path as timm_drop_path

        timm_call = "timm drop_path(x, p, True)"
        path.append(Impl("timm", timm_call, lambda x: timm_drop_path(x, p, True), shared_channels=True))
    except ImportError as err:
        path.append(_missing("timm", "timm drop_path(x, p, True)", err))
    tv_call = 'torchvision.ops.stochastic_depth(x, p, "row")'
    try:
        from torchvision.ops import stochastic_depth

        path.append(
            Impl("torchvision", tv_call, lambda x: stochastic_depth(x, p, "row"), shared_channels=True)
        )
    except ImportError as err:
        path.append(_missing("torchvision", tv_call, err))
    gaussian = Impl(
        "spatialdrop", "gaussian_spatial_dropout(x, p)", lambda x: gaussian_spatial_dropout(x, p), drops=False
    )
    alpha = [
        Impl(
            "spatialdrop", "alpha_spatial_dropout(x, p)", lambda x: alpha_spatial_dropout(x, p), drops=False
        ),
        Impl(
            "torch",
            "F.feature_alpha_dropout(x, p, True)",
            lambda x: F.feature_alpha_dropout(x, p, True),
            drops=False,
        ),
    ]
    conv_in = (8, 64, 14, 14) if quick else (32, 64, 28, 28)
    torch.manual_seed(0)
    plain = nn.Conv2d(64, 64, 3, padding=1)
    dropped = filter_dropout(nn.Conv2d(64, 64, 3, padding=1), p)
    convs = [
        Impl("torch", "nn.Conv2d(64, 64, 3)(x)", plain, drops=False),
        Impl("spatialdrop", "filter_dropout(nn.Conv2d(64, 64, 3), p)(x)", dropped, drops=False),
    ]
    return [
        Case("family", "DropPath (a draw per sample)", maps, (2, 3), path, p),
        Case("family", "Gaussian spatial dropout", maps, (2, 3), [gaussian], p),
        Case("family", "alpha spatial dropout", maps, (2, 3), alpha, p),
        Case("family", "filter dropout on a 3x3 conv", conv_in, (2, 3), convs, p),
    ]


def keyed_cases(quick: bool, p: float) -> list[Case]:
    """Issue 6: keyed spatial dropout (masks from a counter-based key) against the unkeyed one."""
    from .functional import spatial_dropout
    from .keyed import MaskKey, keyed_uniform

    def keyed(key: MaskKey) -> Fn:
        return lambda x: spatial_dropout(x, p, key=key)

    def draws(key: MaskKey, channels: int) -> Fn:
        return lambda x: keyed_uniform(key, channels)

    cases = []
    shapes = [(8, 64, 28, 28), (16, 256, 7, 7)] if quick else [(32, 64, 56, 56), (64, 256, 14, 14)]
    for shape in shapes:
        n, c = shape[0], shape[1]
        key = MaskKey(seed=1234, step=7, layer=42, sample_ids=torch.arange(n))
        impls = [
            Impl("spatialdrop", "spatial_dropout(x, p)", lambda x: spatial_dropout(x, p)),
            Impl("spatialdrop", "spatial_dropout(x, p, key=key)", keyed(key)),
            Impl("torch", "F.dropout2d(x, p)", lambda x: F.dropout2d(x, p)),
            Impl(
                "spatialdrop",
                f"keyed_uniform(key, {c}) (the draws alone)",
                draws(key, c),
                drops=False,
                grad=False,
            ),
        ]
        cases.append(Case("keyed", "keyed vs unkeyed channel masks", shape, (2, 3), impls, p))
    return cases


CALIBRATION = [(28, 7, 0.1), (14, 5, 0.3), (7, 3, 0.3), (56, 7, 0.3), (7, 7, 0.1)]


def calibration_cases(quick: bool) -> list[Case]:
    """Drop rates of every 2-D DropBlock on independent single-channel maps (``p`` fixed per case)."""
    maps = 1024 if quick else 8192
    cases = []
    for i, (size, block, p) in enumerate(CALIBRATION):
        impls = [
            _ours_block(p, block),
            _ours_block(p, block, seeding="valid"),
            _torchvision(2, p, block),
            _timm(p, block, couple=True),
            _timm(p, block, couple=False),
            _package(2, p, block),
        ]
        name = f"{size}x{size} map, block {block}, p {p}"
        shape = (maps, 1, size, size)
        cases.append(Case("dropblock", name, shape, (2, 3), impls, p, timed=False, fp16_check=i == 0))
    return cases


def cases_for(suite: str, quick: bool, p: float) -> list[Case]:
    """The cases of ``suite`` (``spatial``, ``dropblock`` or ``all``)."""
    cases: list[Case] = []
    if suite in ("spatial", "all"):
        cases += spatial_cases(quick, p)
    if suite in ("dropblock", "all"):
        cases += dropblock_cases(quick, p) + calibration_cases(quick)
    if suite in ("family", "all"):
        cases += family_cases(quick, p)
    if suite in ("keyed", "all"):
        cases += keyed_cases(quick, p)
    return cases


# --- measuring ----------------------------------------------------------------------------------


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
    which swamps the op's own cost by 2-4x on a small machine and differs between ops. With
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


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def measure(
    case: Case, repeats: int, warmup: int, tick: Callable[[], None] | None = None, min_samples: int = 8192
) -> list[Row]:
    """Measure every implementation of ``case`` (interleaved when timed) and return one row each."""
    if not case.timed:
        return _calibrate(case, tick)
    impls = [_reference(), *case.impls]
    runnable = [i for i in impls if i.fn is not None]
    x = case.make_input(case.shape)
    xg = x.detach().clone().requires_grad_(True)
    grad_out = torch.ones_like(x)
    fwd: dict[int, list[float]] = {id(i): [] for i in runnable}
    both: dict[int, list[float]] = {id(i): [] for i in runnable if i.grad}

    def forward(fn: Fn) -> Callable[[], Any]:
        return lambda: fn(x)

    def forward_backward(fn: Fn) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(fn(xg), xg, grad_out)

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(warmup + repeats):
            # alternate the order (A B C, C B A, ...) so that no implementation always goes first
            for impl in runnable if rep % 2 == 0 else runnable[::-1]:
                assert impl.fn is not None
                t_fwd = _timed(forward(impl.fn))
                t_both = _timed(forward_backward(impl.fn)) if impl.grad else 0.0
                if rep >= warmup:
                    fwd[id(impl)].append(t_fwd)
                    if impl.grad:
                        both[id(impl)].append(t_both)
            if tick is not None:
                tick()
    finally:
        if gc_was_enabled:
            gc.enable()
    ref_fwd = statistics.median(fwd[id(runnable[0])])
    ref_both = statistics.median(both[id(runnable[0])])
    input_bytes = x.numel() * x.element_size()
    rows = []
    for impl in impls:
        row = Row("speed", case.suite, case.name, _shape_text(case.shape), case.p, impl.library, impl.call)
        row.note = impl.note
        if impl.fn is not None:
            f = statistics.median(fwd[id(impl)])
            row.fwd_ms, row.fwd_ratio = f * 1e3, f / ref_fwd
            if impl.grad:
                b = statistics.median(both[id(impl)])
                row.fwd_bwd_ms, row.fwd_bwd_ratio = b * 1e3, b / ref_both
                row.fwd_bwd_best_ms = min(both[id(impl)]) * 1e3
                row.saved_bytes = saved_bytes(impl.fn, x)
                row.saved_fraction = row.saved_bytes / input_bytes
            if impl.drops:
                row.drop_mean, row.drop_corner, row.drop_centre = drop_rates(
                    impl.fn, case.shape, case.spatial_axes, min_samples, impl.shared_channels
                )
        rows.append(row)
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
                row.note = f"{type(err).__name__}: {err}"
        rows.append(row)
    if tick is not None:
        tick()
    return rows


# --- environment and output ---------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(threads: int, malloc: str = "default") -> dict[str, Any]:
    """The machine and the libraries the numbers come from."""
    from . import __version__

    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "load_average_before": load,
        "malloc": malloc,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "spatialdrop": __version__,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "dropblock": _version("dropblock"),
    }


SPEED_COLUMNS = [
    ("case", "case"),
    ("shape", "shape"),
    ("library", "library"),
    ("call", "call"),
    ("fwd_ms", "fwd ms"),
    ("fwd_ratio", f"fwd / {REFERENCE}"),
    ("fwd_bwd_ms", "fwd+bwd ms"),
    ("fwd_bwd_ratio", f"fwd+bwd / {REFERENCE}"),
    ("fwd_bwd_best_ms", "fwd+bwd best ms"),
    ("vs_torchvision", "fwd+bwd speed-up vs torchvision"),
    ("saved_bytes", "saved for bwd"),
    ("drop_mean", "drop mean"),
    ("drop_corner", "drop corner"),
    ("drop_centre", "drop centre"),
    ("note", "note"),
]
CALIBRATION_COLUMNS = [
    ("case", "case"),
    ("library", "library"),
    ("call", "call"),
    ("drop_mean", "drop mean"),
    ("drop_corner", "drop corner"),
    ("drop_centre", "drop centre"),
    ("fp16_ok", "float16 finite, not all zero"),
    ("note", "note"),
]
TEXT_KEYS = ("case", "shape", "library", "call", "note")


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "—"
    if key == "saved_bytes":
        return f"{_human_bytes(value)} ({100 * (row.saved_fraction or 0):.1f}%)"
    if key.endswith("_ms"):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if key.endswith("_ratio") or key == "vs_torchvision":
        return f"{value:.2f}×" if value < 100 else f"{value:.0f}×"
    if key.startswith("drop_"):
        return f"{value:.3f}"
    if key == "fp16_ok":
        return "yes" if value else "NO"
    return str(value)


def _markdown(rows: list[Row], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(t for _, t in columns) + " |"]
    lines.append("|" + "|".join("---" if k in TEXT_KEYS else "---:" for k, _ in columns) + "|")
    for r in rows:
        cells = [_cell(r, k) for k, _ in columns]
        cells = [f"`{c}`" if k == "call" else c for (k, _), c in zip(columns, cells)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _plain(rows: list[Row], columns: list[tuple[str, str]], title: Callable[[Row], str]) -> list[str]:
    keys = [k for k, _ in columns]
    titles = [t for _, t in columns]
    widths = [max(len(t), *(len(_cell(r, k)) for r in rows)) for k, t in zip(keys, titles)]
    out = []
    for heading, group in itertools.groupby(rows, key=title):
        out.append(heading)
        out.append(
            "  ".join(t.ljust(w) if k in TEXT_KEYS else t.rjust(w) for k, t, w in zip(keys, titles, widths))
        )
        for r in group:
            cells = [_cell(r, k) for k in keys]
            line = "  ".join(
                c.ljust(w) if k in TEXT_KEYS else c.rjust(w) for k, c, w in zip(keys, cells, widths)
            )
            out.append(line.rstrip())
        out.append("")
    return out


@dataclass
class Goal:
    """A speed or memory goal of the issues, checked on the measured rows."""

    issue: int
    what: str
    measured: float
    limit: float
    at_least: bool

    @property
    def met(self) -> bool:
        """Whether the measured value meets the goal."""
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def __str__(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "met" if self.met else "MISSED"
        return f"issue {self.issue}: {self.what}: {self.measured:.3g} (goal {sign} {self.limit:g}) {verdict}"


def _find(rows: list[Row], case: str, call: str) -> Row | None:
    return next((r for r in rows if r.case.startswith(case) and r.call.startswith(call) and r.fwd_ms), None)


def goals(rows: list[Row]) -> list[Goal]:
    """The goals of issues 2 and 3 that the measured rows can check (medians)."""
    out: list[Goal] = []
    for case in ("2-D maps", "3-D volumes", "channels-last"):
        for r in rows:
            if r.suite != "spatial" or not r.case.startswith(case) or r.library != "spatialdrop":
                continue
            peer = next(t for t in rows if t.case == r.case and t.library == "torch" and t.call != REFERENCE)
            if not (r.fwd_ms and r.fwd_bwd_ms and r.fwd_ratio and peer.fwd_ms and peer.fwd_bwd_ms):
                continue
            where = f"{r.case} {r.shape}"
            out.append(Goal(2, f"{where}: torch time / ours, forward", peer.fwd_ms / r.fwd_ms, 0.95, True))
            out.append(
                Goal(2, f"{where}: torch time / ours, fwd+bwd", peer.fwd_bwd_ms / r.fwd_bwd_ms, 0.95, True)
            )
            out.append(Goal(2, f"{where}: ours / x * 2.0, forward", r.fwd_ratio, 1.2, False))
            out.append(Goal(2, f"{where}: ours / x * 2.0, fwd+bwd", r.fwd_bwd_ratio or 0.0, 1.2, False))
    per2 = _find(rows, "2-D, block 7, a mask per channel", "drop_block(")
    if per2 is not None and per2.fwd_bwd_ratio is not None and per2.saved_fraction is not None:
        out.append(Goal(3, f"2-D per-channel {per2.shape}: fwd+bwd / x * 2.0", per2.fwd_bwd_ratio, 4, False))
        if per2.vs_torchvision is not None:
            out.append(Goal(3, "2-D per-channel: speed-up over torchvision", per2.vs_torchvision, 20, True))
        out.append(
            Goal(3, "2-D per-channel: saved for backward / input bytes", per2.saved_fraction, 0.25, False)
        )
    shared2 = _find(rows, "2-D, block 7, one mask", "drop_block(")
    if shared2 is not None and shared2.fwd_bwd_ratio is not None:
        out.append(Goal(3, f"2-D shared {shared2.shape}: fwd+bwd / x * 2.0", shared2.fwd_bwd_ratio, 2, False))
    per3 = _find(rows, "3-D, block 5, a mask per channel", "drop_block(")
    if per3 is not None and per3.vs_torchvision is not None:
        out.append(
            Goal(3, f"3-D per-channel {per3.shape}: speed-up over torchvision", per3.vs_torchvision, 20, True)
        )
    return out


def format_rows(
    rows: list[Row], fmt: str, env: dict[str, Any], command: str, checked: Sequence[Goal] = ()
) -> str:
    """The rows as ``table``, ``markdown``, ``json`` or ``csv`` text, with the ``checked`` goals."""
    if fmt == "json":
        report = {
            "command": command,
            "environment": env,
            "rows": [asdict(r) for r in rows],
            "goals": [{**asdict(g), "met": g.met} for g in checked],
        }
        return json.dumps(report, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[f.name for f in Row.__dataclass_fields__.values()])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
        return buf.getvalue()
    machine = (
        f"{env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}, load average "
        f"before {env['load_average_before']}, malloc {env['malloc']}; torch {env['torch']}, "
        f"torchvision {env['torchvision']}, "
        f"timm {env['timm']}, dropblock {env['dropblock']}; {env['platform']}"
    )
    about = (
        f"speed: median of interleaved repeats after warm-up, ratios to {REFERENCE} on the same input in "
        "the same run; saved for bwd: bytes autograd keeps beyond the input (% of the input's); "
        "drop rates on an all-ones input"
    )
    speed = [r for r in rows if r.kind == "speed"]
    calibration = [r for r in rows if r.kind == "calibration"]
    if fmt == "markdown":
        lines = [f"Command: `{command}`  ", f"Machine: {machine}  ", f"{about}.", ""]
        if speed:
            lines += [*_markdown(speed, SPEED_COLUMNS), ""]
        if calibration:
            lines += [
                "Calibration: fraction dropped over many independent single-channel maps "
                "(p asked in the case name).",
                "",
                *_markdown(calibration, CALIBRATION_COLUMNS),
                "",
            ]
        if checked:
            lines += ["Goals of the issues, checked on the medians above:", ""]
            lines += [f"- {g}" for g in checked] + [""]
        return "\n".join(lines)
    out = [f"command: {command}", f"machine: {machine}", about, ""]
    if speed:
        plain_speed = [(k, t) for k, t in SPEED_COLUMNS if k not in ("case", "shape")]
        out += _plain(speed, plain_speed, lambda r: f"[{r.suite}] {r.case}, input {r.shape}, p {r.p}")
    if calibration:
        plain_cal = [(k, t) for k, t in CALIBRATION_COLUMNS if k != "case"]
        out += _plain(
            calibration, plain_cal, lambda r: f"[calibration] {r.case}, {r.shape.split('x')[0]} maps"
        )
    if checked:
        out += ["goals of the issues, checked on the medians above:", *(f"  {g}" for g in checked), ""]
    return "\n".join(out)


def run_bench(
    *,
    suite: str = "all",
    fmt: str = "table",
    out: Path | None = None,
    quick: bool = False,
    repeats: int | None = None,
    threads: int | None = None,
    p: float = 0.1,
    seed: int = 0,
    show_progress: bool = True,
    command: str = "",
    steady: bool = True,
) -> int:
    """Run the suite, print or write the rows in ``fmt``; return the exit code."""
    threads_before = torch.get_num_threads()
    threads = threads or 1
    repeats = repeats or (5 if quick else 15)
    warmup = 1 if quick else 3
    tuned = steady and steady_malloc(True)
    malloc = "glibc, mmap off and no trim (freed memory reused)" if tuned else "default"
    env = environment(threads, malloc)  # the load average before the run
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    try:
        cases = cases_for(suite, quick, p)
        total = sum(warmup + repeats if c.timed else 1 for c in cases)
        rows: list[Row] = []
        with progress(CMD, total=total, desc=f"bench {suite}", enabled=show_progress, unit="round") as bar:
            for case in cases:
                bar.set_postfix_str(case.name)
                rows += measure(case, repeats, warmup, tick=lambda: bar.update(1))
    finally:
        torch.set_num_threads(threads_before)
        if tuned:
            steady_malloc(False)
    # the goals name the issues' shapes: --quick runs smaller ones
    text = format_rows(rows, fmt, env, command, [] if quick else goals(rows))
    if out is None:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {out}")
    return 0
