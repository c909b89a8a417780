"""Spatial (channel-wise) dropout for any spatial rank and any channel position."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_unary

from ._compat import is_compiling
from ._dtensor import check_sharding, draw_sharded, is_dtensor, plain_like
from ._keyed import check_key_arg, keyed_keep
from ._module import StructuredDropout
from ._validation import (
    check_bool,
    check_channel_dim,
    check_float_input,
    check_generator,
    check_inplace_target,
    check_min_rank,
    check_p,
    check_scale_fits,
    generator_kwargs,
    squeeze_if,
)
from .keyed import MaskKey

__all__ = [
    "SpatialDropout",
    "SpatialDropout1d",
    "SpatialDropout2d",
    "SpatialDropout3d",
    "spatial_dropout",
]

_LAYOUT = "(N, C, *spatial), or (N, *spatial, C) with channel_dim=-1"


def spatial_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    channel_dim: int = 1,
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
) -> Tensor:
    r"""Zero whole channels of each sample at random (spatial dropout).

    For every sample ``n`` and channel ``c`` the slice ``input[n, c]`` (the channel axis given by
    ``channel_dim``) is either zeroed, with probability ``p``, or kept and scaled by
    ``1 / (1 - p)``. Adjacent positions of a feature map are strongly correlated, so dropping
    single activations barely regularises a conv net; dropping whole feature maps does
    (Tompson et al., "Efficient Object Localization Using Convolutional Networks", CVPR 2015,
    https://arxiv.org/abs/1411.4280).

    For channels-first input this is a drop-in for :func:`torch.nn.functional.dropout1d`,
    ``dropout2d`` and ``dropout3d``: with the same seed it draws the same random numbers and
    returns the same bits (the scale is rounded to the input's dtype, as torch does). Unlike
    those it works for any rank and any channel position, and never guesses: dim 0 is always
    the batch.

    A :class:`~torch.distributed.tensor.DTensor` input (``Shard`` of any dim or ``Replicate``;
    ``Partial`` is refused) gives a DTensor with its placements: keyed, with one id per sample of
    the *global* batch, the unsharded call's bits; unkeyed, the unsharded call's under the first
    rank's generator (one broadcast of the noise table): `docs/guide/keyed.md`.

    Args:
        input: a floating-point tensor with at least 3 dims, dim 0 the batch.
        p: probability of zeroing a channel, in ``[0, 1]``; for float16 input at most
            ``1 - 1/65504`` (about 0.99998) or exactly 1, so that the scale fits. Default: 0.5.
        training: apply dropout if ``True``; else return ``input`` unchanged. Default: True.
        inplace: write the result into ``input``. Default: False.
        channel_dim: the channel axis, any dim but 0; ``-1`` for channels-last. Default: 1.
        generator: the random number generator to draw from. Default: the global one.
        key: draw keyed masks instead (see :mod:`spatialdrop.keyed`): channel ``c`` of sample
            ``n`` is dropped iff ``keyed_uniform(key, C)[n, c] < p``, the same on any device,
            dtype, batch split or world size. Not together with ``generator``. Default: None.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`.
        - Output: the same shape, dtype and memory format as the input.

    Returns:
        The tensor with dropped channels zeroed and kept ones scaled.

    Examples:
        >>> import torch
        >>> from spatialdrop.functional import spatial_dropout
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.ones(2, 4, 3, 3)
        >>> y = spatial_dropout(x, p=0.5, generator=g)
        >>> y[:, :, 0, 0]
        tensor([[0., 0., 2., 0.],
                [0., 0., 2., 2.]])
        >>> bool((y == y[:, :, :1, :1]).all())  # each (n, c) slice is all kept or all dropped
        True
        >>> spatial_dropout(torch.ones(1, 5, 7, 3), p=0.5, channel_dim=-1).shape
        torch.Size([1, 5, 7, 3])
        >>> from spatialdrop import MaskKey  # keyed: sample 11 gets its mask in any batch
        >>> key = MaskKey(seed=0, step=0, layer=0, sample_ids=torch.tensor([10, 11]))
        >>> alone = key._replace(sample_ids=torch.tensor([11]))
        >>> torch.equal(spatial_dropout(x, 0.5, key=key)[1], spatial_dropout(x[1:], 0.5, key=alone)[0])
        True
    """
    if has_torch_function_unary(input):  # torch.fx proxies, tensor subclasses: as torch's dropout
        return handle_torch_function(
            spatial_dropout,
            (input,),
            input,
            p,
            training,
            inplace,
            channel_dim=channel_dim,
            generator=generator,
            key=key,
        )
    fn = "spatial_dropout"
    check_float_input(fn, input)
    p = check_p(fn, p)
    check_min_rank(fn, input, 3, _LAYOUT)
    dim = check_channel_dim(fn, channel_dim, input.dim())
    check_bool(fn, "training", training)
    check_bool(fn, "inplace", inplace)
    check_generator(fn, generator)
    check_key_arg(fn, key, generator, input.shape[0])
    check_sharding(fn, input)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    check_inplace_target(fn, input, inplace)
    if p == 1.0:
        zero = input.new_zeros(())
        return input.mul_(zero) if inplace else input * zero
    check_scale_fits(fn, p, input.dtype, 1.0 / (1.0 - p), "1/(1-p)")
    if is_dtensor(input):  # each rank gets its part of one mask (see spatialdrop._dtensor)
        plain = plain_like(input)
        (factor,) = draw_sharded(
            fn,
            input,
            key,
            dim,
            lambda k, shape, first: draw_keep(plain, shape, p, generator, k, first),
            lambda keep: (keep.div_(1.0 - p),),
        )
        return input.mul_(factor) if inplace else input * factor
    with torch.no_grad():
        noise = draw_keep(input, channel_noise_shape(input, dim), p, generator, key)
        noise.div_(1.0 - p)
    return input.mul_(noise) if inplace else input * noise


def draw_keep(
    like: Tensor,
    shape: Sequence[int],
    p: float,
    generator: torch.Generator | None,
    key: MaskKey | None,
    first: int = 0,
) -> Tensor:
    """A keep mask of ``shape`` (1 kept, 0 dropped) in ``like``'s dtype: keyed, or torch's draw.

    With a ``key``, :func:`~spatialdrop._keyed.keyed_keep` (columns from ``first``); else
    :func:`bernoulli_keep` from ``generator``.
    """
    if key is not None:
        return keyed_keep(key, p, shape, like, first=first)
    return bernoulli_keep(like, shape, p, generator)


def bernoulli_keep(like: Tensor, shape: Sequence[int], p: float, generator: torch.Generator | None) -> Tensor:
    """1 (kept, probability ``1 - p``) or 0 per element of ``shape``, in ``like``'s dtype and device.

    In eager mode this is ``like.new_empty(shape).bernoulli_(1 - p)``, the call of torch's
    ``dropout1d/2d/3d``, so the same seed gives the same bits. Under ``torch.compile`` it is
    ``rand(shape) < 1 - p`` in float32, what inductor makes of ``bernoulli_`` anyway: with a
    float argument ``bernoulli_`` would make the compiler specialise on ``p`` and recompile for
    every new rate (a :class:`~spatialdrop.DropSchedule` changes it every step), whereas here
    ``p`` stays symbolic.
    """
    if is_compiling():
        if generator is None:  # no generator= keyword: see _validation.generator_kwargs
            u = torch.rand(tuple(shape), dtype=torch.float32, device=like.device)
        else:
            u = torch.rand(tuple(shape), generator=generator, dtype=torch.float32, device=like.device)
        return (u < 1.0 - p).to(like.dtype)
    return like.new_empty(shape).bernoulli_(1.0 - p, **generator_kwargs(generator))


def channel_noise_shape(input: Tensor, channel_dim: int) -> list[int]:
    """Shape ``(N, 1, .., C, .., 1)`` of a per-(sample, channel) tensor broadcastable to ``input``."""
    shape = [1] * input.dim()
    shape[0] = input.shape[0]
    shape[channel_dim] = input.shape[channel_dim]
    return shape


class SpatialDropout(StructuredDropout):
    r"""Spatial (channel-wise) dropout for input of any rank ≥ 3.

    See :func:`spatialdrop.functional.spatial_dropout`: each ``input[n, c]`` slice is zeroed
    with probability ``p`` or kept and scaled by ``1 / (1 - p)``. Eval mode is the identity.

    Args:
        p: probability of zeroing a channel, in ``[0, 1]``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis (never 0, the batch); ``-1`` for channels-last. Default: 1.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`; batched only.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import SpatialDropout
        >>> m = SpatialDropout(p=0.2, channel_dim=-1)
        >>> m
        SpatialDropout(p=0.2, inplace=False, channel_dim=-1)
        >>> m(torch.randn(8, 100, 64)).shape  # (N, L, C) token features
        torch.Size([8, 100, 64])
    """

    def dropout(self, input: Tensor) -> Tensor:
        """Apply :func:`~spatialdrop.functional.spatial_dropout` with this module's settings."""
        x, unbatched = self.batched(input)
        key = self.mask_key(x.shape[0], x.device)
        out = spatial_dropout(x, self.p, self.training, self.inplace, channel_dim=self.channel_dim, key=key)
        return squeeze_if(out, unbatched)


class SpatialDropout1d(SpatialDropout):
    r"""Spatial dropout for sequences: zeroes whole channels of ``(N, C, L)`` or ``(C, L)`` input.

    A drop-in for :class:`torch.nn.Dropout1d` that also takes channels-last ``(N, L, C)`` input
    with ``channel_dim=-1``.

    Args:
        p: probability of zeroing a channel, in ``[0, 1]``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout, 1 or 2 (-1). Default: 1.

    Shape:
        - Input: :math:`(N, C, L)` or unbatched :math:`(C, L)`; with ``channel_dim=-1``
          :math:`(N, L, C)` or :math:`(L, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import SpatialDropout1d
        >>> SpatialDropout1d(0.1)(torch.randn(4, 16, 50)).shape
        torch.Size([4, 16, 50])
        >>> SpatialDropout1d(0.1, channel_dim=-1)(torch.randn(50, 16)).shape  # unbatched (L, C)
        torch.Size([50, 16])
    """

    spatial_dims = 1


class SpatialDropout2d(SpatialDropout):
    r"""Spatial dropout for images: zeroes whole channels of ``(N, C, H, W)`` or ``(C, H, W)``.

    A drop-in for :class:`torch.nn.Dropout2d`, except that a 3-D input is read as unbatched
    ``(C, H, W)`` (torch reads it as ``(N, C, L)`` and warns), and channels-last ``(N, H, W, C)``
    works with ``channel_dim=-1``.

    Args:
        p: probability of zeroing a channel, in ``[0, 1]``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, H, W)` or unbatched :math:`(C, H, W)`; with ``channel_dim=-1``
          :math:`(N, H, W, C)` or :math:`(H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import SpatialDropout2d
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> y = SpatialDropout2d(0.5)(torch.ones(6, 4, 4))  # unbatched: one mask per channel
        >>> y.amax(dim=(1, 2)) == y.amin(dim=(1, 2))
        tensor([True, True, True, True, True, True])
    """

    spatial_dims = 2


class SpatialDropout3d(SpatialDropout):
    r"""Spatial dropout for volumes: zeroes whole channels of ``(N, C, D, H, W)`` or ``(C, D, H, W)``.

    A drop-in for :class:`torch.nn.Dropout3d` that also takes channels-last input.

    Args:
        p: probability of zeroing a channel, in ``[0, 1]``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, D, H, W)` or unbatched :math:`(C, D, H, W)`; with
          ``channel_dim=-1`` :math:`(N, D, H, W, C)` or :math:`(D, H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import SpatialDropout3d
        >>> SpatialDropout3d(0.2)(torch.randn(2, 8, 4, 4, 4)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    spatial_dims = 3
