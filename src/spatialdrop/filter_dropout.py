"""Filter dropout: drop whole output filters of a convolution's weights, batch-shared."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._compat import is_compiling
from ._dtensor import (
    agree,
    check_placements,
    eager_under_compile,
    is_dtensor,
    local_range,
    plain_like,
    shard_like,
)
from ._keyed import keyed_keep
from ._module import StructuredDropout
from ._validation import Shown, check_p, check_scale_fits, fail
from .keyed import MaskKey
from .spatial_dropout import bernoulli_keep

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["FilterDropout", "filter_dropout", "remove_filter_dropout"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_NAMES = "an nn.Conv1d, nn.Conv2d or nn.Conv3d"


def _draw_filter_mask(weight: Tensor, p: float, key: MaskKey | None) -> Tensor:
    """Every random number of filter dropout is drawn here: one factor per output filter.

    Returns a vector of ``weight.shape[0]`` factors in the weight's dtype, each 0 (dropped) or
    ``1 / (1 - p)`` (kept); all zeros at ``p = 1`` without drawing. With a (per-call) ``key``,
    filter ``k`` is kept iff ``keyed_uniform(key, K)[0, k] >= p``.

    A DTensor weight (tensor parallelism; FSDP2's sharded parameter when this hook runs before
    FSDP's all-gather) gets the whole vector, a plain tensor, the same on every rank of its mesh:
    keyed, from the key; unkeyed, the first rank's draw (:func:`spatialdrop._dtensor.agree`).
    """
    fn = "FilterDropout"
    with torch.no_grad():
        k = weight.shape[0]
        if p == 1.0:
            return torch.zeros(k, dtype=weight.dtype, device=weight.device)
        check_scale_fits(fn, p, weight.dtype, 1.0 / (1.0 - p), "1/(1-p)")
        if key is not None:
            mask = keyed_keep(key, p, (1, k), weight).view(k)
        elif is_dtensor(weight):  # the first rank's draw on every rank of the weight's mesh
            mask = _agreed_draw(weight, k, p)
        else:
            mask = bernoulli_keep(weight, (k,), p, None)
        return mask.div_(1.0 - p)


@eager_under_compile
def _agreed_draw(weight: DTensor, k: int, p: float) -> Tensor:
    """The keep mask of ``k`` filters drawn on the mesh's first rank, the same on every rank.

    Eager under ``torch.compile`` (a graph break), as every sharded draw: the broadcast and the
    mesh's process groups are not traceable.
    """
    mask = bernoulli_keep(plain_like(weight), (k,), p, None)
    agree(weight.device_mesh, mask)
    return mask


# The mask of the call in progress, per thread and per layer: {id(layer): mask}. Kept apart
# from the layer so that two threads calling one conv at once each read their own draw.
_CALLS = threading.local()


def _calls() -> dict[int, Tensor]:
    calls: dict[int, Tensor] | None = getattr(_CALLS, "masks", None)
    if calls is None:
        calls = _CALLS.masks = {}
    return calls


class FilterDropout(StructuredDropout):
    r"""The parametrization that :func:`filter_dropout` puts on a conv's ``weight`` and ``bias``.

    In training mode each forward call of the conv draws one mask over its output filters: filter
    ``k`` (the weight slice ``weight[k]`` and ``bias[k]`` together) is zeroed with probability
    ``p`` or kept and scaled by ``1 / (1 - p)``. **The mask is shared by the whole batch**: this
    is dropout on the parameters :math:`\theta_k` (in the spirit of DropConnect, Wan et al.
    2013, with a filter as the unit), whereas :class:`~spatialdrop.SpatialDropout2d` on the
    conv's output draws a mask per sample. The output equals the plain conv's output with
    channel ``k`` multiplied by the ``k``-th factor.

    The mask is drawn by a forward pre-hook and cleared by a forward hook on the conv, so both
    tensors read the same mask within one call, and outside a call (and in eval mode)
    ``conv.weight`` is the plain parameter. The mask of a call is kept per thread, so one conv
    may run in several threads at once, each call with its own mask.

    Keyed masks (:func:`~spatialdrop.keyed_masks`): the class declares ``keying =
    "per_call"``: one mask per call, shared by the batch, drawn from ``(seed, step, layer)``
    only (the key's single sample id is ``-1``), so it raises outside a
    :func:`~spatialdrop.mask_context` and is reproducible inside one.

    It is a :class:`StructuredDropout`, hence a
    ``_DropoutNd``: its own ``training`` flag decides (``conv.train()``/``eval()`` set it, and
    :func:`~spatialdrop.mc_dropout` finds it), and :class:`~spatialdrop.DropSchedule` drives its
    ``p``.

    Args:
        p: probability of dropping a filter, in ``[0, 1]``. Default: 0.1.

    Examples:
        >>> import torch
        >>> from spatialdrop import FilterDropout, filter_dropout
        >>> conv = filter_dropout(torch.nn.Conv2d(3, 8, 3), p=0.25)
        >>> conv.parametrizations.weight[0]
        FilterDropout(p=0.25)
        >>> isinstance(conv.parametrizations.bias[0], FilterDropout)
        True
    """

    has_channel_dim = False
    keying = "per_call"
    _compiled_mask: Tensor | None = None  # the traced mask under torch.compile (one trace)

    def __init__(self, p: float = 0.1) -> None:
        super().__init__(p, False)

    def current_mask(self) -> Tensor | None:
        """The mask of the conv call in progress in this thread, or ``None`` outside a call."""
        if is_compiling():
            return self._compiled_mask
        return _calls().get(id(self))

    def _set_mask(self, mask: Tensor | None) -> None:
        if is_compiling():
            self._compiled_mask = mask
        elif mask is None:
            _calls().pop(id(self), None)
        else:
            _calls()[id(self)] = mask

    def dropout(self, input: Tensor) -> Tensor:
        """Scale the filters of ``weight`` (or entries of ``bias``) by the current mask, if any."""
        mask = self.current_mask()
        if mask is None:
            return input
        if is_dtensor(input):  # a weight or bias sharded by tensor parallelism: its rows' factors
            fn = type(self).__name__
            check_placements(fn, input, arg="weight")
            start, length = local_range(fn, input, 0)
            local = mask[start : start + length].view((-1,) + (1,) * (input.dim() - 1))
            return input * shard_like(input, local, (0,))
        return input * mask.view((-1,) + (1,) * (input.dim() - 1))

    def _begin(self, conv: nn.Module, args: Any) -> None:
        # forward pre-hook of the conv: one draw per call, read by weight and bias alike
        mask = None
        if self.training and self.p > 0.0:
            weight = _original_weight(conv)
            if weight.numel() > 0:
                mask = _draw_filter_mask(weight, self.p, self.mask_key(None, weight.device))
        self._set_mask(mask)

    def _end(self, conv: nn.Module, args: Any, output: Any) -> None:
        # forward hook of the conv, also called when the forward raises
        self._set_mask(None)

    def extra_repr(self) -> str:
        """``p``, the only option."""
        return f"p={self.p}"


def _plist(conv: nn.Module, name: str) -> parametrize.ParametrizationList:
    """The list of parametrizations of ``conv.<name>`` (which must be parametrized)."""
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, conv.parametrizations)[name])


def _original_weight(conv: nn.Module) -> Tensor:
    """The stored weight of ``conv``, under any parametrizations."""
    if parametrize.is_parametrized(conv, "weight"):
        return _plist(conv, "weight").original
    return cast(Tensor, conv.weight)


def _find(conv: nn.Module) -> FilterDropout | None:
    if not parametrize.is_parametrized(conv, "weight"):
        return None
    for m in _plist(conv, "weight"):
        if isinstance(m, FilterDropout):
            return m
    return None


def filter_dropout(conv: nn.Module, p: float = 0.1) -> nn.Module:
    r"""Add filter dropout to a convolution, in place: drop whole output filters, one mask per call.

    During training every forward call of ``conv`` zeroes each output filter (the weight slice
    ``weight[k]`` and ``bias[k]`` together) with probability ``p`` and scales the kept ones by
    ``1 / (1 - p)``. The mask is drawn once per forward call and **shared by every sample of the
    batch** (that is the difference from :class:`~spatialdrop.SpatialDropout2d`, whose mask is
    per sample). In eval mode the conv uses its plain weights. See :class:`FilterDropout`.

    It works through :mod:`torch.nn.utils.parametrize`, so the conv's ``state_dict`` keys become
    ``parametrizations.weight.original`` (and ``.bias.original``): load pretrained weights
    before calling this, or after :func:`remove_filter_dropout`. A state dict saved with filter
    dropout loads into a model with filter dropout. torch refuses to pickle a parametrized
    module (save the ``state_dict``); ``copy.deepcopy`` works. Inside ``parametrize.cached()``
    the weights are computed once, so every call in that context reuses the first call's mask.

    Args:
        conv: an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (not transposed, not lazy before
            its first call), without filter dropout yet.
        p: probability of dropping a filter, in ``[0, 1]``. Default: 0.1.

    Returns:
        ``conv`` itself, now parametrized.

    Examples:
        >>> import torch
        >>> from spatialdrop import filter_dropout, remove_filter_dropout
        >>> conv = filter_dropout(torch.nn.Conv2d(3, 8, 3), p=0.5)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> y = conv(torch.randn(4, 3, 8, 8))
        >>> (y.abs().sum(dim=(2, 3)) == 0).int()  # the same filters dropped for every sample
        tensor([[1, 0, 0, 0, 1, 1, 0, 0],
                [1, 0, 0, 0, 1, 1, 0, 0],
                [1, 0, 0, 0, 1, 1, 0, 0],
                [1, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.int32)
        >>> type(remove_filter_dropout(conv)).__name__
        'Conv2d'
    """
    fn = "filter_dropout"
    if not isinstance(conv, _CONVS):
        fail(fn, "conv", _CONV_NAMES, Shown(type(conv).__name__), kind=TypeError)
    p = check_p(fn, p)
    if _find(conv) is not None:
        fail(fn, "conv", "a conv without filter dropout", Shown("one that already has it"))
    weight = _original_weight(conv)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        fail(fn, "conv", "initialised (run a lazy conv once first)", Shown("an uninitialised lazy conv"))
    drop = FilterDropout(p)
    drop.train(conv.training)
    parametrize.register_parametrization(conv, "weight", drop)
    if conv.bias is not None:
        parametrize.register_parametrization(conv, "bias", drop)
    conv.register_forward_pre_hook(drop._begin)
    conv.register_forward_hook(drop._end, always_call=True)
    return conv


def remove_filter_dropout(conv: nn.Module) -> nn.Module:
    """Remove the filter dropout that :func:`filter_dropout` added to ``conv``, in place.

    The conv's weights stay what they were (filter dropout never changes the stored weights);
    other parametrizations of the conv stay in place. When filter dropout was the only one,
    the conv is a plain conv again, with a plain ``state_dict``.

    Args:
        conv: a convolution that has filter dropout.

    Returns:
        ``conv`` itself.

    Examples:
        >>> import torch
        >>> from spatialdrop import filter_dropout, remove_filter_dropout
        >>> conv = remove_filter_dropout(filter_dropout(torch.nn.Conv1d(2, 4, 3)))
        >>> sorted(conv.state_dict())
        ['bias', 'weight']
    """
    fn = "remove_filter_dropout"
    if not isinstance(conv, nn.Module):
        fail(fn, "conv", "an nn.Module", Shown(type(conv).__name__), kind=TypeError)
    drop = _find(conv)
    if drop is None:
        fail(fn, "conv", "a conv with filter dropout", Shown(type(conv).__name__))
    # torch's parametrize gives a module a generated class, which copy.deepcopy shares with the
    # copy, and remove_parametrizations deletes properties from that class: give this conv its
    # own class first, so that removing here leaves copies working.
    cls = type(conv)
    own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    conv.__class__ = type(cls.__name__, cls.__bases__, own)
    for name in ("weight", "bias"):
        if not parametrize.is_parametrized(conv, name):
            continue
        plist = _plist(conv, name)
        if len(plist) == 1:
            parametrize.remove_parametrizations(conv, name, leave_parametrized=False)
        else:
            del plist[next(i for i, m in enumerate(plist) if m is drop)]
    for hooks in (conv._forward_pre_hooks, conv._forward_hooks):
        for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is drop]:
            del hooks[key]
            conv._forward_hooks_always_called.pop(key, None)
    return conv
