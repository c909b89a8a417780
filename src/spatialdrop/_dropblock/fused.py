"""DropBlock's fused CPU pass: the scaled copy and the zeroed blocks in one sweep (per channel).

The sparse path's torch ops multiply the whole tensor, then write the dropped runs; by then
each run's cache line has been evicted, and those scattered writes cost as much as the multiply
itself. The C extension ``_cfused`` (``_cfused.c``, built by ``pip install``; no torch headers)
zeroes the blocks that end in each 16 kB stretch right after multiplying it, straight from the
seed indices: no write plan is built, and backward needs only the seeds (4 bytes each).

It takes a dense float32 or float64 CPU destination and per-channel masks; everything else
(shared masks, other dtypes, the realized scale, an extension that could not be built) takes the
torch-op path, which gives the same bits (``tests/test_drop_block_paths.py`` compares them).
With more than one torch thread the sweep is split into one storage range per thread (the GIL
is released); blocks that straddle two ranges are zeroed after all ranges are written.
"""

from __future__ import annotations

import functools
import os
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor

from .geometry import Geometry, is_dense

try:
    from . import _cfused
except ImportError:  # pragma: no cover - the build skipped the optional extension
    _cfused = None

__all__ = ["ENABLED", "available", "same_layout", "write"]

# Internal switch (tests, benchmarks): False sends every call to the torch-op path.
ENABLED = True

_DTYPES = {torch.float32: 0, torch.float64: 1}
_CHUNK_BYTES = 16384  # as in _cfused.c: ranges split at chunk boundaries
_PARALLEL_MIN = 1 << 20  # elements below which one thread does it all
_RANGES_PER_THREAD = 1  # storage ranges per thread (more in tests: more straddling blocks)
_pool: Optional[ThreadPoolExecutor] = None
_pool_key = (0, 0)  # (pid, threads) the pool was made for
_pool_lock = threading.Lock()


def built() -> bool:
    """Whether the C extension was built and imported."""
    return _cfused is not None


def available(out: Tensor, geo: Geometry, require_dense: bool = True) -> bool:
    """Whether :func:`write` takes ``out`` (a dense float32/float64 CPU tensor, per-channel masks).

    ``require_dense=False``: for a tensor ``empty_like`` of which is ``out`` (always dense).
    """
    return (
        ENABLED
        and _cfused is not None
        and not geo.shared
        and out.device.type == "cpu"
        and out.dtype in _DTYPES
        and (not require_dense or is_dense(out))
    )


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) put every element at the same storage offset."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


@functools.lru_cache(maxsize=256)
def _template(geo: Geometry, numel: int, strides: tuple[int, ...]) -> array:
    """The parameter block's fixed part for a geometry and a layout; :func:`_params` fills in the rest.

    ``geo`` is usually the one object of its shape (:func:`.geometry.geometry`), so a training
    loop builds each block once.
    """
    pad = 3 - len(geo.sizes)
    spatial = [strides[d] for d in geo.spatial]
    values = [
        numel,
        0,
        geo.channels,
        strides[0],
        strides[geo.channel_dim],
        0,
        0,
        0,
        0,
        *([1] * pad + list(geo.sizes)),
        *([1] * pad + list(geo.blocks)),
        *([1] * pad + list(geo.grid)),
        *([0] * pad + list(geo.shift)),
        *([0] * pad + spatial),
    ]
    return array("q", values)


def _params(out: Tensor, seeds: Tensor, geo: Geometry, lo: int, hi: int, pass_: int) -> array:
    """The C side's int64 parameter block (its order is ``_cfused.c``'s enum)."""
    params = array("q", _template(geo, out.numel(), out.stride()))
    params[1], params[5], params[6], params[7], params[8] = seeds.numel(), lo, hi, pass_, seeds.element_size()
    return params


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
    dst_ptr = out.data_ptr()
    src_ptr = 0 if src is None else src.data_ptr()
    scale = 0 if factor is None else 1
    f = 1.0 if factor is None else float(factor)
    n = out.numel()
    threads = torch.get_num_threads()
    if threads <= 1 or n < _PARALLEL_MIN:
        params = _params(out, seeds, geo, 0, n, 0)
        _cfused.fused(dst_ptr, src_ptr, seeds.data_ptr(), params.buffer_info()[0], dtype, scale, f)
        return
    chunk = max(1, _CHUNK_BYTES // out.element_size())
    step = -(-n // (threads * _RANGES_PER_THREAD) // chunk) * chunk
    bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    blocks = [_params(out, seeds, geo, lo, hi, 0) for lo, hi in bounds]
    pool = _executor(threads)
    jobs = [
        pool.submit(_cfused.fused, dst_ptr, src_ptr, seeds.data_ptr(), p.buffer_info()[0], dtype, scale, f)
        for p in blocks
    ]
    for job in jobs:
        job.result()
    for lo, hi in bounds[1:]:  # blocks that start in an earlier range: zeroed once all are written
        p = _params(out, seeds, geo, lo, hi, 1)
        _cfused.fused(dst_ptr, src_ptr, seeds.data_ptr(), p.buffer_info()[0], dtype, 0, 1.0)
