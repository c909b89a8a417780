"""DropBlock's fused CPU pass: the scaled copy and the zeroed blocks in one sweep (per channel).

The sparse path's torch ops multiply the whole tensor, then write the dropped runs; by then
each run's cache line has been evicted, and those scattered writes cost as much as the multiply
itself. The C extension ``_cfused`` (``_cfused.c``, built by ``pip install``; no torch headers)
zeroes the blocks that end in each 16 kB stretch right after multiplying it, straight from the
seed indices: no write plan is built, and backward needs only the seeds (4 bytes each).

Everything it does not take (:func:`available`; the realized scale) goes the torch-op way, with
the same bits (``tests/test_drop_block_paths.py`` compares them). With more than one torch
thread the sweep is split into one storage range per thread (the GIL is released); blocks that
straddle two ranges are zeroed after all ranges are written.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .geometry import Geometry, is_dense

_cfused: Optional[ModuleType]  # None while ``ops.override(extension=False)`` hides it
try:
    _cfused = importlib.import_module("._cfused", __package__)
except ImportError:  # the build skipped the optional extension (no C compiler)
    _cfused = None

__all__ = ["available", "extension", "same_layout", "set_extension", "write"]

_DTYPES = {torch.float32: 0, torch.float64: 1}
_CHUNK_BYTES = 16384  # as in _cfused.c: ranges split at chunk boundaries
_PARALLEL_MIN = 1 << 20  # elements below which one thread does it all
_RANGES_PER_THREAD = 1  # storage ranges per thread (more in tests: more straddling blocks)
_pool: Optional[ThreadPoolExecutor] = None
_pool_key = (0, 0)  # (pid, threads) the pool was made for
_pool_lock = threading.Lock()


def extension() -> Optional[ModuleType]:
    """The C extension module, or ``None`` when it was not built (or ``ops.override`` hides it)."""
    return _cfused


def set_extension(module: Optional[ModuleType]) -> None:
    """Hide (``None``) or restore the C extension: for ``ops.override`` only."""
    global _cfused
    _cfused = module


def available(out: Tensor, geo: Geometry) -> bool:
    """Whether :func:`write` takes ``out`` (a dense float32/float64 CPU tensor, per-channel masks).

    At most 3 spatial dims (the C side's parameter block holds 3 per dim kind).
    """
    return (
        _cfused is not None
        and not geo.shared
        and len(geo.sizes) <= 3
        and out.device.type == "cpu"
        and out.dtype in _DTYPES
        and is_dense(out)
    )


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) put every element at the same storage offset."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


class Params(NamedTuple):
    """The C side's int64 parameter block, field by field in the order of ``_cfused.c``'s ``P_*``."""

    numel: int  # elements of dst
    nseeds: int
    channels: int
    stride_n: int
    stride_c: int
    lo: int  # the storage range [lo, hi) this call owns
    hi: int
    pass_: int  # 0: multiply and zero; 1: zero the blocks that straddle into the range
    seed_bytes: int  # 4 (int32 seeds) or 8 (int64)
    layout: tuple[int, ...]  # 3 each (padded in front): map sizes, blocks, grid sides, shifts, dst's strides

    def block(self) -> array:
        return array("q", [*self[:-1], *self.layout])


@functools.lru_cache(maxsize=256)
def _layout(geo: Geometry, strides: tuple[int, ...]) -> tuple[int, ...]:
    """:attr:`Params.layout` of a geometry and a layout.

    ``geo`` is usually the one object of its shape (:func:`.geometry.geometry`), so a training
    loop builds each once.
    """
    pad = 3 - len(geo.sizes)
    spatial = [strides[d] for d in geo.spatial]
    ones = [(1,) * pad + tuple(v) for v in (geo.sizes, geo.blocks, geo.grid)]
    return sum(ones, ()) + (0,) * pad + geo.shift + (0,) * pad + tuple(spatial)


def _params(out: Tensor, seeds: Tensor, geo: Geometry, lo: int, hi: int, pass_: int) -> array:
    """The parameter block of a call of the C pass on ``out``'s range ``[lo, hi)``."""
    st = out.stride()
    fields = (out.numel(), seeds.numel(), geo.channels, st[0], st[geo.channel_dim], lo, hi, pass_)
    return Params(*fields, seeds.element_size(), _layout(geo, st)).block()


def _executor(threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` workers (a forked child makes its own: threads do not fork)."""
    global _pool, _pool_key
    with _pool_lock:
        key = (os.getpid(), threads)
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spatialdrop-fused")
            _pool_key = key
        return _pool


def write(out: Tensor, src: Optional[Tensor], factor: Optional[float], seeds: Tensor, geo: Geometry) -> None:
    """Write ``src * factor`` into ``out`` with every seed's block zeroed.

    Args:
        out: the destination, :func:`available` for ``geo``.
        src: ``out`` itself (in place), a tensor laid out like it (:func:`same_layout`), or
            ``None`` when ``out`` already holds the values (only the zeros are written).
        factor: the scale (``None``: copy).
        seeds: flat indices into the seed grid ``(maps, *geo.grid)``, int64 or int32.
        geo: the per-channel geometry of ``out``.
    """
    assert _cfused is not None, "fused.write: the extension is not built"
    assert seeds.dtype in (torch.int32, torch.int64), "fused.write: seeds are int32 or int64"
    seeds = seeds.contiguous()
    dtype = _DTYPES[out.dtype]
    n = out.numel()
    # the buffers, each with its length: dst (src laid out alike) and the seeds
    buffers = (out.data_ptr(), n, 0 if src is None else src.data_ptr(), seeds.data_ptr(), seeds.numel())
    scale, f = (0, 1.0) if factor is None else (1, float(factor))
    threads = torch.get_num_threads()
    if threads <= 1 or n < _PARALLEL_MIN:
        _cfused.fused(*buffers, _params(out, seeds, geo, 0, n, 0), dtype, scale, f)
        return
    chunk = max(1, _CHUNK_BYTES // out.element_size())
    step = -(-n // (threads * _RANGES_PER_THREAD) // chunk) * chunk
    bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    blocks = [_params(out, seeds, geo, lo, hi, 0) for lo, hi in bounds]
    pool = _executor(threads)
    c_pass = functools.partial(_cfused.fused, *buffers)
    for job in [pool.submit(c_pass, p, dtype, scale, f) for p in blocks]:
        job.result()
    for lo, hi in bounds[1:]:  # blocks that start in an earlier range: zeroed once all are written
        _cfused.fused(*buffers, _params(out, seeds, geo, lo, hi, 1), dtype, 0, 1.0)
