"""DTensor inputs: how a layer draws its part of one mask on every rank (private).

A layer given a :class:`torch.distributed.tensor.DTensor` validates it as a whole (shapes are
global), draws only the noise of its local shard, wraps that noise as a DTensor that broadcasts
against the input (:func:`shard_like`), and lets DTensor do the arithmetic, so the output has the
input's placements and autograd, ``inplace`` and uneven shards work as for any DTensor op. No
collective runs on the data; nothing is redistributed.

Where the noise comes from:

- keyed (a :class:`~spatialdrop.MaskKey`, or a layer inside :func:`~spatialdrop.mask_context`):
  the key's ``sample_ids`` are the *global* batch's ids; each rank keeps the rows of its local
  samples (:func:`local_rows`) and draws the columns of its local channels (``first``): the same
  bits as the unsharded call, whatever the mesh, the placements or the world size. No
  communication.
- unkeyed: :func:`call_key` makes a key from 63 random bits that every rank of the mesh shares:
  each rank draws them from its own torch generator (the default one of the input's device, or
  ``generator``) and one broadcast per mesh dim, from the rank at coordinate 0, makes them the
  first rank's. Every rank then draws its part of one mask from that key, so replicas agree and
  shards are parts of one valid mask without any seeding by the user, ``torch.manual_seed`` on
  the first rank makes the masks repeat, and activation checkpointing with
  ``preserve_rng_state=True`` recomputes the same masks (it restores the generator that the bits
  come from). The cost is one small broadcast per layer call (keyed masks need none). DTensor's
  own random ops instead assume that every rank seeded torch alike and have no RNG tracker on a
  CPU mesh (they warn "may not have complete support"): they are never called here.

Global coordinates come from the DTensor's spec (``compute_local_shape_and_global_offset``), never
from the rank, so uneven shards and several mesh dims sharding one tensor dim work. ``Partial``
placements are refused (dropout of a partial sum is not the sum of the dropped parts), and so is a
``_StridedShard`` of a dim whose coordinates a mask needs.

Nothing here imports :mod:`torch.distributed` before a DTensor exists: :func:`is_dtensor` looks the
class up in ``sys.modules``.

For an op with its own kernels (DropBlock), the pieces are: :func:`check_placements`,
:func:`local_range` (global offset and length of the local shard per dim), :func:`call_key` then
:func:`local_rows` (the key of the local samples), :func:`from_local_like` (wrap a local result with
the input's placements) and :func:`shard_like` (wrap local noise that broadcasts against it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import Tensor

from ._validation import Shown, fail
from .keyed import MaskKey

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "UNKEYED_LAYER",
    "UNKEYED_SEED",
    "call_key",
    "check_placements",
    "check_sharding",
    "draw_sharded",
    "from_local_like",
    "is_dtensor",
    "local_range",
    "local_rows",
    "shard_like",
]

#: The key of unkeyed DTensor draws: a fixed (seed, layer) (``"dtensor"`` and ``"unkeyed"`` in
#: ASCII); the call's shared random bits go into the step (32 bits) and the high word of the
#: sample ids (31 bits), both tensors, so that nothing waits for the device.
UNKEYED_SEED = 0x64_74_65_6E_73_6F_72
UNKEYED_LAYER = 0x75_6E_6B_65_79_65_64


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
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in x.placements:
        if placement.is_shard(dim) and _placement_name(placement) != "Shard":
            fail(
                fn,
                "input",
                f"a DTensor whose dim {dim} is split into ranges (Shard({dim}) or Replicate)",
                Shown(f"a DTensor with placements {tuple(x.placements)}"),
            )
    shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    if not offset:  # a rank outside the mesh holds nothing
        return 0, 0
    return int(offset[dim]), int(shape[dim])


def shard_like(x: DTensor, local: Tensor, dims: Sequence[int]) -> DTensor:
    """Wrap ``local`` as the DTensor that broadcasts against ``x``, sized 1 outside ``dims``.

    ``local`` holds this rank's part: ``x``'s local size along ``dims`` and 1 elsewhere. The
    DTensor keeps ``x``'s ``Shard(d)`` for ``d`` in ``dims`` and is ``Replicate`` elsewhere (its
    size-1 dims hold the same values on every rank of a mesh dim that shards ``x`` there).
    """
    from torch.distributed.tensor import DTensor, Replicate

    placements = [
        p if p.is_shard() and getattr(p, "dim", None) in dims else Replicate() for p in x.placements
    ]
    shape = torch.Size([x.shape[d] if d in dims else 1 for d in range(x.dim())])
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * shape[d + 1]
    return DTensor.from_local(
        local, x.device_mesh, placements, run_check=False, shape=shape, stride=tuple(stride)
    )


def from_local_like(out: Tensor, x: DTensor) -> DTensor:
    """Wrap ``out``, this rank's result for ``x``'s local shard, with ``x``'s mesh and placements."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        out, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()
    )


def call_key(
    fn: str, x: DTensor, key: MaskKey | None, generator: torch.Generator | None, rows: int
) -> MaskKey:
    """The global key of one draw for ``x``: ``key`` itself, or the agreed key of an unkeyed call.

    The agreed key has ``rows`` sample ids ``0 .. rows - 1`` (the global batch positions; 1 for a
    per-call draw) and carries 63 random bits shared by every rank of ``x``'s mesh (see the module
    docstring): each rank draws them from its generator, then one broadcast per mesh dim of size
    > 1 from coordinate 0 makes them the first rank's.
    """
    if key is not None:
        return key
    import torch.distributed as dist

    device = x.device
    where = device if generator is None else generator.device
    with torch.no_grad():
        if generator is None:  # no generator= keyword (see _validation.generator_kwargs)
            bits = torch.randint(0, 1 << 31, (2,), dtype=torch.int64, device=where)
        else:
            bits = torch.randint(0, 1 << 31, (2,), dtype=torch.int64, device=where, generator=generator)
        bits = bits.to(device)
        mesh = x.device_mesh
        for d in range(mesh.ndim):
            if mesh.size(d) > 1:
                dist.broadcast(bits, group=mesh.get_group(d), group_src=0)
        ids = torch.arange(rows, dtype=torch.int64, device=device).add_(bits[1] << 32)
    return MaskKey(UNKEYED_SEED, bits[0], UNKEYED_LAYER, ids)


def local_rows(fn: str, key: MaskKey, x: DTensor) -> MaskKey:
    """``key`` with the sample ids of ``x``'s local samples (dim 0) only."""
    start, length = local_range(fn, x, 0)
    return key._replace(sample_ids=key.sample_ids[start : start + length])


def draw_sharded(
    fn: str,
    x: DTensor,
    key: MaskKey | None,
    generator: torch.Generator | None,
    column_dim: int | None,
    draw: Callable[[MaskKey, list[int], int], tuple[Tensor, ...]],
) -> tuple[DTensor, ...]:
    """Draw this rank's part of a per-sample (or per-(sample, channel)) noise for ``x``.

    ``draw(local_key, shape, first)`` returns local noise tensors of ``shape`` (``x``'s local
    batch size at dim 0, its local channels at ``column_dim``, 1 elsewhere) from the local key,
    whose columns start at ``first``, the global index of the first local channel (0 without
    ``column_dim``). Each is wrapped by :func:`shard_like`, ready to combine with ``x``.
    """
    check_placements(fn, x)
    dims = (0,) if column_dim is None else (0, column_dim)
    global_key = call_key(fn, x, key, generator, x.shape[0])
    shape = [1] * x.dim()
    first = 0
    for d in dims:
        start, length = local_range(fn, x, d)
        shape[d] = length
        if d == column_dim:
            first = start
    with torch.no_grad():
        local = draw(local_rows(fn, global_key, x), shape, first)
    return tuple(shard_like(x, t, dims) for t in local)


def check_sharding(fn: str, x: Tensor) -> None:
    """:func:`check_placements` for a DTensor; nothing for any other tensor."""
    if is_dtensor(x):
        check_placements(fn, x)
