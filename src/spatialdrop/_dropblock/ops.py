"""DropBlock's dispatcher: the one place that picks how a call runs (:func:`select_path`, :func:`run`).

Every way a call can run is a :class:`Path`; :func:`select_path` holds every condition that
chooses one, and :func:`run` selects, then calls. The other modules implement a path; none
decides one. Each path is tested bit for bit against the others in keyed mode (the same seeds
give the same output, forward and backward: ``tests/test_drop_block_paths.py``).

=======  ====================================  ====================================  ========================
path     runs when                             forward                               saved for backward
=======  ====================================  ====================================  ========================
FUSED    CPU, eager, a plain tensor, per-      :class:`~.autograd.FusedFunction`:    the int32 seeds (if at
         channel float32/64 masks, not         one C sweep multiplies and zeroes     most 1/32 of the input's
         ``"realized"``, the C extension       the blocks straight from the seeds    bytes), the seed or key,
         built, not in place, no window        (:mod:`.fused`)                       ``p``
INPLACE  CPU, eager, ``inplace``, a dense      :class:`~.autograd.EagerFunction`,    as EAGER
         input, no torch.func                  written into the input
EAGER    CPU, eager, a plain tensor, per-      :class:`~.autograd.EagerFunction`:    the seeds or the write
         channel masks (what FUSED leaves)     the op's function without the         plan (if at most 1/32 of
                                               dispatcher (:mod:`.sparse`)           the bytes), seed or key
OP       CPU under ``torch.compile``, shared   ``spatialdrop::drop_block`` through   as EAGER; compiled: a
         masks, subclasses, dispatch modes     the dispatcher (one opaque op)        static-length plan
FUNC     CPU under torch.func (grad, vmap,     :class:`~.autograd.ForwardFunction`   the seed or key, ``p``
         jvp) or forward-mode AD (a tangent)   (with its backward and jvp formulas)
DENSE    ``torch.export``/ONNX, meta, devices  torch ops: a dense seed grid, blocks  the bool keep mask
         without Triton; CUDA with a DTensor   grown by windowed ORs (:mod:`.dense`)
         window, torch.func or a tangent, or
         more than 3 spatial dims
TRITON   CUDA with ``triton`` (1-3 spatial     ``spatialdrop::drop_block_triton``:   the seed or key words,
         dims, no window, no torch.func)       a packed seed-bit grid, one write     ``p``: kernels re-run
=======  ====================================  ====================================  ========================

Every path drops an element as ``x * 0``, as torch's dropout does (NaN or infinite input gives
NaN there, finite input a zero of its sign), forward and backward. The export check comes first,
so exported programs never hold a custom op. The user setting
``SPATIALDROP_BACKEND=torch`` keeps CUDA input off Triton (DENSE). Without the C extension (no
C compiler at install) FUSED never runs and the sparse paths write with torch ops: the same
bits. Tests steer the paths with one context manager, :func:`override`. Every path takes its
``Geometry`` from :mod:`.geometry`, its seed rate from :mod:`.calibration`, its scale from
:mod:`.scale` and its seeds from :func:`.sampling.draw_grid` (keyed: :mod:`.keyed_seeds`).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._compat import is_compiling
from ..keyed import MaskKey
from . import fused
from .autograd import (
    EagerFunction,
    FusedFunction,
    call_forward,
    direct_call_ok,
    functorch_active,
    has_tangent,
)
from .calibration import p_tensor
from .dense import drop_block_dense
from .geometry import Geometry, is_dense
from .sparse import PLAN_EXACT, PLAN_NONE, PLAN_STATIC, ForwardArgs, KeyWords
from .triton_kernels import triton_drop_block

__all__ = ["Call", "Path", "override", "run", "select_path", "triton_ready"]


class Path(enum.Enum):
    """The ways a DropBlock call can run: one row each in this module's table."""

    FUSED = "fused"
    INPLACE = "inplace"
    EAGER = "eager"
    OP = "op"
    FUNC = "func"
    DENSE = "dense"
    TRITON = "triton"


class Call(NamedTuple):
    """A checked, non-empty DropBlock call in training mode (``p`` a float, converted once here)."""

    input: Tensor
    p: float
    geo: Geometry
    seeding: str
    scale: str
    generator: Optional[torch.Generator]
    key: Optional[MaskKey]
    inplace: bool = False
    window: Optional[list[int]] = None


# Whether ``triton`` is installed, found once without importing it (the import takes seconds); a
# plain constant, so that dynamo, tracing the dispatch, reads no cached function.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
_forced: Optional[Path] = None  # set by :func:`override` only


@contextlib.contextmanager
def override(path: Optional[Path] = None, *, extension: bool = True) -> Iterator[None]:
    """Steer DropBlock's paths, for tests and benchmarks (the one switch).

    Args:
        path: ``Path.DENSE``: every input runs as on a device without Triton; ``Path.TRITON``:
            CPU input runs as CUDA input with ``triton`` does, in Triton's interpreter
            (``TRITON_INTERPRET=1`` set before ``triton`` is first imported); ``None``: as usual.
        extension: ``False``: as if the C extension were not built (no FUSED, torch-op writes).

    Raises:
        ValueError: a ``path`` other than those.
        RuntimeError: ``Path.TRITON`` without ``TRITON_INTERPRET=1``.
    """
    global _forced
    if path not in (None, Path.DENSE, Path.TRITON):
        raise ValueError(f"override: path must be None, Path.DENSE or Path.TRITON, got {path}")
    if path is Path.TRITON and os.environ.get("TRITON_INTERPRET", "") != "1":
        raise RuntimeError("override: set TRITON_INTERPRET=1 before triton is first imported")
    previous = _forced, fused.extension()
    _forced = path
    fused.set_extension(previous[1] if extension else None)
    try:
        yield
    finally:
        _forced = previous[0]
        fused.set_extension(previous[1])


def triton_ready(input: Tensor) -> bool:
    """Whether the Triton kernels can take ``input``.

    CUDA input (or CPU input under ``override(Path.TRITON)``), ``triton`` installed,
    ``SPATIALDROP_BACKEND`` not ``torch``, and no ``override(Path.DENSE)``.
    """
    device_ok = input.is_cuda or (_forced is Path.TRITON and input.device.type == "cpu")
    if _forced is Path.DENSE or not _TRITON_IMPORTABLE or not device_ok:
        return False
    return os.environ.get("SPATIALDROP_BACKEND", "").lower() != "torch"


def select_path(input: Tensor, geo: Geometry, scale: str, inplace: bool, window: Optional[list[int]]) -> Path:
    """The :class:`Path` of a call: every condition that chooses one (see the module's table)."""
    if torch.compiler.is_exporting():  # no custom op in an exported program (ONNX cannot lower it)
        return Path.DENSE
    func = functorch_active() or has_tangent(input)  # ForwardFunction's formulas
    if _forced is not None or input.device.type != "cpu":  # the static-shape paths
        if window is None and 1 <= len(geo.sizes) <= 3 and not func and triton_ready(input):
            return Path.TRITON
        return Path.DENSE
    direct = not func and direct_call_ok(input)
    fusable = direct and scale != "realized" and geo.places < 2**31 and fused.available(input, geo)
    if window is None and not inplace and fusable:
        return Path.FUSED
    if inplace and not func and (geo.shared or not is_compiling()) and is_dense(input):
        return Path.INPLACE
    if direct and not geo.shared:
        return Path.EAGER
    return Path.FUNC if func else Path.OP


def _plan(geo: Geometry, input: Tensor) -> int:
    """What the sparse op keeps: nothing (shared, torch.func), an exact or a static-length plan."""
    if geo.shared or functorch_active() or has_tangent(input):
        return PLAN_NONE
    return PLAN_STATIC if is_compiling() else PLAN_EXACT


def _randomness(c: Call) -> tuple[Optional[Tensor], KeyWords]:
    """The sparse op's randomness: a seed drawn from ``generator``, or the key's words."""
    if c.key is None:
        if c.generator is None:
            seed = torch.randint(0, 1 << 62, (), dtype=torch.int64)
        else:
            seed = torch.randint(0, 1 << 62, (), dtype=torch.int64, generator=c.generator)
        return seed, KeyWords(None, None, None)
    return None, KeyWords.of(c.key)


def _op_args(c: Call) -> ForwardArgs:
    seed, kw = _randomness(c)
    geo = c.geo
    return ForwardArgs(
        c.input, seed, p_tensor(c.p), list(geo.blocks), geo.channel_dim, geo.shared, c.seeding, c.scale,
        *kw, _plan(geo, c.input), c.window,
    )  # fmt: skip


def _fused(c: Call) -> Tensor:
    seed, kw = _randomness(c)
    return FusedFunction.apply(c.input, seed, c.p, c.geo, c.seeding, c.scale, c.key, kw)


def _op(c: Call) -> Tensor:
    return call_forward(_op_args(c))[0]


def _dense(c: Call) -> Tensor:
    as_tensor = is_compiling() and not torch.compiler.is_exporting()  # p as a tensor: no recompile
    return drop_block_dense(c.input, c.p, c.geo, c.seeding, c.scale, c.generator, c.key, c.window, as_tensor)


def _triton(c: Call) -> Tensor:
    geo = c.geo
    return triton_drop_block(
        c.input, p_tensor(c.p), geo.blocks, channel_dim=geo.channel_dim, shared=geo.shared,
        seeding=c.seeding, scale=c.scale, generator=c.generator, key=c.key,
    )  # fmt: skip


_CALLS: dict[Path, Callable[[Call], Tensor]] = {
    Path.FUSED: _fused,
    Path.INPLACE: lambda c: EagerFunction.apply(True, *_op_args(c)),
    Path.EAGER: lambda c: EagerFunction.apply(False, *_op_args(c)),
    Path.OP: _op,
    Path.FUNC: _op,  # call_forward takes ForwardFunction under torch.func
    Path.DENSE: _dense,
    Path.TRITON: _triton,
}


def run(c: Call) -> Tensor:
    """DropBlock of a checked, non-empty input in training mode: select the path, then call it.

    ``inplace``: written into ``input`` by INPLACE, else computed out of place and copied in.
    ``window`` (a DTensor's shard, :mod:`.window`): ``geo`` is the shard's, the mask the window
    of the global one.
    """
    path = select_path(c.input, c.geo, c.scale, c.inplace, c.window)
    out = _CALLS[path](c)
    if c.inplace and path is not Path.INPLACE:
        return c.input.copy_(out)
    return out
