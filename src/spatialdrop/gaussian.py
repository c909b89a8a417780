"""Gaussian spatial dropout: multiplicative N(1, p/(1-p)) noise per (sample, channel)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_unary

from ._dtensor import check_sharding, draw_sharded, is_dtensor
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
    float_dtype_of,
    squeeze_if,
)
from .keyed import MaskKey, normal_rows
from .spatial_dropout import channel_noise_shape

__all__ = [
    "GaussianSpatialDropout",
    "GaussianSpatialDropout1d",
    "GaussianSpatialDropout2d",
    "GaussianSpatialDropout3d",
    "gaussian_spatial_dropout",
]

_LAYOUT = "(N, C, *spatial), or (N, *spatial, C) with channel_dim=-1"


def _draw_noise(
    input: Tensor, channel_dim: int, p: float, generator: torch.Generator | None, key: MaskKey | None
) -> Tensor:
    """Every random number of Gaussian spatial dropout is drawn here.

    Returns one factor ``1 + sqrt(p / (1 - p)) * eps``, ``eps ~ N(0, 1)``, per (sample, channel),
    shaped to broadcast against ``input``; drawn and computed in float32 (float64 for float64
    input), then rounded once to the input's dtype. A DTensor input gets the factors of its local
    samples and channels (see :mod:`spatialdrop._dtensor`).
    """
    dtype = float_dtype_of(input)
    factor = math.sqrt(p / (1.0 - p))

    def draw(k: MaskKey | None, shape: list[int], first: int) -> Tensor:
        if k is not None:
            return normal_rows(k, shape[channel_dim], input.device, first).to(dtype).view(shape)
        if generator is None:  # no generator= keyword: see _validation.generator_kwargs
            return torch.randn(shape, dtype=dtype, device=input.device)
        return torch.randn(shape, generator=generator, dtype=dtype, device=input.device)

    def finish(eps: Tensor) -> tuple[Tensor]:
        return (eps.mul_(factor).add_(1.0).to(input.dtype),)

    if is_dtensor(input):
        return draw_sharded("gaussian_spatial_dropout", input, key, channel_dim, draw, finish)[0]
    with torch.no_grad():
        return finish(draw(key, channel_noise_shape(input, channel_dim), 0))[0]


def gaussian_spatial_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    channel_dim: int = 1,
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
) -> Tensor:
    r"""Multiply whole channels of each sample by Gaussian noise of mean 1 (Gaussian spatial dropout).

    Every slice ``input[n, c]`` (the channel axis given by ``channel_dim``) is multiplied by one
    factor drawn from :math:`\mathcal{N}(1, \frac{p}{1 - p})`: the same mean (1) and variance
    (:math:`p / (1 - p)`) as the factor ``Bernoulli(1 - p) / (1 - p)`` of
    :func:`~spatialdrop.functional.spatial_dropout`, but continuous and without zeros
    (Srivastava et al., "Dropout", JMLR 2014, section 10, https://jmlr.org/papers/v15/srivastava14a.html).
    The factor is negative with probability :math:`\Phi(-\sqrt{(1 - p)/p})` (0.16 at p = 0.5,
    below 0.001 for p ≤ 0.1), which flips the sign of that channel.

    A :class:`~torch.distributed.tensor.DTensor` input (``Shard`` of any dim or ``Replicate``;
    ``Partial`` is refused) gives a DTensor with its placements: keyed, with one id per sample of
    the *global* batch, the unsharded call's bits; unkeyed, the unsharded call's under the first
    rank's generator (one broadcast of the noise table): `docs/guide/keyed.md`.

    Args:
        input: a floating-point tensor with at least 3 dims, dim 0 the batch.
        p: the dropout rate whose noise variance :math:`p / (1 - p)` is used, in ``[0, 1)``;
            for float16 input at most about ``1 - 8e-9``, so that every factor fits. Default: 0.5.
        training: apply the noise if ``True``; else return ``input`` unchanged. Default: True.
        inplace: write the result into ``input``. Default: False.
        channel_dim: the channel axis, any dim but 0; ``-1`` for channels-last. Default: 1.
        generator: the random number generator to draw from. Default: the global one.
        key: draw keyed noise instead (see :mod:`spatialdrop.keyed`): the same on any device,
            dtype, batch split or world size for a given sample id. Not together with
            ``generator``. Default: None.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`.
        - Output: the same shape, dtype and memory format as the input.

    Returns:
        The tensor with each channel of each sample multiplied by its factor.

    Examples:
        >>> import torch
        >>> from spatialdrop.functional import gaussian_spatial_dropout
        >>> g = torch.Generator().manual_seed(0)
        >>> y = gaussian_spatial_dropout(torch.ones(2, 3, 4, 4), p=0.2, generator=g)
        >>> y[:, :, 0, 0]  # factors 1 + 0.5 * N(0, 1): std sqrt(0.2 / 0.8) = 0.5
        tensor([[ 1.7705,  0.8533, -0.0894],
                [ 1.2842,  0.4577,  0.3007]])
        >>> bool((y == y[:, :, :1, :1]).all())  # one factor per (sample, channel)
        True
    """
    if has_torch_function_unary(input):  # torch.fx proxies, tensor subclasses: as torch's dropout
        return handle_torch_function(
            gaussian_spatial_dropout,
            (input,),
            input,
            p,
            training,
            inplace,
            channel_dim=channel_dim,
            generator=generator,
            key=key,
        )
    fn = "gaussian_spatial_dropout"
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
    # torch's and the keyed normals both stay below 6 in magnitude (Box-Muller from 24-bit
    # uniforms, or clamped at 1e-7): refuse a p whose factor could leave the dtype's range
    check_scale_fits(fn, p, input.dtype, 1.0 + 6.0 * math.sqrt(p / (1.0 - p)), "1 + 6 sqrt(p/(1-p))")
    noise = _draw_noise(input, dim, p, generator, key)
    return input.mul_(noise) if inplace else input * noise


class GaussianSpatialDropout(StructuredDropout):
    r"""Gaussian spatial dropout for input of any rank ≥ 3.

    See :func:`spatialdrop.functional.gaussian_spatial_dropout`: each ``input[n, c]`` slice is
    multiplied by one factor from :math:`\mathcal{N}(1, p / (1 - p))`. Eval mode is the identity.

    Args:
        p: the rate whose noise variance :math:`p / (1 - p)` is used, in ``[0, 1)``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis (never 0, the batch); ``-1`` for channels-last. Default: 1.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`; batched only.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import GaussianSpatialDropout
        >>> m = GaussianSpatialDropout(0.1, channel_dim=-1)
        >>> m
        GaussianSpatialDropout(p=0.1, inplace=False, channel_dim=-1)
        >>> m(torch.randn(8, 100, 64)).shape
        torch.Size([8, 100, 64])
    """

    allow_p_one = False

    def dropout(self, input: Tensor) -> Tensor:
        """Apply :func:`~spatialdrop.functional.gaussian_spatial_dropout` with this module's settings."""
        x, unbatched = self.batched(input)
        key = self.mask_key(x.shape[0], x.device)
        out = gaussian_spatial_dropout(
            x, self.p, self.training, self.inplace, channel_dim=self.channel_dim, key=key
        )
        return squeeze_if(out, unbatched)


class GaussianSpatialDropout1d(GaussianSpatialDropout):
    r"""Gaussian spatial dropout for sequences, ``(N, C, L)`` or unbatched ``(C, L)``.

    Args:
        p: the rate whose noise variance :math:`p / (1 - p)` is used, in ``[0, 1)``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout, 1 or 2 (-1). Default: 1.

    Shape:
        - Input: :math:`(N, C, L)` or :math:`(C, L)`; with ``channel_dim=-1`` :math:`(N, L, C)`
          or :math:`(L, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import GaussianSpatialDropout1d
        >>> GaussianSpatialDropout1d(0.1)(torch.randn(16, 50)).shape  # unbatched (C, L)
        torch.Size([16, 50])
    """

    spatial_dims = 1


class GaussianSpatialDropout2d(GaussianSpatialDropout):
    r"""Gaussian spatial dropout for images, ``(N, C, H, W)`` or unbatched ``(C, H, W)``.

    Args:
        p: the rate whose noise variance :math:`p / (1 - p)` is used, in ``[0, 1)``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(C, H, W)`; with ``channel_dim=-1``
          :math:`(N, H, W, C)` or :math:`(H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import GaussianSpatialDropout2d
        >>> y = GaussianSpatialDropout2d(0.3)(torch.ones(5, 4, 4))  # unbatched: one factor per channel
        >>> y.amax(dim=(1, 2)) == y.amin(dim=(1, 2))
        tensor([True, True, True, True, True])
    """

    spatial_dims = 2


class GaussianSpatialDropout3d(GaussianSpatialDropout):
    r"""Gaussian spatial dropout for volumes, ``(N, C, D, H, W)`` or unbatched ``(C, D, H, W)``.

    Args:
        p: the rate whose noise variance :math:`p / (1 - p)` is used, in ``[0, 1)``. Default: 0.5.
        inplace: write the result into the input. Default: False.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, D, H, W)` or :math:`(C, D, H, W)`; with ``channel_dim=-1``
          :math:`(N, D, H, W, C)` or :math:`(D, H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import GaussianSpatialDropout3d
        >>> GaussianSpatialDropout3d(0.2)(torch.randn(2, 8, 4, 4, 4)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    spatial_dims = 3
