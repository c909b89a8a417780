"""DTensor inputs: how a layer draws its part of one mask on every rank (private).

A layer given a :class:`torch.distributed.tensor.DTensor` validates it as a whole (shapes are
global), gets the noise of its local shard (per sample, or per sample and channel: small next to
the data), wraps it as a DTensor that broadcasts against the input (:func:`shard_like`), and lets
DTensor do the arithmetic, so the output has the input's placements and autograd, ``inplace`` and
uneven shards work as for any DTensor op. Nothing is redistributed and no collective touches the
data.

Where the noise comes from (:func:`draw_sharded`):

- keyed (a :class:`~spatialdrop.MaskKey`, or a layer inside :func:`~spatialdrop.mask_context`):
  the key's ``sample_ids`` are the *global* batch's ids; each rank keeps the rows of its local
  samples (:func:`local_rows`) and draws the columns of its local channels only (``first``): the
  same bits as the unsharded call, whatever the mesh, the placements or the world size. No
  communication.
- unkeyed: every rank draws the layer's whole noise table exactly as the unsharded call would
  (torch's generator of the input's device, or ``generator``: ``bernoulli_`` / ``randn`` of shape
  ``(N, 1, .., C, .., 1)``), and :func:`agree` broadcasts the first rank's table over the mesh
  (one broadcast per mesh dim of size > 1, of ``N x C`` elements); each rank keeps its part. So
  the output is the unsharded call's output under the first rank's generator, bit for bit:
  replicas agree and shards are parts of one valid mask without any seeding by the user,
  ``torch.manual_seed`` on the first rank makes the masks repeat, and activation checkpointing
  with ``preserve_rng_state=True`` recomputes the same masks (it restores that generator, and the
  broadcast runs again). The cost is one small broadcast per layer call; keyed masks need none.
  DTensor's own random ops instead assume that every rank seeded torch alike and have no RNG
  tracker on a CPU mesh (they warn "may not have complete support"): they are never called here.

Global coordinates come from the DTensor's spec (``compute_local_shape_and_global_offset``), never
from the rank, so uneven shards and several mesh dims sharding one tensor dim work. ``Partial``
placements are refused (dropout of a partial sum is not the sum of the dropped parts), and so is a
``_StridedShard`` of a dim whose coordinates a mask needs.

Nothing here imports :mod:`torch.distributed` before a DTensor exists: :func:`is_dtensor` looks the
class up in ``sys.modules``.

For an op whose noise is as large as its input (DropBlock), broadcasting a table is no option;
the pieces are: :func:`check_placements`, :func:`local_range` (the global offset and length of
the local shard per dim), :func:`call_key` (the key of a call: the user's, or one from random bits
that :func:`agree` made common) then :func:`local_rows` (the key of the local samples), and
:func:`from_local_like` (wrap a local result with the input's placements).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

import torch
from torch import Tensor

from ._compat import is_compiling
from ._validation import Shown, fail
from .keyed import MaskKey

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "UNKEYED_LAYER",
    "UNKEYED_SEED",
    "agree",
    "call_key",
    "check_placements",
    "check_sharding",
    "draw_sharded",
    "eager_under_compile",
    "from_local_like",
    "is_dtensor",
    "local_range",
    "local_rows",
    "plain_like",
    "shard_like",
    "sum_over_shards",
]

#: The key of :func:`call_key`'s agreed draws: a fixed (seed, layer) (``"dtensor"`` and
#: ``"unkeyed"`` in ASCII); the call's shared random bits go into the step (32 bits) and the high
#: word of the sample ids (31 bits), both tensors, so that nothing waits for the device.
UNKEYED_SEED = 0x64_74_65_6E_73_6F_72
UNKEYED_LAYER = 0x75_6E_6B_65_79_65_64


F = TypeVar("F", bound=Callable[..., Any])


def eager_under_compile(fn: F) -> F:
    """``fn`` as it is eagerly; under ``torch.compile``, called through ``torch.compiler.disable``.

    A DTensor call reads its shard's place from the DTensor's spec and the mesh (sizes, offsets,
    process groups) and may communicate: dynamo cannot trace that (``SymNodeVariable() is not a
    constant``), so the sharded draw runs eagerly, a graph break, and the model's other ops stay
    compiled. ``torch.compiler.disable`` is looked up only when compiling: importing
    :mod:`torch._dynamo` with spatialdrop would add over a second to every import.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_compiling():
            return torch.compiler.disable(fn, recursive=True)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def is_dtensor(x: object) -> TypeGuard[DTensor]:
    """Whether ``x`` is a DTensor (without importing :mod:`torch.distributed`)."""
    cls = type(x)
    if cls is Tensor or cls is torch.nn.Parameter:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _placement_name(placement: Any) -> str:
    return type(placement).__name__


def check_placements(fn: str, x: DTensor, *, arg: str = "input") -> None:
    """Refuse a DTensor whose placements are not all ``Shard`` or ``Replicate`` (``Partial``, ...).

    Raises:
        ValueError: naming ``fn``, ``arg`` and the placements.
    """
    for placement in x.placements:
        if placement.is_shard() or placement.is_replicate():
            continue
        why = (
            " (dropout of a partial sum is not the sum of the dropped parts: reduce it first, "
            "e.g. x.redistribute(placements=[Replicate()]))"
            if placement.is_partial()
            else ""
        )
        fail(
            fn,
            arg,
            f"a tensor or a DTensor whose placements are Shard or Replicate{why}",
            Shown(f"a DTensor with placements {tuple(x.placements)}"),
        )


def local_range(fn: str, x: DTensor, dim: int) -> tuple[int, int]:
    """``(start, length)``: this rank's shard of ``x`` along ``dim``, in global coordinates.

    Read from the DTensor's spec (uneven shards, several mesh dims on one tensor dim), never from
    the rank alone. An empty shard has length 0.

    Raises:
        ValueError: if ``dim`` is split by a ``_StridedShard`` (its shard is not one range).
    """
    for placement in x.placements:
        if placement.is_shard(dim) and _placement_name(placement) != "Shard":
            fail(
                fn,
                "input",
                f"a DTensor whose dim {dim} is split into ranges (Shard({dim}) or Replicate)",
                Shown(f"a DTensor with placements {tuple(x.placements)}"),
            )
    shape, offset = _geometry(tuple(x.shape), x.device_mesh, tuple(x.placements))
    return offset[dim], shape[dim]


def _cached(fn: F) -> F:
    """``fn`` behind an LRU cache of 256 calls, and uncached under ``torch.compile``.

    Dynamo traces the function itself either way (it ignores the cache), and warns when it meets
    a cached call; the layout lookups below are traced when a DTensor's arithmetic is compiled.
    """
    cached = functools.lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return fn(*args) if is_compiling() else cached(*args)

    return wrapper  # type: ignore[return-value]


@_cached
def _geometry(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> tuple[list[int], list[int]]:
    """This rank's local shape and global offsets (one spec lookup per layout: slow next to a call)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    if not offset:  # a rank outside the mesh holds nothing
        return [0] * len(shape), [0] * len(shape)
    return [int(n) for n in local], [int(o) for o in offset]


def shard_like(x: DTensor, local: Tensor, dims: Sequence[int]) -> DTensor:
    """Wrap ``local`` as the DTensor that broadcasts against ``x``, sized 1 outside ``dims``.

    ``local`` holds this rank's part: ``x``'s local size along ``dims`` and 1 elsewhere, in a
    dtype of its own. The DTensor keeps ``x``'s ``Shard(d)`` for ``d`` in ``dims`` and is
    ``Replicate`` elsewhere (its size-1 dims hold the same values on every rank of a mesh dim
    that shards ``x`` there). It needs no gradient, so it is built directly from a spec, cached
    per layout (several times cheaper on the CPU than ``DTensor.from_local`` on every call).
    """
    from torch.distributed.tensor import DTensor

    spec = _noise_spec(tuple(x.shape), x.device_mesh, tuple(x.placements), tuple(dims), local.dtype)
    return DTensor(local, spec, requires_grad=False)


@_cached
def _noise_spec(
    shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...], dims: tuple[int, ...], dtype: torch.dtype
) -> Any:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    kept = tuple(p if p.is_shard() and getattr(p, "dim", None) in dims else Replicate() for p in placements)
    size = torch.Size([shape[d] if d in dims else 1 for d in range(len(shape))])
    stride = [1] * len(size)
    for d in range(len(size) - 2, -1, -1):
        stride[d] = stride[d + 1] * size[d + 1]
    return DTensorSpec(mesh, kept, tensor_meta=TensorMeta(size, tuple(stride), dtype))


def plain_like(x: Tensor) -> Tensor:
    """An empty plain tensor of ``x``'s dtype and device: ``new_empty`` on it gives a plain tensor."""
    return torch.empty(0, dtype=x.dtype, device=x.device)


def from_local_like(out: Tensor, x: DTensor) -> DTensor:
    """Wrap ``out``, this rank's result for ``x``'s local shard, with ``x``'s mesh and placements."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        out, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()
    )


def agree(mesh: Any, *tables: Tensor) -> None:
    """Make ``tables`` the mesh's first rank's on every rank of ``mesh``, in place.

    One broadcast per mesh dim of size > 1, each from the rank at coordinate 0 of that dim: after
    dim ``d`` every rank holds the tables of the rank whose first ``d + 1`` coordinates are 0.
    Every rank of the mesh must call it with tables of the same shapes and dtypes. The tables
    travel as bytes (any dtype); each must be contiguous.
    """
    import torch.distributed as dist

    if mesh.size() == 1:
        return
    for table in tables:
        data = table.view(-1).view(torch.uint8) if table.numel() else table
        for d in range(mesh.ndim):
            if mesh.size(d) > 1:
                dist.broadcast(data, group=mesh.get_group(d), group_src=0)


def call_key(
    fn: str, x: DTensor, key: MaskKey | None, generator: torch.Generator | None, rows: int
) -> MaskKey:
    """The global key of one draw for ``x``: ``key`` itself, or an agreed key for an unkeyed call.

    For an op whose noise is too large to broadcast (DropBlock). The agreed key has ``rows``
    sample ids (the global batch positions ``0 .. rows - 1``; 1 for a per-call draw) and 63 random
    bits in its step and the ids' high words, drawn from this rank's generator (the default one
    of ``x``'s device, or ``generator``) and made the first rank's by :func:`agree`: every rank
    draws its part of one draw, checkpointing's restored generator redraws it, and nothing waits
    for the device.
    """
    if key is not None:
        return key
    device = x.device
    where = device if generator is None else generator.device
    with torch.no_grad():
        if generator is None:  # no generator= keyword (see _validation.generator_kwargs)
            bits = torch.randint(0, 1 << 31, (2,), dtype=torch.int64, device=where)
        else:
            bits = torch.randint(0, 1 << 31, (2,), dtype=torch.int64, device=where, generator=generator)
        bits = bits.to(device)
        agree(x.device_mesh, bits)
        ids = torch.arange(rows, dtype=torch.int64, device=device).add_(bits[1] << 32)
    return MaskKey(UNKEYED_SEED, bits[0], UNKEYED_LAYER, ids)


def local_rows(fn: str, key: MaskKey, x: DTensor) -> MaskKey:
    """``key`` with the sample ids of ``x``'s local samples (dim 0) only."""
    start, length = local_range(fn, x, 0)
    return key._replace(sample_ids=key.sample_ids[start : start + length])


@eager_under_compile
def draw_sharded(
    fn: str,
    x: DTensor,
    key: MaskKey | None,
    column_dim: int | None,
    draw: Callable[[MaskKey | None, list[int], int], Tensor],
    finish: Callable[[Tensor], tuple[Tensor, ...]],
) -> tuple[DTensor, ...]:
    """This rank's part of a layer's per-sample (or per-(sample, channel)) noise for ``x``.

    ``draw(key, shape, first)`` returns a noise table of ``shape`` (sizes at dim 0 and
    ``column_dim``, 1 elsewhere). Keyed, it gets the local samples' key, the local shape and the
    global index of the first local channel (0 without ``column_dim``), and draws only that part.
    Unkeyed, it gets ``None``, the global shape and 0 and draws the whole table as the unsharded
    call would (torch's generator); :func:`agree` then makes it the first rank's and each rank
    keeps its part. ``finish`` turns the local part into the factors the op applies (scaled,
    shifted ...); each is wrapped by :func:`shard_like`, ready to combine with ``x``.
    """
    check_placements(fn, x)
    dims = (0,) if column_dim is None else (0, column_dim)
    ranges = {d: local_range(fn, x, d) for d in dims}
    with torch.no_grad():
        if key is not None:
            shape = [ranges[d][1] if d in ranges else 1 for d in range(x.dim())]
            first = ranges[column_dim][0] if column_dim is not None else 0
            local = draw(local_rows(fn, key, x), shape, first)
        else:
            table = draw(None, [x.shape[d] if d in ranges else 1 for d in range(x.dim())], 0)
            agree(x.device_mesh, table)
            local = table
            for d, (start, length) in ranges.items():
                local = local.narrow(d, start, length)
        return tuple(shard_like(x, t, dims) for t in finish(local))


def sum_over_shards(x: DTensor, table: Tensor, dims: Sequence[int]) -> None:
    """Sum ``table`` in place over the mesh dims that shard ``x`` along one of ``dims``.

    For a quantity summed over tensor dims ``dims`` (a sample's dropped positions over its
    channels and spatial dims) of which each rank holds a part: ranks of a mesh dim that shards
    another tensor dim (the batch) or replicates hold other samples or the same part.
    """
    import torch.distributed as dist

    for mesh_dim in split_mesh_dims(x, dims):
        dist.all_reduce(table, group=x.device_mesh.get_group(mesh_dim))


def split_mesh_dims(x: DTensor, dims: Sequence[int]) -> list[int]:
    """The mesh dims (of size > 1) that shard ``x`` along one of ``dims`` (what :func:`sum_over_shards` sums).

    From the placements alone, so every rank gets the same answer, whatever its shard's size
    (a dim of size 1 split over two ranks leaves one empty shard): every rank joins the same
    collectives.
    """
    return [
        mesh_dim
        for mesh_dim, placement in enumerate(x.placements)
        if placement.is_shard()
        and getattr(placement, "dim", None) in dims
        and x.device_mesh.size(mesh_dim) > 1
    ]


def check_sharding(fn: str, x: Tensor) -> None:
    """:func:`check_placements` for a DTensor; nothing for any other tensor."""
    if is_dtensor(x):
        check_placements(fn, x)
