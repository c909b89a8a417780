"""Channel-wise alpha dropout for self-normalising (SELU) networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_unary

from ._dtensor import check_sharding, draw_sharded, is_dtensor, plain_like
from ._keyed import check_key_arg
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
    squeeze_if,
)
from .keyed import MaskKey
from .spatial_dropout import channel_noise_shape, draw_keep

__all__ = [
    "AlphaSpatialDropout",
    "AlphaSpatialDropout1d",
    "AlphaSpatialDropout2d",
    "AlphaSpatialDropout3d",
    "alpha_spatial_dropout",
]

_LAYOUT = "(N, C, *spatial), or (N, *spatial, C) with channel_dim=-1"

#: The value SELU tends to for large negative input, ``-scale * alpha`` (the paper's ``α'``, < 0).
SELU_NEG_SATURATION = -1.7580993408473766


def _draw_factors(
    input: Tensor,
    channel_dim: int,
    p: float,
    a: float,
    generator: torch.Generator | None,
    key: MaskKey | None,
) -> tuple[Tensor, Tensor]:
    """Every random number of alpha spatial dropout is drawn here: ``(factor, offset)`` per (n, c).

    The keep mask (1 kept, 0 dropped) is drawn with ``bernoulli_`` on a ``new_empty`` tensor in
    the input's dtype, the call that :func:`torch.nn.functional.feature_alpha_dropout` makes, so
    the same seed gives the same mask (in eager mode; see
    :func:`~spatialdrop.spatial_dropout.bernoulli_keep`), then turned into :func:`_affine`'s
    factor and offset. A DTensor input gets those of its local samples and channels (see
    :mod:`spatialdrop._dtensor`).
    """
    if is_dtensor(input):
        plain = plain_like(input)
        factor, offset = draw_sharded(
            "alpha_spatial_dropout",
            input,
            key,
            channel_dim,
            lambda k, shape, first: draw_keep(plain, shape, p, generator, k, first),
            lambda keep: _affine(keep, p, a),
        )
        return factor, offset
    with torch.no_grad():
        return _affine(draw_keep(input, channel_noise_shape(input, channel_dim), p, generator, key), p, a)


def alpha_spatial_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    channel_dim: int = 1,
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
) -> Tensor:
    r"""Channel-wise alpha dropout: drop whole channels of a SELU network, keeping mean 0 and variance 1.

    For every sample ``n`` and channel ``c`` the slice ``input[n, c]`` (the channel axis given by
    ``channel_dim``) is, with probability ``p``, set to SELU's negative saturation value
    :math:`\alpha' = -1.7581`, else kept; then the affine map :math:`a x + b` with
    :math:`a = ((1 - p)(1 + p \alpha'^2))^{-1/2}`, :math:`b = -a p \alpha'` restores mean 0 and
    variance 1 for an input of mean 0 and variance 1 (Klambauer et al., "Self-Normalizing Neural
    Networks", NeurIPS 2017, https://arxiv.org/abs/1706.02515). Kept values become
    :math:`a x + b`, dropped ones the constant :math:`a \alpha' (1 - p)`.

    For channels-first input this is a drop-in for
    :func:`torch.nn.functional.feature_alpha_dropout`: with the same seed it draws the same random
    numbers and returns the same bits (the arithmetic is in the input's dtype, as torch's).
    Unlike it, any channel position works, dim 0 is always the batch, and ``p = 1`` is refused
    (``a`` is undefined there; torch returns zeros).

    A :class:`~torch.distributed.tensor.DTensor` input (``Shard`` of any dim or ``Replicate``;
    ``Partial`` is refused) gives a DTensor with its placements: keyed, with one id per sample of
    the *global* batch, the unsharded call's bits; unkeyed, the unsharded call's under the first
    rank's generator (one broadcast of the noise table): `docs/guide/keyed.md`.

    Args:
        input: a floating-point tensor with at least 3 dims, dim 0 the batch.
        p: probability of dropping a channel, in ``[0, 1)``. Default: 0.5.
        training: apply dropout if ``True``; else return ``input`` unchanged. Default: True.
        inplace: write the result into ``input``. Default: False.
        channel_dim: the channel axis, any dim but 0; ``-1`` for channels-last. Default: 1.
        generator: the random number generator to draw from. Default: the global one.
        key: draw keyed masks instead (see :mod:`spatialdrop.keyed`): the same on any device,
            dtype, batch split or world size for a given sample id. Not together with
            ``generator``. Default: None.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`.
        - Output: the same shape, dtype and memory format as the input.

    Returns:
        The tensor with dropped channels set to the saturation value, then affinely rescaled.

    Examples:
        >>> import torch
        >>> from spatialdrop.functional import alpha_spatial_dropout
        >>> g = torch.Generator().manual_seed(0)
        >>> y = alpha_spatial_dropout(torch.zeros(2, 4, 3, 3), p=0.5, generator=g)
        >>> y[:, :, 0, 0]  # kept: a * 0 + b = 0.7792; dropped: a * α' * (1 - p) = -0.7792
        tensor([[-0.7792, -0.7792,  0.7792, -0.7792],
                [-0.7792, -0.7792,  0.7792,  0.7792]])
        >>> bool((y == y[:, :, :1, :1]).all())
        True
    """
    if has_torch_function_unary(input):  # torch.fx proxies, tensor subclasses: as torch's dropout
        return handle_torch_function(
            alpha_spatial_dropout,
            (input,),
            input,
            p,
            training,
            inplace,
            channel_dim=channel_dim,
            generator=generator,
            key=key,
        )
    fn = "alpha_spatial_dropout"
    check_float_input(fn, input)
    p = check_p(fn, p, allow_one=False)
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
    alpha = -SELU_NEG_SATURATION  # ATen's alpha in _dropout_impl: 1.7581
    a = 1.0 / math.sqrt((alpha * alpha * p + 1.0) * (1.0 - p))
    check_scale_fits(fn, p, input.dtype, alpha * a, "a |alpha'| = 1.7581 / sqrt((1 + 3.0909 p)(1 - p))")
    keep, b = _draw_factors(input, dim, p, a, generator, key)
    out = input.mul_(keep) if inplace else input * keep
    return out.add_(b)


def _affine(keep: Tensor, p: float, a: float) -> tuple[Tensor, Tensor]:
    """``(factor, offset)`` from a keep mask (overwritten): the output is ``input * factor + offset``.

    The operations of ATen's ``_dropout_impl<feature, alpha>``, in the same order and dtype.
    """
    alpha = -SELU_NEG_SATURATION  # ATen's alpha in _dropout_impl: 1.7581
    b = keep.add(-1.0).mul_(alpha * a).add_(alpha * a * p)
    return keep.mul_(a), b


class AlphaSpatialDropout(StructuredDropout):
    r"""Channel-wise alpha dropout for SELU networks, input of any rank ≥ 3.

    See :func:`spatialdrop.functional.alpha_spatial_dropout`: each ``input[n, c]`` slice is set
    to SELU's saturation value with probability ``p``, then all values are mapped affinely so
    that mean 0 and variance 1 are kept. Eval mode is the identity.

    Args:
        p: probability of dropping a channel, in ``[0, 1)``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis (never 0, the batch); ``-1`` for channels-last. Default: 1.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`; batched only.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import AlphaSpatialDropout
        >>> net = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3), torch.nn.SELU(), AlphaSpatialDropout(0.1))
        >>> net[2]
        AlphaSpatialDropout(p=0.1, inplace=False)
        >>> net(torch.randn(2, 4, 20)).shape
        torch.Size([2, 8, 18])
    """

    allow_p_one = False

    def dropout(self, input: Tensor) -> Tensor:
        """Apply :func:`~spatialdrop.functional.alpha_spatial_dropout` with this module's settings."""
        x, unbatched = self.batched(input)
        key = self.mask_key(x.shape[0], x.device)
        out = alpha_spatial_dropout(
            x, self.p, self.training, self.inplace, channel_dim=self.channel_dim, key=key
        )
        return squeeze_if(out, unbatched)


class AlphaSpatialDropout1d(AlphaSpatialDropout):
    r"""Channel-wise alpha dropout for sequences, ``(N, C, L)`` or unbatched ``(C, L)``.

    Args:
        p: probability of dropping a channel, in ``[0, 1)``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout, 1 or 2 (-1). Default: 1.

    Shape:
        - Input: :math:`(N, C, L)` or :math:`(C, L)`; with ``channel_dim=-1`` :math:`(N, L, C)`
          or :math:`(L, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import AlphaSpatialDropout1d
        >>> AlphaSpatialDropout1d(0.1)(torch.randn(16, 50)).shape  # unbatched (C, L)
        torch.Size([16, 50])
    """

    spatial_dims = 1


class AlphaSpatialDropout2d(AlphaSpatialDropout):
    r"""Channel-wise alpha dropout for images, ``(N, C, H, W)`` or unbatched ``(C, H, W)``.

    Unlike :class:`torch.nn.FeatureAlphaDropout`, which reads an unbatched ``(C, H, W)`` input as
    ``(N, C, L)`` and so drops rows, this drops whole channels of unbatched input too.

    Args:
        p: probability of dropping a channel, in ``[0, 1)``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(C, H, W)`; with ``channel_dim=-1``
          :math:`(N, H, W, C)` or :math:`(H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import AlphaSpatialDropout2d
        >>> y = AlphaSpatialDropout2d(0.5)(torch.zeros(6, 4, 4))  # unbatched: one draw per channel
        >>> y.amax(dim=(1, 2)) == y.amin(dim=(1, 2))
        tensor([True, True, True, True, True, True])
    """

    spatial_dims = 2


class AlphaSpatialDropout3d(AlphaSpatialDropout):
    r"""Channel-wise alpha dropout for volumes, ``(N, C, D, H, W)`` or unbatched ``(C, D, H, W)``.

    Args:
        p: probability of dropping a channel, in ``[0, 1)``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, D, H, W)` or :math:`(C, D, H, W)`; with ``channel_dim=-1``
          :math:`(N, D, H, W, C)` or :math:`(D, H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import AlphaSpatialDropout3d
        >>> AlphaSpatialDropout3d(0.2)(torch.randn(2, 8, 4, 4, 4)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    spatial_dims = 3
