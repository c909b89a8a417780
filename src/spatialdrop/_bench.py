"""``spatialdrop bench``: time our layers side by side with torch's, torchvision's and timm's.

Every case runs its implementations in one process, interleaved repeat by repeat (so that a busy
moment of the machine hits all of them alike), after a warm-up, and reports the median:

- forward time, and forward + backward time (``torch.autograd.grad`` with a ones gradient), each
  also as a ratio to a bare ``x * 2.0`` measured in the same run;
- the bytes saved for backward, counted with :func:`torch.autograd.graph.saved_tensors_hooks`
  (each storage once), and as a fraction of the input's bytes;
- the realised drop rate on an all-ones input: over every element, at the corners of the
  spatial map and at its centre (a uniform layer drops ``p`` everywhere).

Peers that are not installed are listed with a note instead of numbers. The measuring code lives
in the package (``benchmarks/`` is not installed); the scripts in ``benchmarks/`` call it.
"""

from __future__ import annotations

import csv
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
    "SUITES",
    "Case",
    "Impl",
    "Row",
    "dropblock_cases",
    "environment",
    "format_rows",
    "measure",
    "run_bench",
    "saved_bytes",
    "spatial_cases",
]

CMD = "bench"
SUITES = ("spatial", "dropblock")
REFERENCE = "x * 2.0"


@dataclass
class Impl:
    """One implementation in a case: a callable ``input -> output``, or a note saying why not."""

    library: str
    call: str
    fn: Callable[[Tensor], Tensor] | None
    note: str = ""
    drops: bool = True


@dataclass
class Case:
    """One input shape and the implementations compared on it (the reference is added)."""

    suite: str
    name: str
    shape: tuple[int, ...]
    spatial_axes: tuple[int, ...]
    impls: list[Impl]
    p: float
    shared_channels: bool = False
    make_input: Callable[[tuple[int, ...]], Tensor] = field(default=lambda shape: torch.randn(shape))


@dataclass
class Row:
    """The measurements of one implementation in one case (``None``: not measured)."""

    suite: str
    case: str
    shape: str
    library: str
    call: str
    fwd_ms: float | None = None
    fwd_ratio: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_bwd_ratio: float | None = None
    saved_bytes: int | None = None
    saved_fraction: float | None = None
    drop_mean: float | None = None
    drop_corner: float | None = None
    drop_centre: float | None = None
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
        call = (
            "spatial_dropout(x, p)"
            if channel_dim == 1
            else f"spatial_dropout(x, p, channel_dim={channel_dim})"
        )
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
    cases = [
        Case("spatial", "2-D maps", shapes[0], (2, 3), [ours(), torch_fn(2)], p),
        Case("spatial", "2-D maps, many channels", shapes[1], (2, 3), [ours(), torch_fn(2)], p),
        Case("spatial", "3-D volumes", shapes[2], (2, 3, 4), [ours(), torch_fn(3)], p),
        Case("spatial", "channels-last sequences (N, L, C)", shapes[3], (1,), [ours(-1), habit], p),
    ]
    return cases


def _timm_drop_block() -> Callable[..., Tensor]:
    try:
        from timm.layers import drop_block_2d
    except ImportError:  # older timm
        from timm.models.layers import drop_block_2d
    fn: Callable[..., Tensor] = drop_block_2d
    return fn


def dropblock_cases(quick: bool, p: float) -> list[Case]:
    """Issue 3's suite: DropBlock against torchvision, timm and the ``dropblock`` package."""
    from .drop_block import drop_block

    cases: list[Case] = []

    def tv(rank: int, block: int) -> Impl:
        call = f"torchvision.ops.drop_block{rank}d(x, p, {block})"
        try:
            import torchvision.ops as ops
        except ImportError as err:
            return _missing("torchvision", call, err)
        fn = {2: ops.drop_block2d, 3: ops.drop_block3d}[rank]
        return Impl("torchvision", call, lambda x: fn(x, p, block))

    def timm(block: int, couple: bool) -> Impl:
        call = f"timm drop_block_2d(x, p, {block}, couple_channels={couple})"
        try:
            fn = _timm_drop_block()
        except ImportError as err:
            return _missing("timm", call, err)
        return Impl("timm", call, lambda x: fn(x, p, block, couple_channels=couple))

    def package(rank: int, block: int) -> Impl:
        call = f"dropblock.DropBlock{rank}D(p, {block})"
        try:
            import dropblock
        except ImportError as err:
            return _missing("dropblock", call, err)
        layer = {2: dropblock.DropBlock2D, 3: dropblock.DropBlock3D}[rank](p, block)
        return Impl("dropblock", call, layer)

    def ours(block: int, shared: bool = False) -> Impl:
        call = f"drop_block(x, p, {block}" + (", shared_channels=True)" if shared else ")")
        return Impl("spatialdrop", call, lambda x: drop_block(x, p, block, shared_channels=shared))

    big2 = (8, 64, 28, 28) if quick else (32, 256, 28, 28)
    big3 = (2, 16, 16, 16, 16) if quick else (8, 32, 32, 32, 32)
    cases.append(
        Case(
            "dropblock",
            "2-D, block 7, a mask per channel",
            big2,
            (2, 3),
            [ours(7), tv(2, 7), timm(7, couple=False)],
            p,
        )
    )
    cases.append(
        Case(
            "dropblock",
            "2-D, block 7, one mask shared by the channels",
            big2,
            (2, 3),
            [ours(7, shared=True), timm(7, couple=True), package(2, 7)],
            p,
            shared_channels=True,
        )
    )
    cases.append(
        Case("dropblock", "3-D, block 5, a mask per channel", big3, (2, 3, 4), [ours(5), tv(3, 5)], p)
    )
    small = (16, 64, 14, 14) if quick else (64, 64, 14, 14)
    cases.append(
        Case(
            "dropblock",
            "2-D small maps, block 5, a mask per channel",
            small,
            (2, 3),
            [ours(5), tv(2, 5), timm(5, couple=False)],
            p,
        )
    )
    return cases


# --- measuring ----------------------------------------------------------------------------------


def saved_bytes(fn: Callable[[Tensor], Tensor], x: Tensor) -> int:
    """Bytes of the tensors that autograd saves for backward in ``fn(x)``, each storage once."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
            seen[(id(t), "?")] = t.numel() * t.element_size()
        return t

    leaf = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(leaf)
    return sum(seen.values())


def drop_rates(
    fn: Callable[[Tensor], Tensor],
    shape: tuple[int, ...],
    spatial_axes: Sequence[int],
    min_samples: int,
    shared_channels: bool = False,
) -> tuple[float, float, float]:
    """Fraction of zeros in ``fn(ones)``: over all elements, at the map's corners, at its centre.

    Draws repeat until at least ``min_samples`` independent maps were seen (a map per sample and
    channel). A mask shared by the channels (channels-first input) is measured on
    ``min_samples`` single-channel samples instead.
    """
    if shared_channels:
        shape = (min_samples, 1, *shape[2:])
    dims = len(shape)
    axes = [a % dims for a in spatial_axes]
    corner_idx: list[Any] = [slice(None)] * dims
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
            for a in axes:  # corners: the product of {0, size-1} over the spatial axes
                c = c.index_select(a, corner_idx[a])
            corner += float(c.sum())
            corner_n += c.numel()
            m = dropped[tuple(centre_idx)]
            centre += float(m.sum())
            centre_n += m.numel()
    return total / draws, corner / corner_n, centre / centre_n


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    case: Case, repeats: int, warmup: int, tick: Callable[[], None] | None = None, min_samples: int = 8192
) -> list[Row]:
    """Measure every implementation of ``case``, interleaved, and return one row each."""
    impls = [_reference(), *case.impls]
    runnable = [i for i in impls if i.fn is not None]
    x = case.make_input(case.shape)
    xg = x.detach().clone().requires_grad_(True)
    fwd: dict[int, list[float]] = {id(i): [] for i in runnable}
    both: dict[int, list[float]] = {id(i): [] for i in runnable}
    grad_out = torch.ones_like(x)

    def forward(impl: Impl) -> Callable[[], Any]:
        assert impl.fn is not None
        fn = impl.fn
        return lambda: fn(x)

    def forward_backward(impl: Impl) -> Callable[[], Any]:
        assert impl.fn is not None
        fn = impl.fn
        return lambda: torch.autograd.grad(fn(xg), xg, grad_out)

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + repeats):
            for impl in runnable:
                t_fwd = _timed(forward(impl))
                t_both = _timed(forward_backward(impl))
                if r >= warmup:
                    fwd[id(impl)].append(t_fwd)
                    both[id(impl)].append(t_both)
            if tick is not None:
                tick()
    finally:
        if gc_was_enabled:
            gc.enable()
    ref = runnable[0]
    ref_fwd = statistics.median(fwd[id(ref)])
    ref_both = statistics.median(both[id(ref)])
    input_bytes = x.numel() * x.element_size()
    rows = []
    for impl in impls:
        row = Row(
            case.suite, case.name, "x".join(map(str, case.shape)), impl.library, impl.call, note=impl.note
        )
        if impl.fn is not None:
            f = statistics.median(fwd[id(impl)])
            b = statistics.median(both[id(impl)])
            row.fwd_ms, row.fwd_ratio = f * 1e3, f / ref_fwd
            row.fwd_bwd_ms, row.fwd_bwd_ratio = b * 1e3, b / ref_both
            row.saved_bytes = saved_bytes(impl.fn, x)
            row.saved_fraction = row.saved_bytes / input_bytes
            if impl.drops:
                row.drop_mean, row.drop_corner, row.drop_centre = drop_rates(
                    impl.fn, case.shape, case.spatial_axes, min_samples, case.shared_channels
                )
        rows.append(row)
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


def environment(threads: int) -> dict[str, Any]:
    """The machine and the libraries the numbers come from."""
    from . import __version__

    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "spatialdrop": __version__,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "dropblock": _version("dropblock"),
    }


COLUMNS = [
    ("case", "case"),
    ("shape", "shape"),
    ("library", "library"),
    ("call", "call"),
    ("fwd_ms", "fwd ms"),
    ("fwd_ratio", f"fwd / {REFERENCE}"),
    ("fwd_bwd_ms", "fwd+bwd ms"),
    ("fwd_bwd_ratio", f"fwd+bwd / {REFERENCE}"),
    ("saved_bytes", "saved for bwd"),
    ("drop_mean", "drop mean"),
    ("drop_corner", "drop corner"),
    ("drop_centre", "drop centre"),
    ("note", "note"),
]


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "—"
    if key == "saved_bytes":
        return f"{_human_bytes(value)} ({100 * (row.saved_fraction or 0):.1f}%)"
    if key.endswith("_ms"):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if key.endswith("_ratio"):
        return f"{value:.2f}×"
    if key.startswith("drop_"):
        return f"{value:.3f}"
    return str(value)


def format_rows(rows: list[Row], fmt: str, env: dict[str, Any], command: str) -> str:
    """The rows as ``table``, ``markdown``, ``json`` or ``csv`` text."""
    if fmt == "json":
        return json.dumps(
            {"command": command, "environment": env, "rows": [asdict(r) for r in rows]}, indent=1
        )
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(asdict(rows[0]) if rows else []), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
        return buf.getvalue()
    machine = (
        f"{env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}; "
        f"torch {env['torch']}, torchvision {env['torchvision']}, timm {env['timm']}, "
        f"dropblock {env['dropblock']}; {env['platform']}"
    )
    about = (
        f"median of the timed repeats; ratios to {REFERENCE} on the same input in the same run; "
        "drop rates on an all-ones input"
    )
    header = [title for _, title in COLUMNS]
    if fmt == "markdown":
        lines = [f"Command: `{command}`  ", f"Machine: {machine}  ", f"{about}.", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append(
            "|"
            + "|".join(
                "---" if k in ("case", "shape", "library", "call", "note") else "---:" for k, _ in COLUMNS
            )
            + "|"
        )
        for r in rows:
            cells = [_cell(r, k) for k, _ in COLUMNS]
            cells[3] = f"`{cells[3]}`"
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines) + "\n"
    # plain table, one block per case
    out = [f"command: {command}", f"machine: {machine}", f"{about}", ""]
    keys = [k for k, _ in COLUMNS if k not in ("case", "shape")]
    titles = [t for k, t in COLUMNS if k not in ("case", "shape")]
    widths = [max(len(t), *(len(_cell(r, k)) for r in rows)) for k, t in zip(keys, titles)]
    for (suite, case, shape), group in itertools.groupby(rows, key=lambda r: (r.suite, r.case, r.shape)):
        out.append(f"[{suite}] {case}, input {shape}")
        out.append(
            "  ".join(t.ljust(w) if i < 2 else t.rjust(w) for i, (t, w) in enumerate(zip(titles, widths)))
        )
        for r in group:
            cells = [_cell(r, k) for k in keys]
            out.append(
                "  ".join(
                    c.ljust(w) if i < 2 or i == len(keys) - 1 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(cells, widths))
                ).rstrip()
            )
        out.append("")
    return "\n".join(out)


def cases_for(suite: str, quick: bool, p: float) -> list[Case]:
    """The cases of ``suite`` (``spatial``, ``dropblock`` or ``all``)."""
    cases: list[Case] = []
    if suite in ("spatial", "all"):
        cases += spatial_cases(quick, p)
    if suite in ("dropblock", "all"):
        cases += dropblock_cases(quick, p)
    return cases


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
) -> int:
    """Run the suite, print or write the rows in ``fmt``; return the exit code."""
    threads_before = torch.get_num_threads()
    threads = threads or os.cpu_count() or 1
    repeats = repeats or (5 if quick else 15)
    warmup = 1 if quick else 3
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    try:
        cases = cases_for(suite, quick, p)
        total = sum(warmup + repeats for _ in cases)
        rows: list[Row] = []
        with progress(CMD, total=total, desc=f"bench {suite}", enabled=show_progress, unit="round") as bar:
            for case in cases:
                bar.set_postfix_str(case.name)
                rows += measure(case, repeats, warmup, tick=lambda: bar.update(1))
        env = environment(threads)
    finally:
        torch.set_num_threads(threads_before)
    text = format_rows(rows, fmt, env, command)
    if out is None:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {out}")
    return 0
