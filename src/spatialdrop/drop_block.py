"""DropBlock for any spatial rank: calibrated drop rate, per-channel or shared masks, sparse seeds.

How a mask is made. Per spatial dim of size ``L`` and block side ``b``, block *seeds* live on a
grid of ``L + b - 1`` places (``seeding="uniform"``); the seed at grid index ``j`` drops the map
positions ``[j - b + 1, j]`` that lie in ``[0, L)``. Every map position is then covered by
exactly ``b`` seed places per dim, ``k = prod(b)`` in all, corners included, so with seeds drawn
independently at rate ``gamma = 1 - (1 - p) ** (1 / k)`` every position is dropped with
probability exactly ``p``. With ``seeding="valid"`` seeds only sit where a whole block fits
(``L - b + 1`` places per dim, the paper's placement) and ``gamma`` is solved numerically so that
the *mean* drop rate over the map is ``p``.

How it is fast. ``gamma`` is tiny (about 0.002 for ``p = 0.1`` and a 7 x 7 block), so seeds are
drawn sparsely: the gaps between successes of a Bernoulli(``gamma``) sequence are geometric, so
drawing the gaps gives exactly a Bernoulli seed grid at the cost of a few random numbers per
*seed* rather than one per position. Per-channel masks are never materialised (see
:func:`drop_block`, "Memory and paths").

This module holds the public op and modules; the internals are in :mod:`spatialdrop._dropblock`,
whose dispatcher (:mod:`spatialdrop._dropblock.ops`) lists every path a call can take.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_unary

from ._dropblock.geometry import Geometry, check_representable, geometry
from ._dropblock.keyed_seeds import _MAX_ROW as _MAX_KEYED_ROW
from ._dropblock.ops import Call, run
from ._dropblock.scale import POLICIES, scale_factor
from ._dropblock.window import local_geometry, window_of
from ._dtensor import (
    call_key,
    check_sharding,
    eager_under_compile,
    from_local_like,
    is_dtensor,
    local_range,
    local_rows,
    split_mesh_dims,
    sum_over_shards,
)
from ._keyed import check_key_arg
from ._module import StructuredDropout
from ._validation import (
    check_bool,
    check_channel_dim,
    check_choice,
    check_float_input,
    check_generator,
    check_inplace_target,
    check_min_rank,
    check_p,
    check_sizes,
    fail,
    squeeze_if,
)
from .keyed import MaskKey

__all__ = [
    "DropBlock",
    "DropBlock1d",
    "DropBlock2d",
    "DropBlock3d",
    "drop_block",
]

_LAYOUT = "(N, C, *spatial), or (N, *spatial, C) with channel_dim=-1"
SEEDINGS = ("uniform", "valid")
SCALES = POLICIES

BlockSize = Union[int, Sequence[int]]


# --- the op --------------------------------------------------------------------------------


def drop_block(
    input: Tensor,
    p: float = 0.1,
    block_size: BlockSize = 7,
    training: bool = True,
    inplace: bool = False,
    *,
    channel_dim: int = 1,
    shared_channels: bool = False,
    seeding: str = "uniform",
    scale: str = "expected",
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
) -> Tensor:
    r"""Zero contiguous blocks of each feature map at random (DropBlock), for any spatial rank.

    For every sample ``n`` and channel ``c`` the map ``input[n, c]`` (channel axis set by
    ``channel_dim``, every other non-batch dim spatial) gets its own mask: block seeds are drawn
    independently and every position inside a seed's block (a box of ``block_size``) is zeroed;
    kept positions are scaled. Dropping contiguous regions removes the spatially correlated
    evidence that plain dropout leaves behind (Ghiasi, Lin, Le, "DropBlock: A regularization
    method for convolutional networks", NeurIPS 2018, https://arxiv.org/abs/1810.12890).

    Calibration. With ``seeding="uniform"`` (default) seeds may sit wherever a block still
    overlaps the map (blocks are cut at the borders) and the seed rate is
    ``gamma = 1 - (1 - p) ** (1 / prod(block_size))``: every position, corner, edge or centre,
    is dropped with probability exactly ``p``. A block larger than the map works the same way
    (a seed then drops the part of the block inside the map) and keeps the rate exactly ``p``.
    ``block_size=1`` is elementwise dropout. With ``seeding="valid"`` seeds sit only where a
    whole block fits, as in the paper, and ``gamma`` is solved so that the *mean* drop rate
    over the map is ``p``; positions near the border are then dropped less often than the
    centre, by nature of the placement. A block larger than the map has no valid placement and
    raises ``ValueError``.

    Memory and paths. No float mask is built. On the CPU, per-channel masks are applied by
    zeroing the dropped positions of ``input * scale`` (work per seed, not per position): for
    float32/float64 in one sweep of a small C extension (optional: without it, torch ops give
    the same bits) that zeroes each block straight from the seeds right after multiplying its
    rows; for backward autograd keeps the seeds (int32, or else the positions to zero as int32
    block-row offsets) when they take at most 1/32 of the input's bytes, else nothing of
    per-element size: the mask is re-created from a saved 64-bit seed (or the key), as it
    always is for shared masks. The op is opaque to ``torch.compile`` (custom ops
    ``spatialdrop::drop_block_*``), so compiled code runs the same path and gives the same
    result; every order of derivative works. CUDA input takes fused Triton kernels when
    ``triton`` is installed (else, like meta input and ``torch.export``, a static-shape dense
    path); neither synchronises with the host.

    Numerics. As torch's ``dropout``, every path multiplies: a dropped element is ``x * 0``, so
    NaN or infinite input gives NaN there (and finite input a zero of its sign); the gradient
    and the forward-mode tangent (``torch.func.jvp``, ``torch.autograd.forward_ad``) are
    ``mask * scale * grad`` (``docs/guide/numerics.md``).

    Args:
        input: a floating-point tensor ``(N, C, *spatial)`` with at least one spatial dim.
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: side of a block, an int or a tuple with one entry per spatial dim (even and
            rectangular sizes work). Default: 7.
        training: apply DropBlock if ``True``; else return ``input`` unchanged. Default: True.
        inplace: write the result into ``input``. Default: False.
        channel_dim: the channel axis, any dim but 0; ``-1`` for channels-last. Default: 1.
        shared_channels: one mask per sample, shared by all channels, instead of one per
            (sample, channel). Default: False.
        seeding: ``"uniform"`` (exact rate ``p`` at every position) or ``"valid"`` (whole
            blocks only, mean rate ``p``). Default: ``"uniform"``.
        scale: ``"expected"`` multiplies kept elements by ``1 / (1 - p)`` (unbiased, since the
            drop rate is exact, and independent of the rest of the batch); ``"realized"``
            divides by each sample's own kept fraction, computed in float32 (a sample with
            nothing kept becomes all zeros); ``"none"`` does not rescale.
            Default: ``"expected"``.
        generator: the random number generator to draw from. Default: the global one.
        key: draw keyed masks instead (see :mod:`spatialdrop.keyed`): a sample's masks depend
            only on the key's seed, step, layer and the sample's id, the same on any device,
            dtype, batch split or world size. Not together with ``generator``. Default: None.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`.
        - Output: the same shape, dtype and memory format as the input.

    Returns:
        The tensor with dropped blocks zeroed and kept elements scaled.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``, a bad ``block_size``, ``seeding`` or ``scale``,
            or ``seeding="valid"`` with a block larger than the map.
        TypeError: a non-float input or an argument of the wrong type.

    Examples:
        >>> import torch
        >>> from spatialdrop.functional import drop_block
        >>> g = torch.Generator().manual_seed(21)
        >>> y = drop_block(torch.ones(1, 1, 6, 8), p=0.2, block_size=3, generator=g)
        >>> (y > 0).long()[0, 0]  # 3 x 3 blocks, cut where they overlap the border
        tensor([[1, 1, 1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1, 1, 1, 1],
                [1, 1, 1, 1, 0, 0, 0, 1],
                [1, 1, 1, 1, 0, 0, 0, 1]])
        >>> y.max()  # kept elements scaled by 1 / (1 - p)
        tensor(1.2500)
        >>> drop_block(torch.randn(2, 16, 32), p=0.1, block_size=5).shape  # 1-D
        torch.Size([2, 16, 32])
        >>> drop_block(torch.randn(2, 4, 8, 8, 8), p=0.1, block_size=(3, 3, 2)).shape  # 3-D
        torch.Size([2, 4, 8, 8, 8])
    """
    if has_torch_function_unary(input):  # torch.fx proxies, tensor subclasses: as torch's dropout
        return handle_torch_function(
            drop_block,
            (input,),
            input,
            p,
            block_size,
            training,
            inplace,
            channel_dim=channel_dim,
            shared_channels=shared_channels,
            seeding=seeding,
            scale=scale,
            generator=generator,
            key=key,
        )
    fn = "drop_block"
    check_float_input(fn, input)
    p = check_p(fn, p, allow_one=False)
    check_min_rank(fn, input, 3, _LAYOUT)
    cd = check_channel_dim(fn, channel_dim, input.dim())
    blocks = check_sizes(fn, "block_size", block_size, input.dim() - 2)
    check_bool(fn, "training", training)
    check_bool(fn, "inplace", inplace)
    check_bool(fn, "shared_channels", shared_channels)
    check_choice(fn, "seeding", seeding, SEEDINGS)
    check_choice(fn, "scale", scale, SCALES)
    check_generator(fn, generator)
    check_key_arg(fn, key, generator, input.shape[0])
    geo = geometry(input.shape, cd, blocks, shared_channels, seeding)
    if seeding == "valid" and any(b > s for b, s in zip(blocks, geo.sizes)):
        fail(
            fn,
            "block_size",
            f"at most the map size {geo.sizes} in every dim with seeding='valid' (no whole block "
            "fits otherwise; seeding='uniform' handles larger blocks)",
            block_size,
        )
    check_representable(fn, geo, block_size)
    if key is not None or is_dtensor(input):  # a keyed draw (a DTensor's unkeyed call agrees on a key)
        _check_keyed_row(fn, geo, input, block_size)
    check_sharding(fn, input)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    check_inplace_target(fn, input, inplace)
    if is_dtensor(input):
        return _sharded(input, p, geo, seeding, scale, generator, key, inplace)
    return run(Call(input, p, geo, seeding, scale, generator, key, inplace))


def _check_keyed_row(fn: str, geo: Geometry, input: Tensor, block_size: Any) -> None:
    """Refuse, naming ``block_size`` and the input's size, a sample's keyed seed grid past 2**34 places.

    The keyed seed rule counts a sample's places in 32-bit counters of 4 places each.
    """
    n = input.shape[0]
    row = geo.places // n if n else 0
    if row > _MAX_KEYED_ROW:
        per = "" if geo.shared else f", times {geo.channels} channels"
        fail(
            fn,
            "block_size",
            f"small enough, for an input of size {tuple(input.shape)}, that a sample's keyed seed grid "
            f"(map size + block_size - 1 per dim{per}) has at most 2**34 places; it would have {row}",
            block_size,
        )


@eager_under_compile
def _sharded(
    x: Tensor,
    p: float,
    geo: Geometry,
    seeding: str,
    scale: str,
    generator: torch.Generator | None,
    key: MaskKey | None,
    inplace: bool,
) -> Tensor:
    """DropBlock of a DTensor: every rank computes the window of the global mask that it holds.

    The local op runs on the local shard with a window (:mod:`spatialdrop._dropblock.window`):
    the seeds of the local samples' global seed grid whose blocks reach the shard, halos
    included, from global coordinates, with no communication. Keyed, the result is the unsharded
    call's, bit for bit; unkeyed, :func:`~spatialdrop._dtensor.call_key` makes one agreed key
    (one 16-byte broadcast), so replicas agree and shards are parts of one mask. With
    ``scale="realized"`` over a sample split across ranks, its dropped count is summed over them.
    The output has the input's placements.
    """
    fn = "drop_block"
    local_key = local_rows(fn, call_key(fn, x, key, generator, x.shape[0]), x)  # type: ignore[arg-type]
    ranges = {d: local_range(fn, x, d) for d in range(1, x.dim())}  # type: ignore[arg-type]
    window = window_of(
        geo.channels, ranges[geo.channel_dim][0], geo.sizes, [ranges[d][0] for d in geo.spatial]
    )
    local = x.to_local()  # type: ignore[attr-defined]
    geo_l = local_geometry(local.shape, geo.channel_dim, geo.blocks, geo.shared)
    counted = [d for d in range(1, x.dim()) if not (geo.shared and d == geo.channel_dim)]
    # from the placements, not the shard's size: every rank joins the all-reduce or none does
    split = bool(split_mesh_dims(x, counted))  # type: ignore[arg-type]
    local_scale = "none" if scale == "realized" and split else scale
    call = Call(local, p, geo_l, seeding, local_scale, None, local_key, False, window)
    out = run(call) if local.numel() else local.clone()
    if local_scale != scale:  # a sample's kept fraction, over all the ranks that hold a part of it
        dropped = torch.zeros(local.shape[0], dtype=torch.int64, device=local.device)
        if local.numel():
            mask = run(call._replace(input=torch.ones_like(local), scale="none")) == 0
            if geo.shared:
                mask = mask.narrow(geo.channel_dim, 0, 1)
            dropped += mask.sum(dim=tuple(range(1, mask.dim())), dtype=torch.int64)
        sum_over_shards(x, dropped, counted)  # type: ignore[arg-type]
        factor = scale_factor("realized", p, dropped, math.prod(geo.map_shape[1:]), local)
        assert factor is not None
        out = (out.to(factor.dtype) * factor.view((-1,) + (1,) * (out.dim() - 1))).to(out.dtype)
    result = from_local_like(out, x)  # type: ignore[arg-type]
    return x.copy_(result) if inplace else result


# --- modules -------------------------------------------------------------------------------


def _check_block_size(fn: str, block_size: Any, n: int | None) -> BlockSize:
    """Validate ``block_size`` at construction; the length is checked per call when ``n`` is None."""
    if n is not None:
        check_sizes(fn, "block_size", block_size, n)
    elif isinstance(block_size, (tuple, list)):
        check_sizes(fn, "block_size", block_size, len(block_size))
    elif isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        fail(fn, "block_size", "a positive int or a tuple of positive ints", block_size, kind=TypeError)
    elif block_size < 1:
        fail(fn, "block_size", "a positive int or a tuple of positive ints", block_size)
    return tuple(int(b) for b in block_size) if isinstance(block_size, (tuple, list)) else int(block_size)


class DropBlock(StructuredDropout):
    r"""DropBlock for input of any spatial rank (batched only).

    See :func:`spatialdrop.functional.drop_block`: blocks of ``block_size`` are zeroed in every
    ``input[n, c]`` map so that each position is dropped with probability ``p``; kept elements
    are scaled. Eval mode is the identity.

    Args:
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: side of a block, an int or one int per spatial dim. Default: 7.
        inplace: write the result into the input. Default: False.
        shared_channels: one mask per sample shared by all channels. Default: False.
        seeding: ``"uniform"`` or ``"valid"``. Default: ``"uniform"``.
        scale: ``"expected"``, ``"realized"`` or ``"none"``. Default: ``"expected"``.
        channel_dim: the channel axis (never 0, the batch); ``-1`` for channels-last. Default: 1.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropBlock
        >>> m = DropBlock(0.1, block_size=(3, 5, 5, 5))
        >>> m(torch.randn(2, 3, 8, 10, 10, 10)).shape  # 4 spatial dims
        torch.Size([2, 3, 8, 10, 10, 10])
    """

    allow_p_one = False
    block_size: BlockSize
    shared_channels: bool
    seeding: str
    scale: str

    def __init__(
        self,
        p: float = 0.1,
        block_size: BlockSize = 7,
        inplace: bool = False,
        *,
        shared_channels: bool = False,
        seeding: str = "uniform",
        scale: str = "expected",
        channel_dim: int = 1,
    ) -> None:
        super().__init__(p, inplace, channel_dim=channel_dim)
        name = type(self).__name__
        self.block_size = _check_block_size(name, block_size, self.spatial_dims)
        self.shared_channels = check_bool(name, "shared_channels", shared_channels)
        self.seeding = check_choice(name, "seeding", seeding, SEEDINGS)
        self.scale = check_choice(name, "scale", scale, SCALES)

    def dropout(self, input: Tensor) -> Tensor:
        """Apply :func:`~spatialdrop.functional.drop_block` with this module's settings."""
        x, unbatched = self.batched(input)
        out = drop_block(
            x,
            self.p,
            self.block_size,
            self.training,
            self.inplace,
            channel_dim=self.channel_dim,
            shared_channels=self.shared_channels,
            seeding=self.seeding,
            scale=self.scale,
            key=self.mask_key(x.shape[0], x.device),
        )
        return squeeze_if(out, unbatched)

    def extra_options(self) -> dict[str, Any]:
        """``block_size``, ``seeding``, ``scale`` and ``shared_channels`` for ``repr``."""
        return {
            "block_size": self.block_size,
            "seeding": self.seeding,
            "scale": self.scale,
            "shared_channels": self.shared_channels,
        }


class DropBlock1d(DropBlock):
    r"""DropBlock for sequences: zeroes runs of ``block_size`` steps in ``(N, C, L)`` or ``(C, L)``.

    Args:
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: length of a dropped run. Default: 7.
        inplace: write the result into the input. Default: False.
        shared_channels: one mask per sample shared by all channels. Default: False.
        seeding: ``"uniform"`` or ``"valid"``. Default: ``"uniform"``.
        scale: ``"expected"``, ``"realized"`` or ``"none"``. Default: ``"expected"``.
        channel_dim: the channel axis of the batched layout, 1 or 2 (-1). Default: 1.

    Shape:
        - Input: :math:`(N, C, L)` or unbatched :math:`(C, L)`; with ``channel_dim=-1``
          :math:`(N, L, C)` or :math:`(L, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropBlock1d
        >>> torch.manual_seed(8)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> y = DropBlock1d(0.3, block_size=4)(torch.ones(1, 20))  # unbatched (C, L)
        >>> (y > 0).long()  # a run of 4, and one cut by the end of the sequence
        tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    """

    spatial_dims = 1


class DropBlock2d(DropBlock):
    r"""DropBlock for images: zeroes ``block_size`` squares in ``(N, C, H, W)`` or ``(C, H, W)``.

    Unlike ``torchvision.ops.DropBlock2d`` every position is dropped with probability exactly
    ``p`` (corners included), masks are per channel by default, and the scale does not depend
    on the rest of the batch.

    Args:
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: side of a block, an int or ``(h, w)``. Default: 7.
        inplace: write the result into the input. Default: False.
        shared_channels: one mask per sample shared by all channels. Default: False.
        seeding: ``"uniform"`` or ``"valid"``. Default: ``"uniform"``.
        scale: ``"expected"``, ``"realized"`` or ``"none"``. Default: ``"expected"``.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, H, W)` or unbatched :math:`(C, H, W)`; with ``channel_dim=-1``
          :math:`(N, H, W, C)` or :math:`(H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropBlock2d
        >>> m = DropBlock2d(0.1, block_size=5)
        >>> m
        DropBlock2d(p=0.1, inplace=False, block_size=5, seeding='uniform', scale='expected',
                    shared_channels=False)
        >>> m(torch.randn(8, 64, 28, 28)).shape
        torch.Size([8, 64, 28, 28])
    """

    spatial_dims = 2


class DropBlock3d(DropBlock):
    r"""DropBlock for volumes: zeroes ``block_size`` cubes in ``(N, C, D, H, W)`` or ``(C, D, H, W)``.

    Args:
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: side of a block, an int or ``(d, h, w)``. Default: 7.
        inplace: write the result into the input. Default: False.
        shared_channels: one mask per sample shared by all channels. Default: False.
        seeding: ``"uniform"`` or ``"valid"``. Default: ``"uniform"``.
        scale: ``"expected"``, ``"realized"`` or ``"none"``. Default: ``"expected"``.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, D, H, W)` or unbatched :math:`(C, D, H, W)`; with
          ``channel_dim=-1`` :math:`(N, D, H, W, C)` or :math:`(D, H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropBlock3d
        >>> DropBlock3d(0.1, block_size=(1, 3, 3), shared_channels=True)(torch.randn(2, 8, 4, 16, 16)).shape
        torch.Size([2, 8, 4, 16, 16])
    """

    spatial_dims = 3
