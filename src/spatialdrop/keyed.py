"""Keyed masks: the mask of a sample is a function of *what* is dropped, not of where it runs.

With torch's generators a dropout mask depends on the device, the CPU family, the world size and
the micro-batch split. A keyed layer instead draws its random numbers from Philox-4x32-10 (see
:mod:`spatialdrop._philox`) with a key and counter built only from

- ``seed``: the run's seed, given to :func:`keyed_masks`;
- ``layer``: a 64-bit id of the layer, a stable hash of its qualified name in the model;
- ``step``: the training step, given to :func:`mask_context`;
- ``sample_ids[i]``: the global identity of sample ``i`` of the batch (a dataset index, or
  ``rank * local_batch + arange(local_batch)``), given to :func:`mask_context`;
- the column: which of the sample's random numbers (for spatial dropout, the channel).

Layout (so that other code, for instance a Triton kernel, can reproduce the numbers): the 64-bit
Philox key is ``(k0, k1) = philox4x32_int(layer mod 2**32, layer >> 32, 0, 0x6D61736B; seed mod
2**32, seed >> 32)[:2]`` (see :meth:`MaskKey.philox_seed`); column ``j`` of sample ``i`` is output
word ``j % 4`` of Philox-4x32-10 at counter ``(j // 4, sid mod 2**32, sid >> 32 mod 2**32,
step)``, with ``sid = sample_ids[i]`` read as 64-bit two's complement, converted to a float in
``[0, 1)`` exactly as Triton's ``uint_to_uniform_float``. In Triton::

    r = tl.philox(philox_seed, (j // 4).to(tl.uint32), sid_lo, sid_hi, step)  # 4 uint32 blocks
    u = tl.uint_to_uniform_float(r[j % 4])

Keying is a capability that each layer class declares in its ``keying`` class attribute (one of
``KEYINGS``): ``"per_sample"`` layers draw row ``sample_ids[i]`` for sample ``i`` as above;
``"per_call"`` layers (filter dropout, whose mask is shared by the batch) draw one row with the
sample id ``-1`` (``2**64 - 1``), so their mask depends only on ``(seed, step, layer)``. Inside
a Monte Carlo pass ``t > 0`` of :func:`spatialdrop.mc_predict` the layer id is
:func:`mc_layer` ``(layer, t)``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import numbers
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import torch
from torch import Tensor

from ._compat import is_compiling
from ._philox import MASK32, philox4x32, philox4x32_int, uint32_to_uniform
from ._validation import Shown, check_device, check_int, fail

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MaskKey", "keyed_masks", "keyed_normal", "keyed_uniform", "mask_context"]

_KEY_DOMAIN = 0x6D61736B  # "mask": separates derived layer keys from any other use of the seed
_MAX_STEP = 1 << 32
_MAX_SEED = 1 << 64

#: torch's module wrappers, recognised by the module path and name of a class in their MRO (never
#: imported): the attribute under which each holds the module it wraps. A path component that is
#: this attribute of an instance of the class is left out of a layer's name (see
#: :func:`keyed_names`), so wrapping changes no layer id. A user's own submodule called ``module``
#: is a name component like any other.
WRAPPERS: tuple[tuple[str, str, str], ...] = (
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),  # torch.compile(module)
    (  # checkpoint_wrapper, offload_wrapper (apply_activation_checkpointing)
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "ActivationWrapper",
        "_checkpoint_wrapped_module",
    ),
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
        "_fsdp_wrapped_module",
    ),
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    ("torch.optim.swa_utils", "AveragedModel", "module"),  # SWA / EMA copies
    ("torch.ao.quantization.stubs", "QuantWrapper", "module"),
)
_WRAPPED_BY = {(module, name): attr for module, name, attr in WRAPPERS}
# the attribute under which keyed_masks leaves (seed, layer id) on a dropout layer it cannot key
_CARRIED = "_spatialdrop_keyed"

#: Tests that recognise the dropout layers of other libraries that are no ``_DropoutNd`` (timm's
#: and torchvision's; :mod:`spatialdrop.convert`, which knows them, registers its test here, as
#: this module may not import it): :func:`keyed_masks` counts them among the layers it cannot key.
OTHER_DROPOUT: list[Callable[[nn.Module], object]] = []


class MaskKey(NamedTuple):
    """Everything a keyed mask depends on, for the functional forms' ``key=`` argument.

    Attributes:
        seed: the run's seed, an int in ``[0, 2**64)``.
        step: the training step, an int in ``[0, 2**32)`` or a 0-dim integer tensor (whose value
            is used modulo ``2**32``).
        layer: the layer's id, an int in ``[0, 2**64)``; :func:`keyed_masks` derives it from the
            layer's qualified name.
        sample_ids: a 1-D integer tensor, one global id per sample of the batch (values used as
            64-bit two's complement).

    Examples:
        >>> import torch
        >>> key = MaskKey(seed=0, step=3, layer=1, sample_ids=torch.arange(2))
        >>> keyed_uniform(key, 5).shape
        torch.Size([2, 5])
        >>> hex(key.philox_seed())
        '0x...'
    """

    seed: int
    step: Union[int, Tensor]
    layer: int
    sample_ids: Tensor

    def philox_seed(self) -> int:
        """The 64-bit Philox key ``k0 | k1 << 32`` of this (seed, layer): Triton's ``seed``."""
        k0, k1 = _layer_key(self.seed, self.layer)
        return k0 | (k1 << 32)


#: How a layer class may declare that it is keyed (its ``keying`` class attribute):
#: ``"per_sample"``: one draw per sample, from ``(seed, step, layer, sample id)``;
#: ``"per_call"``: one draw per call shared by the batch, from ``(seed, step, layer)`` only.
#: :func:`keyed_masks` switches exactly the modules whose class declares one of these.
KEYINGS = ("per_sample", "per_call")


class _Context(NamedTuple):
    step: int | None  # the int given, used in eager mode
    step_tensor: Tensor  # the same as a 0-dim int64 tensor, used under torch.compile
    sample_ids: Tensor
    draw: int = 0  # the Monte Carlo draw (see spatialdrop.mc_predict); 0 outside it


def current_context() -> _Context | None:
    """The innermost active :func:`mask_context` of this thread, or ``None``."""
    return getattr(_LOCAL, "context", None)


@contextlib.contextmanager
def context_draw(draw: int) -> Iterator[None]:
    """Run keyed layers inside the current :func:`mask_context` as Monte Carlo draw ``draw``.

    Draw ``d > 0`` keys every layer with the derived id ``mc_layer(layer, d)`` instead of
    ``layer``, so each draw gets its own masks (see :func:`spatialdrop.mc_predict`).
    """
    ctx = current_context()
    if ctx is None:
        yield
        return
    _LOCAL.context = ctx._replace(draw=draw)
    try:
        yield
    finally:
        _LOCAL.context = ctx


def mc_layer(layer: int, draw: int) -> int:
    """The layer id that a keyed layer with id ``layer`` uses in Monte Carlo draw ``draw``.

    ``layer`` itself for draw 0, else BLAKE2b (8 bytes, person ``spatialdrop-mc``) of the two
    ids as 8-byte little-endian words: independent of the ordinary masks and of other draws.

    Examples:
        >>> mc_layer(5, 0), mc_layer(5, 1) != mc_layer(5, 2)
        (5, True)
    """
    if draw == 0:
        return layer
    data = layer.to_bytes(8, "little") + draw.to_bytes(8, "little")
    digest = hashlib.blake2b(data, digest_size=8, person=b"spatialdrop-mc").digest()
    return int.from_bytes(digest, "little")


_LOCAL = threading.local()


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_step(fn: str, step: Any, arg: str = "step") -> None:
    allowed = "an int in [0, 2**32) or a 0-dim integer tensor"
    if isinstance(step, Tensor):
        if step.dim() != 0 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            fail(fn, arg, allowed, Shown(f"a {step.dim()}-D {step.dtype} tensor"), kind=TypeError)
        return
    if not _is_int(step):
        fail(fn, arg, allowed, step, kind=TypeError)
    if not 0 <= step < _MAX_STEP:
        fail(fn, arg, allowed, step)


def _check_sample_ids(fn: str, sample_ids: Any, arg: str = "sample_ids") -> None:
    allowed = "a 1-D integer tensor with one global id per sample"
    if not isinstance(sample_ids, Tensor):
        fail(fn, arg, allowed, Shown(type(sample_ids).__name__), kind=TypeError)
    bad_dtype = sample_ids.is_floating_point() or sample_ids.is_complex() or sample_ids.dtype == torch.bool
    if bad_dtype:
        fail(fn, arg, allowed, Shown(f"a tensor of dtype {sample_ids.dtype}"), kind=TypeError)
    if sample_ids.dim() != 1:
        fail(fn, arg, allowed, Shown(f"a tensor of shape {tuple(sample_ids.shape)}"))


def _check_u64(fn: str, arg: str, value: Any) -> int:
    allowed = "an int in [0, 2**64)"
    if not _is_int(value):
        fail(fn, arg, allowed, value, kind=TypeError)
    if not 0 <= value < _MAX_SEED:
        fail(fn, arg, allowed, value)
    return int(value)


def check_key(
    fn: str, key: Any, batch_size: int | None = None, *, allowed: str = "a spatialdrop.MaskKey"
) -> MaskKey:
    """Check a :class:`MaskKey` (and, if given, that it has one sample id per sample).

    ``allowed`` is what the message says the argument may be (``"None or a spatialdrop.MaskKey"``
    for an optional ``key=``).
    """
    if not isinstance(key, MaskKey):
        fail(fn, "key", allowed, Shown(type(key).__name__), kind=TypeError)
    _check_u64(fn, "key.seed", key.seed)
    _check_u64(fn, "key.layer", key.layer)
    _check_step(fn, key.step, "key.step")
    _check_sample_ids(fn, key.sample_ids, "key.sample_ids")
    if batch_size is not None and key.sample_ids.shape[0] != batch_size:
        fail(
            fn,
            "key.sample_ids",
            f"one id per sample of the batch ({batch_size})",
            Shown(f"{key.sample_ids.shape[0]} ids"),
        )
    return key


def _derive_layer_key(seed: int, layer: int) -> tuple[int, int]:
    w = philox4x32_int(layer & MASK32, layer >> 32, 0, _KEY_DOMAIN, seed & MASK32, seed >> 32)
    return w[0], w[1]


_derive_layer_key_cached = functools.lru_cache(maxsize=4096)(_derive_layer_key)


def _layer_key(seed: int, layer: int) -> tuple[int, int]:
    """The Philox key of a (seed, layer): a pseudo-random function of both, 64 bits."""
    if is_compiling():  # traced once per graph: no cache needed
        return _derive_layer_key(seed, layer)
    return _derive_layer_key_cached(seed, layer)


def _step_word(step: int | Tensor, device: torch.device) -> int | Tensor:
    if not isinstance(step, Tensor):
        return step
    if step.device != device:  # a CPU scalar reaches an accelerator as a kernel argument, no copy
        return torch.zeros((), dtype=torch.int64, device=device).add_(step.to(torch.int64) & MASK32)
    return step.to(torch.int64) & MASK32


def keyed_uniform(key: MaskKey, per_sample: int, *, device: torch.device | str | None = None) -> Tensor:
    """Uniform float32 numbers in [0, 1) for each sample, a pure function of the key.

    Row ``i`` depends only on ``(key.seed, key.step, key.layer, key.sample_ids[i])`` and the
    column index: the same sample gets the same numbers whatever the batch it is in, its
    position there, the device or the number of processes. The layout is given in the
    module docstring of :mod:`spatialdrop.keyed`.

    Args:
        key: the :class:`MaskKey`.
        per_sample: how many numbers to draw per sample (an int ``>= 0``).
        device: where to put the result. Default: the device of ``key.sample_ids``.

    Returns:
        A float32 tensor of shape ``(len(key.sample_ids), per_sample)``.

    Examples:
        >>> import torch
        >>> from spatialdrop import MaskKey, keyed_uniform
        >>> u = keyed_uniform(MaskKey(seed=1, step=0, layer=7, sample_ids=torch.tensor([5, 9])), 3)
        >>> v = keyed_uniform(MaskKey(seed=1, step=0, layer=7, sample_ids=torch.tensor([9])), 3)
        >>> torch.equal(u[1], v[0])  # sample 9 gets the same numbers in either batch
        True
    """
    return _keyed_uniform("keyed_uniform", key, per_sample, device, limit=4 * _MAX_STEP)


def _keyed_uniform(
    fn: str, key: MaskKey, per_sample: int, device: torch.device | str | None, *, limit: int
) -> Tensor:
    check_key(fn, key)
    per_sample = check_int(fn, "per_sample", per_sample, minimum=0)
    if per_sample > limit:
        fail(fn, "per_sample", f"an int in [0, 2**{limit.bit_length() - 1}]", per_sample)
    dev = key.sample_ids.device if device is None else check_device(fn, device)
    return uniform_rows(key, per_sample, dev)


def uniform_rows(key: MaskKey, per_sample: int, dev: torch.device, first: int = 0) -> Tensor:
    """Columns ``first .. first + per_sample - 1`` of :func:`keyed_uniform`'s rows (unchecked).

    A window of the columns costs only its own Philox blocks: a shard of the channels (a
    DTensor sharded on the channel dim) draws its own columns and nothing else.
    """
    sid = key.sample_ids.to(device=dev, dtype=torch.int64)
    n = sid.shape[0]
    start, lead = divmod(first, 4)
    blocks = (lead + per_sample + 3) // 4
    if n == 0 or per_sample == 0:
        return torch.zeros((n, per_sample), dtype=torch.float32, device=dev)
    k0, k1 = _layer_key(key.seed, key.layer)
    col = torch.arange(start, start + blocks, dtype=torch.int64, device=dev).view(1, blocks)
    s = sid.view(n, 1)
    words = philox4x32(col, s & MASK32, (s >> 32) & MASK32, _step_word(key.step, dev), k0, k1)
    flat = torch.stack(words, dim=-1).view(n, 4 * blocks)
    if per_sample != 4 * blocks:
        flat = flat[:, lead : lead + per_sample]
    return uint32_to_uniform(flat)


def normal_rows(key: MaskKey, per_sample: int, dev: torch.device, first: int = 0) -> Tensor:
    """Columns ``first .. first + per_sample - 1`` of :func:`keyed_normal`'s rows (unchecked)."""
    u = uniform_rows(key, 2 * per_sample, dev, 2 * first)
    u1 = u[:, 0::2].clamp_min(1.0e-7)
    u2 = u[:, 1::2]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def keyed_normal(key: MaskKey, per_sample: int, *, device: torch.device | str | None = None) -> Tensor:
    """Standard normal float32 numbers for each sample, from :func:`keyed_uniform` by Box–Muller.

    Column ``j`` of a row uses the uniforms ``u1, u2`` of columns ``2j`` and ``2j + 1`` of
    ``keyed_uniform(key, 2 * per_sample)`` and is ``sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2)``,
    the formula of Triton's ``tl.randn``. Rows depend only on their sample, as for the
    uniforms, and on one device the numbers are bit for bit the same in any batch split; across
    devices they agree to the last bits of ``log``, ``sqrt`` and ``cos`` (the uniforms are exact).

    Args:
        key: the :class:`MaskKey`.
        per_sample: how many numbers to draw per sample (an int ``>= 0``).
        device: where to put the result. Default: the device of ``key.sample_ids``.

    Returns:
        A float32 tensor of shape ``(len(key.sample_ids), per_sample)``.

    Examples:
        >>> import torch
        >>> from spatialdrop import MaskKey
        >>> keyed_normal(MaskKey(seed=1, step=0, layer=7, sample_ids=torch.arange(3)), 4).shape
        torch.Size([3, 4])
    """
    fn = "keyed_normal"
    per_sample = check_int(fn, "per_sample", per_sample, minimum=0)
    if per_sample > 2 * _MAX_STEP:
        fail(fn, "per_sample", "an int in [0, 2**33]", per_sample)
    check_key(fn, key)
    dev = key.sample_ids.device if device is None else check_device(fn, device)
    return normal_rows(key, per_sample, dev)


@contextlib.contextmanager
def mask_context(*, step: int | Tensor, sample_ids: Tensor) -> Iterator[None]:
    """Supply the step and the samples' global ids to every keyed layer run inside the block.

    Contexts are per thread and nest: leaving an inner block restores the outer one.

    Args:
        step: the training step, an int in ``[0, 2**32)`` or a 0-dim integer tensor. Under
            ``torch.compile`` the step is passed to the graph as a tensor, so a new step does
            not recompile.
        sample_ids: a 1-D integer tensor with the global id of each sample of the batch, in
            batch order (dataset indices, or ``rank * local_batch + arange(local_batch)``). Put
            it on the model's device. For a DTensor input sharded on the batch, the ids of the
            whole global batch, on every rank: each rank's layers use the rows of their shard.

    Examples:
        >>> import torch
        >>> from spatialdrop import SpatialDropout2d, keyed_masks, mask_context
        >>> net = keyed_masks(torch.nn.Sequential(SpatialDropout2d(0.5)), seed=0)
        >>> x = torch.ones(4, 3, 2, 2)
        >>> with mask_context(step=0, sample_ids=torch.arange(4)):
        ...     a = net(x)
        >>> with mask_context(step=0, sample_ids=torch.arange(2, 4)):
        ...     b = net(x[2:])  # samples 2 and 3 alone get the same masks
        >>> torch.equal(a[2:], b)
        True
    """
    fn = "mask_context"
    _check_step(fn, step)
    _check_sample_ids(fn, sample_ids)
    if isinstance(step, Tensor):
        ctx = _Context(None, step.to(torch.int64), sample_ids.to(torch.int64))
    else:
        ctx = _Context(int(step), torch.tensor(int(step), dtype=torch.int64), sample_ids.to(torch.int64))
    previous = getattr(_LOCAL, "context", None)
    _LOCAL.context = ctx
    try:
        yield
    finally:
        _LOCAL.context = previous


def wrapped_attr(module: nn.Module) -> str | None:
    """The attribute under which ``module`` holds the module it wraps, if it is a torch wrapper.

    See :data:`WRAPPERS`: decided by the class (or a base class), never by the attribute's name.
    """
    for cls in type(module).__mro__:
        attr = _WRAPPED_BY.get((cls.__module__, cls.__qualname__))
        if attr is not None:
            return attr
    return None


def keyed_names(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with the names a model has without torch's wrappers.

    The same modules in the same order (each once, under its first name), but a path component
    that is the wrapped module of a wrapper of :data:`WRAPPERS` is left out: ``module`` under a
    ``DistributedDataParallel``, ``_orig_mod`` under a ``torch.compile``'d module,
    ``_checkpoint_wrapped_module`` under ``checkpoint_wrapper``, ``_fsdp_wrapped_module`` under
    FSDP, anywhere in the path. A wrapper and the module it wraps then share one name.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> net[1] = torch.compile(net[1])
        >>> [name for name, _ in net.named_modules()]
        ['', '0', '1', '1._orig_mod']
        >>> [name for name, _ in keyed_names(net)]
        ['', '0', '1', '1']
    """
    seen: set[int] = set()

    def walk(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield name, module
        skip = wrapped_attr(module)
        for key, child in module._modules.items():
            if child is None:
                continue
            part = "" if key == skip else key
            yield from walk(child, f"{name}.{part}" if name and part else name or part)

    yield from walk(model, "")


def layer_id(name: str) -> int:
    """The 64-bit id of a layer from its name: BLAKE2b, stable across runs and hosts.

    :func:`keyed_masks` passes the layer's name without torch's wrappers (see
    :func:`keyed_names`), so a wrapped and a bare model agree.

    Examples:
        >>> hex(layer_id("features.3"))
        '0xc0702367a080bf3c'
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, person=b"spatialdrop").digest()
    return int.from_bytes(digest, "little")


def keyed_masks(model: nn.Module, seed: int | None) -> nn.Module:
    """Switch every keyed-capable layer of ``model`` to keyed masks (or back, with ``seed=None``).

    A layer is keyed-capable when its class declares how it is keyed, in its ``keying`` class
    attribute (see ``KEYINGS``): every spatialdrop layer does. Per-sample layers (spatial,
    Gaussian and alpha dropout, DropBlock, DropPath) draw each sample's masks from ``(seed,
    step, layer, sample id)``; filter dropout, whose mask is shared by the batch, declares
    ``"per_call"`` and draws it from ``(seed, step, layer)`` only. Other dropout layers of the
    model (torch's ``nn.Dropout*``, every ``_DropoutNd`` that declares no keying, timm's and
    torchvision's) are skipped: they keep drawing from torch's generator, and a
    :class:`UserWarning` names them. Each remembers the key it would have had: a later
    :func:`~spatialdrop.convert_dropout` gives it to the spatialdrop layer that replaces it.

    Each layer gets the id :func:`layer_id` of its qualified name, so the ids depend neither on
    the order in which the layers were built nor on anything a ``state_dict`` holds: rebuild the
    model, load a checkpoint, call ``keyed_masks`` with the same seed, and every sample gets the
    masks it would have got before. The name is taken without torch's wrappers, wherever they
    sit in the path (see :func:`keyed_names`): ``torch.compile``'d submodules,
    ``checkpoint_wrapper`` / ``apply_activation_checkpointing``, ``offload_wrapper``,
    ``DistributedDataParallel``, ``DataParallel``, FSDP's ``FullyShardedDataParallel``,
    ``AveragedModel``; ``fully_shard`` (FSDP2) wraps nothing. So ``keyed_masks`` may be called
    before or after wrapping, and the ids it sets are attributes of the layers, kept when the
    model is wrapped later. A keyed layer in training mode must then run inside a
    :func:`mask_context`; in eval mode it is the identity, as before.

    Args:
        model: the model; its keyed-capable modules are switched (the model itself too, if it
            is one).
        seed: the run's seed, an int in ``[0, 2**64)``, or ``None`` to go back to torch's RNG.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: when the model has no layer that can draw keyed masks (the rule of
            :class:`~spatialdrop.DropSchedule` and :func:`~spatialdrop.mc_predict`, which refuse a
            model without the layers they act on); the message lists its dropout layers.

    Warns:
        UserWarning: when switching on (``seed`` not ``None``) and the model holds dropout
            layers that cannot draw keyed masks; the message lists their names and types.

    Examples:
        >>> import torch
        >>> from spatialdrop import SpatialDropout2d, keyed_masks
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), SpatialDropout2d(0.1))
        >>> net = keyed_masks(net, seed=1234)
        >>> net[1].keyed_seed, hex(net[1].keyed_layer)
        (1234, '0x...')
    """
    from torch import nn
    from torch.nn.modules.dropout import _DropoutNd

    fn = "keyed_masks"
    if not isinstance(model, nn.Module):
        fail(fn, "model", "a torch.nn.Module", Shown(type(model).__name__), kind=TypeError)
    if seed is not None:
        seed = _check_u64(fn, "seed", seed)
    keyed: list[tuple[str, Any]] = []  # Any: nn.Module types attributes as Tensor | Module
    others: list[tuple[str, nn.Module]] = []
    for name, module in keyed_names(model):
        if getattr(type(module), "keying", None) in KEYINGS:
            keyed.append((name, module))
        elif isinstance(module, _DropoutNd) or any(recognise(module) for recognise in OTHER_DROPOUT):
            others.append((name, module))
    if not keyed:
        counts: dict[str, int] = {}
        for _, module in others:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        got = ", ".join(f"{t} x{n}" for t, n in sorted(counts.items()))
        fail(
            fn,
            "model",
            "a model with spatialdrop layers, the layers that draw keyed masks (spatialdrop.convert_dropout "
            "converts torch's, timm's and torchvision's structured dropout layers)",
            Shown(f"one whose dropout layers are {got}" if got else "one without dropout layers"),
        )
    for name, module in keyed:
        module.keyed_seed = seed
        module.keyed_layer = None if seed is None else layer_id(name)
    for name, module in others:  # the key convert_dropout hands on to the layer that replaces it
        if seed is None:
            module.__dict__.pop(_CARRIED, None)
        else:
            module.__dict__[_CARRIED] = (seed, layer_id(name))
    if others and seed is not None:
        shown = ", ".join(f"{name or 'model'} ({type(module).__name__})" for name, module in others)
        warnings.warn(
            f"{fn}: {len(others)} dropout layer(s) cannot draw keyed masks and keep using torch's "
            f"generator: {shown}",
            UserWarning,
            stacklevel=2,
        )
    return model


def carry_keys(fn: str, model: nn.Module, replaced: list[tuple[nn.Module, nn.Module]]) -> None:
    """Give each new layer the key :func:`keyed_masks` left on the layer it replaces.

    ``replaced``: ``(old, new)`` pairs of a conversion of ``model``. A new layer whose old one
    has no key stays unkeyed; a :class:`UserWarning` names it when other layers of ``model`` are
    keyed (the model was keyed before the layer was added).
    """
    lost = []
    for old, new in replaced:
        key = old.__dict__.get(_CARRIED)
        if key is not None and getattr(type(new), "keying", None) in KEYINGS:
            new.keyed_seed, new.keyed_layer = key
        else:
            lost.append(type(new).__name__)
    if lost and any(getattr(m, "keyed_seed", None) is not None for m in model.modules()):
        warnings.warn(
            f"{fn}: the model draws keyed masks, but {len(lost)} new layer(s) "
            f"({', '.join(sorted(set(lost)))}) replace layers that keyed_masks did not see and draw "
            "from torch's generator: call spatialdrop.keyed_masks(model, seed) again",
            UserWarning,
            stacklevel=3,
        )
