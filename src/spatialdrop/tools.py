"""Model tools: add dropout to a model you did not write, and MC-dropout prediction."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ._validation import Shown, check_bool, check_int, fail, float_dtype_of
from .convert import peer_dropout, peer_rate
from .filter_dropout import FilterDropout
from .keyed import context_draw, current_context
from .spatial_dropout import SpatialDropout1d, SpatialDropout2d, SpatialDropout3d

__all__ = ["MCPrediction", "add_dropout", "mc_dropout", "mc_predict"]

Factory = Callable[[nn.Module], nn.Module]
Types = Union[type, Iterable[type]]

_SPATIAL = {1: SpatialDropout1d, 2: SpatialDropout2d, 3: SpatialDropout3d}


def _default_factory(m: nn.Module) -> nn.Module:
    """``SpatialDropout{1,2,3}d(0.1)`` for a ``Conv{1,2,3}d``."""
    for rank, conv in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if isinstance(m, conv):
            return _SPATIAL[rank](0.1)
    fail(
        "add_dropout",
        "factory",
        "given for modules other than nn.Conv1d/2d/3d (the default makes SpatialDropout{1,2,3}d(0.1))",
        Shown(f"None for a {type(m).__name__}"),
    )


def _types(fn: str, arg: str, value: object, *, empty: bool = False) -> tuple[type, ...]:
    """``value`` (a module type or any collection of them) as a tuple; ``empty``: may be empty."""
    allowed = f"an nn.Module subclass or a {'' if empty else 'non-empty '}tuple (or other collection) of them"
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes, nn.Module)):
        fail(fn, arg, allowed, value, kind=TypeError)
    types = tuple(value)
    if (not types and not empty) or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        fail(fn, arg, allowed, value, kind=TypeError)
    return types


def add_dropout(
    model: nn.Module, after: Types = (nn.Conv2d,), factory: Optional[Factory] = None
) -> nn.Module:
    """Insert a dropout layer after every submodule of the given types, editing ``model`` in place.

    The search is recursive. Inside an ``nn.Sequential`` the new layer is inserted right after
    the match (the later layers are renumbered). Any other child (an attribute such as
    ``self.conv1``, or an entry of an ``nn.ModuleList``/``nn.ModuleDict``) is replaced by
    ``nn.Sequential(child, new_layer)``, which the parent's ``forward`` calls in its place.
    Matched modules are not searched further, and ``model`` itself is not a candidate. The
    ``state_dict`` keys of matched and renumbered modules change, so load pretrained weights
    first. A module that calls its child's methods other than ``forward`` (or reads its
    attributes, like ``self.conv1.weight``) breaks when the child is wrapped.

    Args:
        model: the model to edit.
        after: a module type or a collection of them (tuple, list, set). Default: ``(nn.Conv2d,)``.
        factory: ``factory(matched_module)`` returns the new layer, called once per match so that
            no layer is shared. Default: ``SpatialDropout{1,2,3}d(0.1)`` for ``nn.Conv{1,2,3}d``
            (and an error for other types).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: when no submodule matches; the message lists the types the model contains.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from spatialdrop import DropPath, add_dropout
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> add_dropout(net)
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): SpatialDropout2d(p=0.1, inplace=False)
          (2): ReLU()
          (3): Conv2d(8, 8, kernel_size=(3, 3), stride=(1, 1))
          (4): SpatialDropout2d(p=0.1, inplace=False)
        )
        >>> add_dropout(net, after=nn.Linear)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        ValueError: add_dropout: after must be a module type present in the model (it has Conv2d, ...
    """
    fn = "add_dropout"
    if not isinstance(model, nn.Module):
        fail(fn, "model", "an nn.Module", Shown(type(model).__name__), kind=TypeError)
    types = _types(fn, "after", after)
    if factory is not None and not callable(factory):
        fail(
            fn,
            "factory",
            "None or a callable module -> new module",
            Shown(type(factory).__name__),
            kind=TypeError,
        )
    make = factory if factory is not None else _default_factory
    if not any(isinstance(m, types) for m in model.modules() if m is not model):
        present = sorted({type(m).__name__ for m in model.modules() if m is not model})
        names = Shown("(" + ", ".join(t.__name__ for t in types) + ",)")
        fail(
            fn, "after", f"a module type present in the model (it has {', '.join(present) or 'none'})", names
        )

    def new_layer(m: nn.Module) -> nn.Module:
        layer = make(m)
        if not isinstance(layer, nn.Module):
            fail(
                fn,
                "factory",
                "a callable that returns an nn.Module",
                Shown(type(layer).__name__),
                kind=TypeError,
            )
        return layer

    seen: set[int] = set()

    def visit(parent: nn.Module) -> None:
        if id(parent) in seen:
            return
        seen.add(id(parent))
        if isinstance(parent, nn.Sequential):
            items = list(parent._modules.items())
            numbered = all(k == str(i) for i, (k, _) in enumerate(items))
            rebuilt: list[tuple[str, nn.Module | None]] = []  # Sequential may hold None
            for key, item in items:
                rebuilt.append((key, item))
                if item is not None and isinstance(item, types):
                    name = f"{key}_dropout"
                    while name in parent._modules or any(name == k for k, _ in rebuilt):
                        name += "_"
                    rebuilt.append((name, new_layer(item)))
                elif item is not None:
                    visit(item)
            if numbered:
                rebuilt = [(str(i), c) for i, (_, c) in enumerate(rebuilt)]
            parent._modules.clear()
            parent._modules.update(rebuilt)  # type: ignore[arg-type]
            return
        for key, child in list(parent._modules.items()):
            if child is None:
                continue
            if isinstance(child, types):
                parent._modules[key] = nn.Sequential(child, new_layer(child))
            else:
                visit(child)

    visit(model)
    return model


def _is_dropout(m: nn.Module, include: tuple[type, ...]) -> bool:
    return isinstance(m, (_DropoutNd, *include)) or peer_dropout(m) is not None


def _rate(m: nn.Module) -> float | None:
    """The drop rate of a dropout layer found by :func:`_is_dropout` (``None`` if it has none)."""
    if isinstance(m, _DropoutNd):
        return float(m.p)
    peer = peer_dropout(m)
    return None if peer is None else peer_rate(m, peer)


def _check_has_dropout(fn: str, modules: list[nn.Module], extra: tuple[type, ...]) -> None:
    """Refuse a model without dropout layers: every Monte Carlo sample would be the same."""
    if not any(_is_dropout(m, extra) for m in modules):
        types = sorted({type(m).__name__ for m in modules})
        fail(fn, "model", "a model with dropout layers", Shown(f"one with only {', '.join(types)}"))


@contextlib.contextmanager
def mc_dropout(model: nn.Module, *, include: Types = ()) -> Iterator[nn.Module]:
    """Context manager for MC dropout: only the dropout layers train, everything else is in eval.

    Inside the block every dropout layer is in training mode: spatialdrop's (all
    :class:`StructuredDropout`, filter dropout included), torch's (every ``_DropoutNd``:
    ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``), timm's
    ``DropPath`` and ``DropBlock2d`` and torchvision's ``StochasticDepth`` and
    ``DropBlock2d/3d`` (and their subclasses; recognised by module path and class name, without
    importing timm or torchvision), plus the types in ``include``. Every other module is in eval
    mode, so BatchNorm uses (and does not update) its running statistics. On exit every module
    gets back the mode it had, also when the block raises. Gradients are not turned off: combine
    with ``torch.no_grad()`` as needed. No conversion is needed (see
    :func:`~spatialdrop.convert_dropout` for what converting adds).

    Args:
        model: the model.
        include: more module types to treat as dropout, e.g. a dropout layer of your own that
            does not subclass ``_DropoutNd``. Default: none.

    Yields:
        ``model``.

    Raises:
        ValueError: when the model has no dropout layer (every sample would be the same).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from spatialdrop import SpatialDropout2d, mc_dropout
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), SpatialDropout2d(0.5)).train()
        >>> with mc_dropout(net):
        ...     [m.training for m in net]
        [False, False, True]
        >>> [m.training for m in net]
        [True, True, True]
    """
    fn = "mc_dropout"
    if not isinstance(model, nn.Module):
        fail(fn, "model", "an nn.Module", Shown(type(model).__name__), kind=TypeError)
    extra = _types(fn, "include", include, empty=True)
    modules = list(model.modules())
    _check_has_dropout(fn, modules, extra)
    previous = [(m, m.training) for m in modules]
    try:
        for m in modules:
            m.training = _is_dropout(m, extra)
        yield model
    finally:
        for m, mode in previous:
            m.training = mode


class MCPrediction(NamedTuple):
    """What :func:`mc_predict` returns."""

    mean: Tensor
    """Mean over the samples of the output (of the probabilities with ``softmax=True``)."""
    variance: Tensor
    """Per-element variance over the samples, ``mean((y - mean)**2)`` (divisor ``samples``)."""
    entropy: Tensor | None
    """With ``softmax=True``, the entropy of ``mean`` over ``class_dim`` in nats; else ``None``."""


def mc_predict(
    model: nn.Module,
    x: Tensor,
    samples: int = 30,
    *,
    softmax: bool = False,
    batched: bool = False,
    class_dim: int = 1,
    include: Types = (),
) -> MCPrediction:
    r"""Monte Carlo dropout prediction: run ``model`` ``samples`` times with dropout on.

    Runs under :func:`mc_dropout` (dropout layers train, the rest is in eval) and
    ``torch.no_grad()``, and summarises the outputs :math:`y_1 .. y_T` (Gal & Ghahramani,
    "Dropout as a Bayesian Approximation", ICML 2016, https://arxiv.org/abs/1506.02142): the
    predictive mean, the per-element variance :math:`\frac{1}{T} \sum_t (y_t - \bar y)^2`, and
    with ``softmax=True`` (the model returns logits) the mean of the class probabilities and
    the predictive entropy :math:`-\sum_c \bar p_c \log \bar p_c` per example (per position for
    dense outputs such as segmentation). Statistics are accumulated in float32 (float64 for
    float64 outputs) and returned in that dtype.

    Args:
        model: the model; its modes are restored afterwards.
        x: the input, of any rank the model accepts.
        samples: the number of stochastic forward passes, ``>= 1``. Default: 30.
        softmax: treat the outputs as logits over ``class_dim``. Default: False.
        batched: run all samples as one batch: ``x`` (batch at dim 0) is repeated ``samples``
            times along dim 0. Faster for small inputs, ``samples`` times the memory; each
            sample still gets its own masks for per-sample layers, but not with filter dropout,
            whose mask is shared by the batch, nor with keyed masks (the copies of a sample
            share its id), nor with torchvision's ``StochasticDepth(mode="batch")`` (one draw
            for the batch), so those are refused. Default: False.
        class_dim: the class axis of the output, for ``softmax=True``. Default: 1.
        include: more module types to sample as dropout, as in :func:`mc_dropout` (which finds
            spatialdrop's, torch's, timm's and torchvision's dropout layers itself). Default: none.

    Keyed masks (:func:`~spatialdrop.keyed_masks`): call it inside a
    :func:`~spatialdrop.mask_context`. A keyed mask depends only on (seed, step, layer, sample
    id), so every pass would draw the same masks; instead pass ``t`` (``0 .. samples - 1``)
    keys each layer with the derived layer id ``mc_layer(layer, t)`` of
    :mod:`spatialdrop.keyed` (pass 0 uses the ordinary keys), which makes the prediction as
    reproducible as the keyed masks themselves. Outside a context ``mc_predict`` raises a
    ``RuntimeError`` before any pass.

    Returns:
        :class:`MCPrediction` ``(mean, variance, entropy)``: mean and variance shaped like one
        output, entropy like one output without ``class_dim`` (or ``None``).

    Warns:
        UserWarning: when no dropout layer is active (every one has ``p = 0``, as a
            :class:`~spatialdrop.DropSchedule` sets at step 0): every pass is then the same
            and the variance is 0.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from spatialdrop import SpatialDropout2d, mc_predict
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), SpatialDropout2d(0.3), nn.Flatten(), nn.LazyLinear(5))
        >>> _ = net(torch.randn(1, 3, 8, 8))  # initialise the lazy layer
        >>> out = mc_predict(net, torch.randn(4, 3, 8, 8), samples=20, softmax=True)
        >>> out.mean.shape, out.variance.shape, out.entropy.shape
        (torch.Size([4, 5]), torch.Size([4, 5]), torch.Size([4]))
        >>> bool(torch.allclose(out.mean.sum(dim=1), torch.ones(4)))
        True
    """
    fn = "mc_predict"
    if not isinstance(model, nn.Module):
        fail(fn, "model", "an nn.Module", Shown(type(model).__name__), kind=TypeError)
    if not isinstance(x, Tensor):
        fail(fn, "x", "a torch.Tensor", Shown(type(x).__name__), kind=TypeError)
    samples = check_int(fn, "samples", samples, minimum=1)
    check_bool(fn, "softmax", softmax)
    check_bool(fn, "batched", batched)
    check_int(fn, "class_dim", class_dim)
    extra = _types(fn, "include", include, empty=True)
    _check_has_dropout(fn, list(model.modules()), extra)
    keyed = any(getattr(m, "keyed_seed", None) is not None for m in model.modules())
    if keyed and current_context() is None:
        raise RuntimeError(
            f"{fn}: the model draws keyed masks (set by spatialdrop.keyed_masks), which need a step "
            "and the samples' ids also for inference: call mc_predict inside `with "
            "spatialdrop.mask_context(step=..., sample_ids=...):` (any fixed step and the inputs' "
            "ids make the prediction reproducible), or switch keyed masks off with "
            "spatialdrop.keyed_masks(model, None)"
        )
    if batched:
        if x.dim() < 1:
            fail(fn, "x", "a tensor with a batch dim 0 when batched=True", Shown("a 0-D tensor"))
        if any(isinstance(m, FilterDropout) for m in model.modules()):
            fail(fn, "batched", "False for a model with filter dropout (one mask per batch)", batched)
        if any(getattr(m, "mode", None) == "batch" and peer_dropout(m) is not None for m in model.modules()):
            fail(
                fn,
                "batched",
                "False for a model with StochasticDepth(mode='batch') (one draw per batch)",
                batched,
            )
        if keyed and current_context() is not None:
            fail(
                fn,
                "batched",
                "False for a model with keyed masks (the copies of a sample share its id and so its masks)",
                batched,
            )
    rates = [_rate(m) for m in model.modules() if _is_dropout(m, extra)]
    if rates and all(r == 0 for r in rates):
        warnings.warn(
            f"{fn}: every dropout layer of the model has p = 0, so all {samples} passes are the same "
            "and the variance is 0 (a DropSchedule at step 0 sets p = 0)",
            UserWarning,
            stacklevel=2,
        )

    def summarise(y: object, lead: int) -> Tensor:
        # y: one output (lead 0) or a stack of outputs (lead 1); class_dim refers to one output
        if not isinstance(y, Tensor):
            fail(fn, "model", "a model that returns a tensor", Shown(type(y).__name__), kind=TypeError)
        y = y.to(float_dtype_of(y))
        if softmax:
            one = y.dim() - lead
            if one == 0 or not -one <= class_dim < one:
                fail(fn, "class_dim", f"a dim of the {one}-D output", class_dim)
            y = y.softmax(dim=class_dim % one + lead)
        return y

    with mc_dropout(model, include=extra), torch.no_grad():
        if batched:
            n = x.shape[0]
            out = model(x.unsqueeze(0).expand(samples, *x.shape).reshape(samples * n, *x.shape[1:]))
            if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != samples * n:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                fail(
                    fn,
                    "batched",
                    "False for a model whose output does not keep the batch at dim 0",
                    Shown(f"output {got} for an input batch of {samples * n}"),
                )
            ys = summarise(out.reshape(samples, n, *out.shape[1:]), 1)
            mean, variance = ys.mean(dim=0), ys.var(dim=0, correction=0)
        else:
            # Welford's running mean and sum of squared deviations, stable in float32
            mean = summarise(model(x), 0).clone()  # pass 0: the ordinary keys, if keyed
            m2 = torch.zeros_like(mean)
            for t in range(2, samples + 1):
                with context_draw(t - 1):  # a fresh key per pass for keyed layers
                    y = summarise(model(x), 0)
                delta = y - mean
                mean += delta / t
                m2 += delta * (y - mean)
            variance = m2 / samples
    entropy = None
    if softmax:
        entropy = -torch.special.xlogy(mean, mean).sum(dim=class_dim)
    return MCPrediction(mean, variance, entropy)
