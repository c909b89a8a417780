"""DropPath (stochastic depth): drop a whole residual branch per sample."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_unary

from ._dtensor import check_sharding, draw_sharded, is_dtensor, plain_like
from ._keyed import check_key_arg
from ._module import StructuredDropout
from ._validation import (
    check_bool,
    check_choice,
    check_float_input,
    check_generator,
    check_inplace_target,
    check_int,
    check_min_rank,
    check_p,
    check_scale_fits,
    check_tensor,
)
from .keyed import MaskKey
from .spatial_dropout import draw_keep

__all__ = ["DropPath", "drop_path", "drop_path_rates"]

_LAYOUT = "(N, *) with the batch at dim 0"


def _draw_keep(
    input: Tensor, p: float, scale: bool, generator: torch.Generator | None, key: MaskKey | None
) -> Tensor:
    """Every random number of DropPath is drawn here: one keep factor per sample, shape (N, 1, ...).

    The factor is 0 (dropped) or 1, or ``1 / (1 - p)`` when ``scale``. Drawn in the input's dtype
    with ``bernoulli_`` then ``div_``, the calls of timm's ``drop_path`` and torchvision's
    ``stochastic_depth(mode="row")``, so the same seed gives the same bits. A DTensor input gets
    the factors of its local samples (see :mod:`spatialdrop._dtensor`).
    """

    def finish(keep: Tensor) -> tuple[Tensor]:
        return (keep.div_(1.0 - p) if scale else keep,)

    if is_dtensor(input):
        plain = plain_like(input)
        return draw_sharded(
            "drop_path",
            input,
            key,
            None,
            lambda k, shape, first: draw_keep(plain, shape, p, generator, k),
            finish,
        )[0]
    shape = (input.shape[0],) + (1,) * (input.dim() - 1)
    with torch.no_grad():
        return finish(draw_keep(input, shape, p, generator, key))[0]


def drop_path(
    input: Tensor,
    p: float = 0.1,
    training: bool = True,
    inplace: bool = False,
    *,
    scale: bool = True,
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
) -> Tensor:
    r"""Zero whole samples of a residual branch at random (DropPath, stochastic depth).

    For every sample ``n`` the slice ``input[n]`` is either zeroed, with probability ``p``, or
    kept and (with ``scale=True``) scaled by ``1 / (1 - p)``: one random draw per sample, and the
    scale is per sample, never a fraction of the batch. Applied to the output of a residual
    branch, ``x + drop_path(f(x))`` skips the branch for the dropped samples (Huang et al.,
    "Deep Networks with Stochastic Depth", ECCV 2016, https://arxiv.org/abs/1603.09382).

    With the same seed it returns the same bits as timm's ``drop_path`` and torchvision's
    ``stochastic_depth(..., mode="row")`` for ``0 < p < 1``. At ``p = 1`` every sample is zeroed
    and, unlike those, no random numbers are drawn.

    A :class:`~torch.distributed.tensor.DTensor` input (``Shard`` of any dim or ``Replicate``;
    ``Partial`` is refused) gives a DTensor with its placements: keyed, with one id per sample of
    the *global* batch, the unsharded call's bits; unkeyed, the unsharded call's under the first
    rank's generator (one broadcast of the noise table): `docs/guide/keyed.md`.

    Args:
        input: a floating-point tensor with at least 1 dim; dim 0 is always the batch.
        p: probability of dropping a sample's branch, in ``[0, 1]``. Default: 0.1.
        training: apply the drop if ``True``; else return ``input`` unchanged. Default: True.
        inplace: write the result into ``input``. Default: False.
        scale: scale kept samples by ``1 / (1 - p)`` so the expectation is unchanged. Default: True.
        generator: the random number generator to draw from. Default: the global one.
        key: draw keyed masks instead (see :mod:`spatialdrop.keyed`): the same on any device,
            dtype, batch split or world size for a given sample id. Not together with
            ``generator``. Default: None.

    Shape:
        - Input: :math:`(N, *)`, any number of trailing dims (tokens, channels, spatial).
        - Output: the same shape, dtype and memory format as the input.

    Returns:
        The tensor with dropped samples zeroed and kept ones scaled.

    Examples:
        >>> import torch
        >>> from spatialdrop.functional import drop_path
        >>> g = torch.Generator().manual_seed(0)
        >>> y = drop_path(torch.ones(6, 3, 2), p=0.5, generator=g)
        >>> y[:, 0, 0]  # one draw per sample: each sample is all 0 or all 2
        tensor([0., 0., 2., 0., 0., 0.])
        >>> drop_path(torch.ones(4, 197, 768), p=0.5).shape  # ViT tokens (N, L, D)
        torch.Size([4, 197, 768])
    """
    if has_torch_function_unary(input):  # torch.fx proxies, tensor subclasses: as torch's dropout
        return handle_torch_function(
            drop_path,
            (input,),
            input,
            p,
            training,
            inplace,
            scale=scale,
            generator=generator,
            key=key,
        )
    fn = "drop_path"
    check_float_input(fn, input)
    p = check_p(fn, p)
    check_min_rank(fn, input, 1, _LAYOUT)
    check_bool(fn, "training", training)
    check_bool(fn, "inplace", inplace)
    check_bool(fn, "scale", scale)
    check_generator(fn, generator)
    check_key_arg(fn, key, generator, input.shape[0])
    check_sharding(fn, input)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    check_inplace_target(fn, input, inplace)
    if p == 1.0:
        zero = input.new_zeros(())
        return input.mul_(zero) if inplace else input * zero
    if scale:
        check_scale_fits(fn, p, input.dtype, 1.0 / (1.0 - p), "1/(1-p)")
    noise = _draw_keep(input, p, scale, generator, key)
    return input.mul_(noise) if inplace else input * noise


def drop_path_rates(depth: int, p_max: float, *, rule: str = "paper") -> list[float]:
    r"""Drop rates that grow linearly with depth, one per residual block.

    ``rule="paper"`` is the linear decay rule of the stochastic depth paper (Huang et al. 2016,
    eq. 4): survival :math:`p_\ell = 1 - \frac{\ell}{L}(1 - p_L)` for blocks
    :math:`\ell = 1 .. L`, that is drop rate :math:`\frac{\ell}{L} p_{max}`. The first block is
    already dropped at :math:`p_{max} / L` and the last at ``p_max``.

    ``rule="linspace"`` is the convention of timm, DeiT, Swin and ConvNeXt,
    ``torch.linspace(0, p_max, depth)``: the first block is never dropped, the rate reaches
    ``p_max`` at the last block, so every block but the last is dropped less than with the
    paper's rule. Use it to reproduce those models' recipes. The values here are computed in
    double precision (timm rounds them through float32: 0.1 becomes 0.10000000149011612).

    Args:
        depth: the number of residual blocks, ``L >= 1``.
        p_max: the drop rate of the last block, in ``[0, 1]``.
        rule: ``"paper"`` or ``"linspace"``, as above. Default: ``"paper"``.

    Returns:
        ``depth`` floats, the drop rate of each block from the first to the last.

    Examples:
        >>> from spatialdrop import drop_path_rates
        >>> drop_path_rates(5, 0.5)  # l / L * p_max for l = 1 .. 5
        [0.1, 0.2, 0.3, 0.4, 0.5]
        >>> drop_path_rates(3, 0.2, rule="linspace")  # timm's torch.linspace(0, 0.2, 3)
        [0.0, 0.1, 0.2]
        >>> drop_path_rates(1, 0.2), drop_path_rates(1, 0.2, rule="linspace")
        ([0.2], [0.0])
    """
    fn = "drop_path_rates"
    depth = check_int(fn, "depth", depth, minimum=1)
    p_max = check_p(fn, p_max, arg="p_max")
    check_choice(fn, "rule", rule, ("paper", "linspace"))
    if rule == "paper":
        return [p_max * (ell / depth) for ell in range(1, depth + 1)]
    if depth == 1:
        return [0.0]
    return [p_max * (i / (depth - 1)) for i in range(depth)]


class DropPath(StructuredDropout):
    r"""DropPath (stochastic depth) for a residual branch: drops whole samples, any rank.

    See :func:`spatialdrop.functional.drop_path`: each ``input[n]`` is zeroed with probability
    ``p`` or kept and scaled by ``1 / (1 - p)``. Eval mode is the identity. Dim 0 is always
    the batch and the input may have any rank ≥ 1, so there is no unbatched form and no
    ``channel_dim``: to drop a single sample's branch give it a batch axis of 1.

    Use it on the branch, not on the sum: ``x + self.drop_path(self.block(x))``.
    :func:`drop_path_rates` gives the usual per-block rates.

    Args:
        p: probability of dropping a sample's branch, in ``[0, 1]``. Default: 0.1.
        inplace: write the result into the input. Default: False.
        scale: scale kept samples by ``1 / (1 - p)``. Default: True.

    Shape:
        - Input: :math:`(N, *)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropPath
        >>> m = DropPath(0.2)
        >>> m
        DropPath(p=0.2, inplace=False)
        >>> m(torch.randn(8, 64, 7, 7)).shape
        torch.Size([8, 64, 7, 7])
        >>> DropPath(0.2, scale=False)
        DropPath(p=0.2, inplace=False, scale=False)
    """

    has_channel_dim = False
    scale: bool

    def __init__(self, p: float = 0.1, inplace: bool = False, *, scale: bool = True) -> None:
        super().__init__(p, inplace)
        self.scale = check_bool(type(self).__name__, "scale", scale)

    def dropout(self, input: Tensor) -> Tensor:
        """Apply :func:`~spatialdrop.functional.drop_path` with this module's settings."""
        name = type(self).__name__  # checked here so that a bad input names the layer
        check_tensor(name, input)
        check_min_rank(name, input, 1, _LAYOUT)
        key = self.mask_key(input.shape[0], input.device)
        return drop_path(input, self.p, self.training, self.inplace, scale=self.scale, key=key)

    def extra_options(self) -> dict[str, Any]:
        """``scale`` when it is not the default."""
        return {} if self.scale else {"scale": False}
