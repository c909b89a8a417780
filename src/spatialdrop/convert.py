"""Convert the dropout layers of an existing model (timm, torchvision, torch) to spatialdrop's.

The peers are recognised by the module path and the name of their class, never imported:
spatialdrop does not depend on timm or torchvision. :data:`PEERS` is the one table of what is
converted, to what, and how the meaning changes.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Optional, Union

from torch import nn

from ._module import StructuredDropout
from ._validation import Shown, check_bool, fail
from .alpha import AlphaSpatialDropout
from .drop_block import DropBlock, DropBlock2d, DropBlock3d
from .drop_path import DropPath
from .keyed import OTHER_DROPOUT, carry_keys
from .spatial_dropout import SpatialDropout, SpatialDropout1d, SpatialDropout3d

__all__ = ["convert_dropout"]

Types = Union[type, Iterable[type]]
Exclude = Union[str, type, Iterable[Union[str, type]]]


class Refused(Exception):
    """A layer that no spatialdrop layer reproduces; the message says why."""


class Peer(NamedTuple):
    """A dropout layer of another library: how to recognise it, what it becomes."""

    package: str
    """The top-level package of the class's module: ``"timm"``, ``"torchvision"`` or ``"torch"``."""
    name: str
    """The class name."""
    rate: str
    """The attribute holding the drop rate."""
    shown: tuple[tuple[str, object], ...]
    """The attributes shown in the ``verbose`` table, each with a default that hides it (or
    ``_SHOWN`` to show it always)."""
    build: Callable[[nn.Module], StructuredDropout]
    """``build(layer)`` returns the spatialdrop layer with the same meaning, or raises :class:`Refused`."""
    note: Optional[str]
    """How the meaning changes (the warning), or ``None`` where it stays the same."""

    @property
    def label(self) -> str:
        """``"timm DropPath"``: the package and the class."""
        return f"{self.package} {self.name}"


_SHOWN = object()  # an attribute the table always shows


def _attr(m: nn.Module, name: str) -> Any:
    """An attribute of a peer layer (typed ``Any``: nn.Module types attributes as Tensor | Module)."""
    return getattr(m, name)


def _timm_drop_path(m: nn.Module) -> StructuredDropout:
    return DropPath(_attr(m, "drop_prob"), scale=bool(getattr(m, "scale_by_keep", True)))


def _stochastic_depth(m: nn.Module) -> StructuredDropout:
    mode = _attr(m, "mode")
    if mode != "row":
        raise Refused(
            f"mode={mode!r} draws one keep-or-drop for the whole batch, which no spatialdrop layer "
            "does (DropPath is mode='row': one draw per sample)"
        )
    return DropPath(_attr(m, "p"))


def _timm_drop_block(m: nn.Module) -> StructuredDropout:
    # older timm (before 1.0.23) had no couple_channels and drew one mask per channel
    noise = bool(getattr(m, "with_noise", False))
    scaled = bool(getattr(m, "scale_by_keep", True)) and not noise
    return DropBlock2d(
        _attr(m, "drop_prob") * getattr(m, "gamma_scale", 1.0),
        _attr(m, "block_size"),
        bool(getattr(m, "inplace", False)),
        shared_channels=bool(getattr(m, "couple_channels", False)),
        scale="realized" if scaled else "none",
    )


def _torchvision_drop_block(cls: type[DropBlock]) -> Callable[[nn.Module], StructuredDropout]:
    def build(m: nn.Module) -> StructuredDropout:
        return cls(_attr(m, "p"), _attr(m, "block_size"), bool(_attr(m, "inplace")), scale="realized")

    return build


def _torch(cls: type[StructuredDropout]) -> Callable[[nn.Module], StructuredDropout]:
    def build(m: nn.Module) -> StructuredDropout:
        return cls(_attr(m, "p"), bool(_attr(m, "inplace")))

    return build


_BLOCK_SCALE = (
    "and the kept values are scaled per sample by its own kept fraction (scale='realized'; {0} "
    "scales by the kept fraction of the whole batch, so one sample's output depends on the others)"
)
_TORCH = (("p", _SHOWN), ("inplace", False))

PEERS: tuple[Peer, ...] = (
    Peer(
        "timm",
        "DropPath",
        "drop_prob",
        (("drop_prob", _SHOWN), ("scale_by_keep", True)),
        _timm_drop_path,
        None,
    ),
    Peer(
        "timm",
        "DropBlock2d",
        "drop_prob",
        (
            ("drop_prob", _SHOWN),
            ("block_size", _SHOWN),
            ("gamma_scale", 1.0),
            ("couple_channels", _SHOWN),
            ("with_noise", False),
            ("inplace", False),
            ("scale_by_keep", True),
        ),
        _timm_drop_block,
        "every position is now dropped with probability exactly p = drop_prob * gamma_scale (timm "
        "drops more than that, far more on maps not much larger than the block, whose size it cuts "
        "to the map), " + _BLOCK_SCALE.format("timm"),
    ),
    Peer("torchvision", "StochasticDepth", "p", (("p", _SHOWN), ("mode", _SHOWN)), _stochastic_depth, None),
    *(
        Peer(
            "torchvision",
            cls.__name__,
            "p",
            (("p", _SHOWN), ("block_size", _SHOWN), ("inplace", False)),
            _torchvision_drop_block(cls),
            "every position is now dropped with probability exactly p (torchvision drops less: its "
            "seed rate ignores that blocks overlap; and it places blocks only where they fit whole, "
            "while here blocks may be cut by the border, so maps smaller than the block and even "
            "block sizes work as they are), " + _BLOCK_SCALE.format("torchvision"),
        )
        for cls in (DropBlock2d, DropBlock3d)
    ),
    Peer("torch", "Dropout1d", "p", _TORCH, _torch(SpatialDropout1d), None),
    Peer("torch", "Dropout2d", "p", _TORCH, _torch(SpatialDropout), None),
    Peer("torch", "Dropout3d", "p", _TORCH, _torch(SpatialDropout3d), None),
    Peer("torch", "FeatureAlphaDropout", "p", _TORCH, _torch(AlphaSpatialDropout), None),
)

_BY_CLASS = {(p.package, p.name): p for p in PEERS}
_NOISE = (
    " with_noise=True has no counterpart: those layers now zero their dropped blocks (unscaled, as "
    "timm leaves them) instead of filling them with Gaussian noise."
)


def _peer_of_class(cls: type) -> Peer | None:
    """The peer whose class ``cls`` is exactly (``torch``'s classes by identity), else ``None``."""
    peer = _BY_CLASS.get((cls.__module__.split(".")[0], cls.__name__))
    if peer is not None and peer.package == "torch" and getattr(nn, peer.name, None) is not cls:
        return None  # a class of torch's that is not nn.Dropout1d/2d/3d/FeatureAlphaDropout
    return peer


def peer_dropout(m: nn.Module) -> Peer | None:
    """The timm or torchvision dropout layer that ``m`` is, or subclasses; ``None`` for others.

    Used by :func:`~spatialdrop.mc_dropout`, which samples these layers without conversion
    (torch's layers are ``_DropoutNd`` and found as such).
    """
    for cls in type(m).__mro__:
        peer = _peer_of_class(cls)
        if peer is not None and peer.package != "torch":
            return peer
    return None


OTHER_DROPOUT.append(peer_dropout)  # keyed_masks counts them among the layers it cannot key


def peer_rate(m: nn.Module, peer: Peer) -> float | None:
    """The drop rate of a peer layer (``None`` when the attribute is missing or not a number)."""
    rate = getattr(m, peer.rate, None)
    return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None


def _fmt(value: object) -> str:
    if not isinstance(value, float):
        return repr(value)
    text = f"{value:.4g}"
    return text if any(c in text for c in ".en") else text + ".0"


def _settings(pairs: Iterable[tuple[str, object]]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in pairs)


def _describe_old(m: nn.Module, peer: Peer) -> str:
    shown = [
        (a, getattr(m, a))
        for a, default in peer.shown
        if hasattr(m, a) and (default is _SHOWN or getattr(m, a) != default)
    ]
    return f"{peer.label}({_settings(shown)})"


def _describe_new(m: StructuredDropout) -> str:
    pairs: list[tuple[str, object]] = [("p", m.p)]
    if m.inplace:
        pairs.append(("inplace", True))
    params = inspect.signature(type(m)).parameters
    for k, v in m.extra_options().items():
        param = params.get(k)
        if param is None or param.kind is not param.KEYWORD_ONLY or param.default != v:
            pairs.append((k, v))  # positional settings always, keyword-only ones when not default
    return f"{type(m).__name__}({_settings(pairs)})"


def _kinds(fn: str, include: Types | None) -> tuple[Peer, ...]:
    if include is None:
        return PEERS
    types = (include,) if isinstance(include, type) else include
    known = ", ".join(p.label for p in PEERS)
    allowed = f"None or layer types to convert, a type or a collection of them ({known})"
    if isinstance(include, str) or not isinstance(types, Iterable):
        fail(fn, "include", allowed, include, kind=TypeError)
    types = tuple(types)
    if not types or not all(isinstance(t, type) for t in types):
        fail(fn, "include", allowed, include, kind=TypeError)
    kinds = []
    for t in types:
        peer = _peer_of_class(t)
        if peer is None:
            fail(fn, "include", f"layer types that convert_dropout converts ({known})", Shown(t.__qualname__))
        kinds.append(peer)
    return tuple(kinds)


def _exclusions(fn: str, model: nn.Module, exclude: Exclude) -> tuple[tuple[str, ...], tuple[type, ...]]:
    items = [exclude] if isinstance(exclude, (str, type)) else exclude
    try:
        items = list(items)
    except TypeError:
        fail(fn, "exclude", "module names, module types or an iterable of them", exclude, kind=TypeError)
    names = tuple(i for i in items if isinstance(i, str))
    types = tuple(i for i in items if isinstance(i, type))
    if len(names) + len(types) != len(items) or not all(issubclass(t, nn.Module) for t in types):
        fail(fn, "exclude", "module names (str) and nn.Module types", exclude, kind=TypeError)
    present = {name for name, _ in model.named_modules(remove_duplicate=False)}
    for name in names:
        if name not in present:
            fail(fn, "exclude", "names from model.named_modules()", name)
    return names, types


def convert_dropout(
    model: nn.Module,
    *,
    include: Types | None = None,
    exclude: Exclude = (),
    verbose: bool = False,
) -> nn.Module:
    """Replace, in place, the dropout layers of timm, torchvision and torch by spatialdrop's.

    For models you did not write (``timm.create_model(..., drop_path_rate=0.1)``,
    ``torchvision.models.*``): every layer below becomes the spatialdrop layer with the same
    meaning, rate, block size and ``inplace``, and then gets what spatialdrop's layers have:
    calibrated rates, per-sample scales, :func:`~spatialdrop.keyed_masks`,
    :class:`~spatialdrop.DropSchedule`, :func:`~spatialdrop.mc_predict`. The layers hold no
    parameters or buffers, so the ``state_dict`` keys stay the same (load weights before or after)
    and the eval-mode output stays the same, bit for bit. Each new layer takes the old one's
    training mode; a layer that appears under several names (shared) stays shared.

    What becomes what:

    - timm ``DropPath(drop_prob, scale_by_keep)`` -> :class:`DropPath` ``(p, scale)``, and
      torchvision ``StochasticDepth(p, mode="row")`` -> :class:`DropPath` ``(p)``: the same
      (the same bits for the same seed).
    - torch ``Dropout1d``, ``Dropout2d``, ``Dropout3d``, ``FeatureAlphaDropout`` ->
      :class:`SpatialDropout1d`, :class:`SpatialDropout` (any rank), :class:`SpatialDropout3d`,
      :class:`AlphaSpatialDropout`: the same (the same bits).
    - timm ``DropBlock2d`` and torchvision ``DropBlock2d/3d`` -> :class:`DropBlock2d` /
      :class:`DropBlock3d`: the meaning changes, see below.
    - torchvision ``StochasticDepth(mode="batch")``: refused (``ValueError``): it draws once for
      the whole batch, which no spatialdrop layer does.

    ``Dropout2d`` becomes the rank-free :class:`SpatialDropout`, not :class:`SpatialDropout2d`:
    torch's ``Dropout2d`` reads every input as batched ``(N, C, *)`` (a 3-D input as
    ``(N, C, L)``, with a warning), and so does :class:`SpatialDropout`, while
    :class:`SpatialDropout2d` reads a 3-D input as an unbatched ``(C, H, W)`` image. Swap in
    :class:`SpatialDropout2d` yourself where the model feeds unbatched images. Like
    :class:`AlphaSpatialDropout` for ``FeatureAlphaDropout``, it refuses a 2-D ``(N, C)`` input,
    which torch deprecates. Plain ``nn.Dropout`` and ``nn.AlphaDropout`` (elementwise) have no
    spatialdrop counterpart and stay; :func:`~spatialdrop.mc_predict` samples them as they are.

    Where the meaning changes, a ``UserWarning`` (one per kind of layer) says how:

    - timm ``DropBlock2d(drop_prob, block_size, gamma_scale, couple_channels, ...)`` becomes
      ``DropBlock2d(p=drop_prob * gamma_scale, block_size, shared_channels=couple_channels,
      scale="realized")``: every position is dropped with probability exactly p (timm drops
      more, far more on maps not much larger than the block), and the kept values are scaled by
      each sample's own kept fraction (timm: the batch's). ``scale_by_keep=False`` gives
      ``scale="none"``; ``with_noise=True`` (noise in the dropped blocks) has no counterpart:
      the dropped blocks are zeroed and the rest is left unscaled, as timm does with noise.
    - torchvision ``DropBlock2d/3d(p, block_size)`` becomes ``DropBlock2d/3d(p, block_size,
      scale="realized")`` with per-channel masks, as torchvision's: every position is dropped
      with probability exactly p (torchvision drops less, places blocks only where they fit
      whole, and refuses even sizes), scaled per sample (torchvision: by the batch).

    Classes are matched exactly (a subclass may change ``forward``, so it is left alone) and
    recognised by module path and name: spatialdrop does not import timm or torchvision. Call
    it before ``torch.compile``, ``DistributedDataParallel`` or ``fully_shard`` wrap the model;
    the optimizer can be built before or after (no parameter changes). Hooks registered on the
    old layers are not carried over. Keyed masks are: after :func:`~spatialdrop.keyed_masks`,
    each new layer draws keyed masks with the seed and the layer id that ``keyed_masks`` gave
    the layer it replaces (a ``UserWarning`` names new layers of a keyed model that replace
    layers ``keyed_masks`` did not see). A model converted before, with nothing left to convert,
    is returned as it is (``verbose`` says so).

    Args:
        model: the model to edit (or a single layer, whose replacement is returned).
        include: the layer types to convert, a type or a collection of them (tuple, list, set),
            each one of the kinds above (e.g. ``timm.layers.DropPath`` or ``nn.Dropout2d``).
            Default: ``None``, every kind.
        exclude: layers to leave as they are: module names as in ``model.named_modules()`` (a
            name excludes everything inside it too) and module types (instances and everything
            inside them), a single one or an iterable. Default: none.
        verbose: print a table, one row per converted layer: its name, the old layer with its
            settings and the new one with its settings (rates to 4 significant digits; the
            layers keep the exact values). Default: False.

    Returns:
        ``model``, edited in place (the new layer when ``model`` itself is one to convert).

    Raises:
        ValueError: when there is nothing to convert in a model without spatialdrop layers (the
            message lists the dropout layers the model has and why they stay), when a layer has
            no counterpart (torchvision's ``StochasticDepth(mode="batch")``) or a setting that
            the new layer refuses (the message names the layer; ``exclude`` it to convert the
            rest). Nothing is changed then.

    Warns:
        UserWarning: once per kind of layer whose meaning changes (DropBlock), saying how; and
            when new layers of a keyed model get no key (see above).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from spatialdrop import convert_dropout
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout2d(0.2), nn.Conv2d(8, 8, 1), nn.Dropout(0.1))
        >>> convert_dropout(net, verbose=True)  # doctest: +NORMALIZE_WHITESPACE
        module  from                            to
        1       torch Dropout2d(p=0.2)          SpatialDropout(p=0.2)
        converted 1 layer: torch Dropout2d x1
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): SpatialDropout(p=0.2, inplace=False)
          (2): Conv2d(8, 8, kernel_size=(1, 1), stride=(1, 1))
          (3): Dropout(p=0.1, inplace=False)
        )
        >>> convert_dropout(net, verbose=True) is net  # doctest: +NORMALIZE_WHITESPACE
        converted 0 layers: nothing to convert, the model's dropout layers are
        Dropout x1 (elementwise: no counterpart, stays), SpatialDropout x1 (spatialdrop's already)
        True
        >>> convert_dropout(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.1)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        ValueError: convert_dropout: model must be a model that holds a layer to convert (...), got one...
    """
    fn = "convert_dropout"
    if not isinstance(model, nn.Module):
        fail(fn, "model", "an nn.Module", Shown(type(model).__name__), kind=TypeError)
    kinds = _kinds(fn, include)
    names, types = _exclusions(fn, model, exclude)
    check_bool(fn, "verbose", verbose)

    def excluded(name: str, m: nn.Module) -> bool:
        return isinstance(m, types) or any(name == n or name.startswith(n + ".") for n in names if n)

    # every (parent, key) under which a layer to convert sits; parent None: the model itself
    found: dict[int, tuple[nn.Module, Peer, list[tuple[Optional[nn.Module], str, str]]]] = {}
    skipped: set[int] = set()  # a shared layer excluded under one of its names stays everywhere

    def visit(parent: Optional[nn.Module], key: str, name: str, m: nn.Module, seen: set[int]) -> None:
        if excluded(name, m) or "" in names:
            skipped.add(id(m))
            return
        peer = _peer_of_class(type(m))
        if peer is not None and peer in kinds:
            found.setdefault(id(m), (m, peer, []))[2].append((parent, key, name))
            return
        if id(m) in seen:
            return
        seen.add(id(m))
        for k, child in m._modules.items():
            if child is not None:
                visit(m, k, f"{name}.{k}" if name else k, child, seen)

    visit(None, "", "", model, set())
    for i in skipped:
        found.pop(i, None)
    if not found:
        if any(isinstance(m, StructuredDropout) for m in model.modules()):  # converted before: a no-op
            if verbose:
                got = _nothing_got(model, kinds, skipped).removeprefix("one whose dropout layers are ")
                print(f"converted 0 layers: nothing to convert, the model's dropout layers are {got}")
            return model
        fail(fn, "model", _nothing_allowed(kinds, include), Shown(_nothing_got(model, kinds, skipped)))

    new: dict[int, StructuredDropout] = {}
    for i, (m, peer, places) in found.items():
        old = _describe_old(m, peer)
        try:
            layer = peer.build(m)
        except Refused as e:
            fail(fn, "model", _refused(places[0][2], str(e)), Shown(old))
        except (ValueError, TypeError) as e:  # our constructor refuses a setting (p = 1 for DropBlock)
            fail(fn, "model", _refused(places[0][2], str(e)), Shown(old), kind=type(e))
        new[i] = layer.train(m.training)
    carry_keys(fn, model, [(m, new[i]) for i, (m, _, _) in found.items()])

    rows: list[tuple[str, str, str]] = []
    counts: dict[str, int] = {}
    notes: dict[str, str] = {}  # label -> warning, one per kind
    root: nn.Module = model
    for i, (m, peer, places) in found.items():
        layer = new[i]
        for parent, key, name in places:
            if parent is None:
                root = layer
            else:
                parent._modules[key] = layer
            rows.append((name, _describe_old(m, peer), _describe_new(layer)))
        counts[peer.label] = counts.get(peer.label, 0) + 1
        if peer.note is not None:
            note = notes.setdefault(
                peer.label, f"{fn}: {peer.label} -> spatialdrop {type(layer).__name__}: {peer.note}."
            )
            if getattr(m, "with_noise", False) and not note.endswith(_NOISE):
                notes[peer.label] = note + _NOISE
    for note in notes.values():
        warnings.warn(note, UserWarning, stacklevel=2)
    if verbose:
        order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
        rows.sort(key=lambda r: order[r[0]])
        _print_table(rows, counts)
    return root


def _refused(name: str, why: str) -> str:
    where = name or "the model itself"
    leave = f"; leave it as it is with exclude=[{name!r}]" if name else ""
    return f"a model whose layers to convert all have a spatialdrop counterpart ({where}: {why}{leave})"


def _nothing_allowed(kinds: tuple[Peer, ...], include: Types | None) -> str:
    which = ", ".join(p.label for p in kinds)
    return f"a model that holds a layer to convert ({which}{'' if include is None else ', as include asks'})"


def _nothing_got(model: nn.Module, kinds: tuple[Peer, ...], skipped: set[int]) -> str:
    found: dict[tuple[str, str], int] = {}
    for m in model.modules():
        peer = _peer_of_class(type(m))
        if not isinstance(m, nn.modules.dropout._DropoutNd) and peer_dropout(m) is None:
            continue
        if isinstance(m, StructuredDropout):
            why = "spatialdrop's already"
        elif peer is None and type(m) in (nn.Dropout, nn.AlphaDropout):
            why = "elementwise: no counterpart, stays"
        elif peer is None:
            why = "a subclass: left alone"
        elif id(m) in skipped:
            why = "excluded"
        else:
            why = "not included" if peer not in kinds else "inside an excluded module"
        key = (type(m).__name__, why)
        found[key] = found.get(key, 0) + 1
    if not found:
        return "one without dropout layers"
    return "one whose dropout layers are " + ", ".join(
        f"{t} x{n} ({why})" for (t, why), n in sorted(found.items())
    )


def _print_table(rows: list[tuple[str, str, str]], counts: dict[str, int]) -> None:
    header = ("module", "from", "to")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]
    for r in [header, *rows]:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}".rstrip())
    total = sum(counts.values())
    kinds = ", ".join(f"{label} x{n}" for label, n in counts.items())
    print(f"converted {total} layer{'s' if total != 1 else ''}: {kinds}")
