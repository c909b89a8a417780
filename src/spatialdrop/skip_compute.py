"""Skip the dropped samples' compute in the residual blocks of existing timm and torchvision models.

:func:`skip_dropped_compute` rewrites, in place, the residual blocks it knows (:data:`BLOCKS`,
matched by exact class, recognised by module path and name: timm and torchvision are not
imported) so that each residual branch that ends in a drop path runs on the kept samples only,
through :func:`~spatialdrop.functional.drop_path_residual`. A block keeps its submodules (the
``state_dict`` keys and the hooks on them stay); only its class becomes a subclass whose
``forward`` computes ``x + drop_path(branch(x))`` that way. The drop rate, the training mode and
the keyed mask of each branch are read from the block's own :class:`~spatialdrop.DropPath` at
every call, so :class:`~spatialdrop.DropSchedule`, :func:`~spatialdrop.keyed_masks` and
:func:`~spatialdrop.mc_predict` act on the rewritten blocks as on the plain ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ._compat import inductor_layout_optimization, is_compiling
from ._module import StructuredDropout
from ._validation import Shown, check_bool, fail
from .convert import Exclude, _exclusions, _peer_of_class, convert_dropout, peer_dropout
from .drop_path import DropPath, drop_path
from .residual_drop_path import batch_coupled_modules, drop_path_residual

__all__ = ["skip_dropped_compute"]

Params = Sequence[Union[nn.Module, Tensor, None]]

# --- the residual of one branch ----------------------------------------------------------------


class _ZeroGrads(torch.autograd.Function):
    """``input`` unchanged, with zero gradients for ``params``: a branch that dropped every sample.

    Run on the whole batch, such a branch would give its parameters gradients of zero; skipped,
    it would give them none. The zeros keep the two alike (an optimizer treats a zero gradient and
    no gradient differently: weight decay, momentum) and keep every rank of DDP and FSDP in the
    same collectives when one rank's whole local batch is dropped.
    """

    @staticmethod
    def forward(input: Tensor, *params: Tensor) -> Tensor:
        return input.clone()  # not a view: FSDP's hooks and in-place adds after the block stay sound

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.like = [(p.shape, p.dtype, p.device) for p in inputs[1:]]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        zeros = (torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like)
        return (grad, *zeros)


def _params(items: Params) -> list[Tensor]:
    """The trainable parameters of the branch's modules and tensors, each once."""
    out: dict[int, Tensor] = {}
    for item in items:
        tensors = item.parameters() if isinstance(item, nn.Module) else () if item is None else (item,)
        for t in tensors:
            if t.requires_grad:
                out.setdefault(id(t), t)
    return list(out.values())


def _has_conv(items: Params) -> bool:
    """Whether the branch's modules hold a convolution."""
    return any(
        isinstance(m, nn.modules.conv._ConvNd)
        for item in items
        if isinstance(item, nn.Module)
        for m in item.modules()
    )


def _per_sample(value: Any, n: int) -> bool:
    """Whether an extra argument holds the batch: a 4-D tensor ``(N, heads, L, S)`` with ``N`` rows.

    Attention masks and rotary tables broadcast against ``(N, heads, L, head_dim)``: a 4-D one
    with ``N`` rows has one entry per sample (timm's patch dropout gives such rope tables); 2-D
    and 3-D ones, and 4-D ones with one row, are shared by every sample.
    """
    return isinstance(value, Tensor) and value.dim() == 4 and value.shape[0] == n


def _residual(
    dp: Optional[nn.Module],
    base: Tensor,
    branch: Callable[..., Tensor],
    params: Params,
    *,
    source: Optional[Tensor] = None,
    whole_compiled: bool = False,
    **extra: Any,
) -> Tensor:
    """``base + dp(branch(source, **extra))``, the branch on the samples that ``dp`` keeps.

    ``source`` (default: ``base``) is the branch's input: it differs from ``base`` where the
    block's shortcut is not the identity (a downsampling convolution). A drop path other than
    spatialdrop's scaled :class:`DropPath` is applied as it is, on the whole batch.
    """
    src = base if source is None else source
    if dp is None or type(dp) is nn.Identity:
        return base + branch(src, **extra)
    if type(dp) is not DropPath or not dp.scale:
        return base + dp(branch(src, **extra))
    n = base.shape[0]
    if is_compiling() and (
        whole_compiled or (base.device.type == "cpu" and inductor_layout_optimization() and _has_conv(params))
    ):
        # under the compiler, a branch that cannot take an unbacked batch (Swin's window reshapes
        # guard on it being nonzero; torch's crash on a convolution of one on the CPU, see
        # drop_path_residual) runs on the whole batch: DropPath's law and draw, no saving. A
        # branch that couples samples (allow_batch_coupled=True) would take its batch statistics
        # from every sample here and from the kept ones eagerly: refused, as drop_path_residual does
        coupled = [c for item in params if isinstance(item, nn.Module) for c in batch_coupled_modules(item)]
        if coupled:
            fail(
                "skip_dropped_compute",
                "model",
                "blocks whose batch-coupled branches can gather the kept samples under torch.compile "
                "(a convolution branch on the CPU needs torch._inductor.config.layout_optimization = "
                "False; Swin blocks never gather there)",
                Shown(f"a compiled block whose branch holds {', '.join(coupled)}"),
            )
        key = dp.mask_key(n, base.device)
        return base + drop_path(branch(src, **extra), dp.p, dp.training, key=key)
    batched = tuple(k for k, v in extra.items() if _per_sample(v, n))
    key = dp.mask_key(n, base.device)
    if src is base:
        out = drop_path_residual(
            base, branch, dp.p, training=dp.training, key=key, kwargs=extra, batched_args=batched
        )
    else:  # the gathered rows of base are not the branch's input: gather the source's rows with them

        def from_source(_rows: Tensor, rows: Tensor, **kw: Any) -> Tensor:
            return branch(rows, **kw)

        out = drop_path_residual(
            base,
            from_source,
            dp.p,
            training=dp.training,
            key=key,
            args=(src,),
            kwargs=extra,
            batched_args=(0, *batched),
        )
    if out is base and dp.training and torch.is_grad_enabled():  # every sample dropped
        trainable = _params(params)
        if trainable:
            return _ZeroGrads.apply(out, *trainable)
    return out


# --- the skipping forward of each known block ---------------------------------------------------
# Each mirrors the block's own forward (timm 1.0.31, torchvision 0.29) with every
# ``x + drop_path(branch(x))`` computed by _residual.


def _timm_vit_block(
    self: Any, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False
) -> Tensor:
    def attn(r: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(r), attn_mask=attn_mask, is_causal=is_causal))

    x = _residual(self.drop_path1, x, attn, (self.norm1, self.attn, self.ls1), attn_mask=attn_mask)
    return _residual(
        self.drop_path2, x, lambda r: self.ls2(self.mlp(self.norm2(r))), (self.norm2, self.mlp, self.ls2)
    )


def _timm_eva_block(
    self: Any,
    x: Tensor,
    rope: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
) -> Tensor:
    def attn(r: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
        y = self.attn(self.norm1(r), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        return y if self.gamma_1 is None else self.gamma_1 * y

    def mlp(r: Tensor) -> Tensor:
        y = self.mlp(self.norm2(r))
        return y if self.gamma_2 is None else self.gamma_2 * y

    # EvaAttention reshapes with -1 (``reshape(B, N, 3, heads, -1)``), which guards the batch on
    # being nonzero: under the compiler an unbacked kept count cannot answer that, and a step that
    # keeps no sample fails torch's runtime assertion, so compiled, the attention branch runs on
    # the whole batch (DropPath's law, no saving); eagerly, and the MLP branch, on the kept rows
    x = _residual(
        self.drop_path1,
        x,
        attn,
        (self.norm1, self.attn, self.gamma_1),
        whole_compiled=True,
        rope=rope,
        attn_mask=attn_mask,
    )
    return _residual(self.drop_path2, x, mlp, (self.norm2, self.mlp, self.gamma_2))


def _timm_swin_block(self: Any, x: Tensor) -> Tensor:
    # the shifted-window attention mask is one per window position, shared by every sample: the
    # block reads it for however many samples it is given
    b, h, w, c = x.shape
    attn, mlp = (self.norm1, self.attn), (self.norm2, self.mlp)
    x = _residual(self.drop_path1, x, lambda r: self._attn(self.norm1(r)), attn, whole_compiled=True)
    x = x.reshape(b, -1, c)
    x = _residual(self.drop_path2, x, lambda r: self.mlp(self.norm2(r)), mlp, whole_compiled=True)
    return x.reshape(b, h, w, c)


def _timm_convnext_block(self: Any, x: Tensor) -> Tensor:
    def branch(r: Tensor) -> Tensor:
        r = self.conv_dw(r)
        if self.use_conv_mlp:
            r = self.mlp(self.norm(r))
        else:
            r = self.mlp(self.norm(r.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return r if self.gamma is None else r.mul(self.gamma.reshape(1, -1, 1, 1))

    params = (self.conv_dw, self.norm, self.mlp, self.gamma)
    return _residual(self.drop_path, self.shortcut(x), branch, params, source=x)


def _timm_mixer_block(self: Any, x: Tensor) -> Tensor:
    def tokens(r: Tensor) -> Tensor:
        return self.mlp_tokens(self.norm1(r).transpose(1, 2)).transpose(1, 2)

    x = _residual(self.drop_path, x, tokens, (self.norm1, self.mlp_tokens))
    return _residual(
        self.drop_path, x, lambda r: self.mlp_channels(self.norm2(r)), (self.norm2, self.mlp_channels)
    )


def _tv_cnblock(self: Any, input: Tensor) -> Tensor:
    return _residual(
        self.stochastic_depth,
        input,
        lambda r: self.layer_scale * self.block(r),
        (self.block, self.layer_scale),
    )


def _tv_swin_block(self: Any, x: Tensor) -> Tensor:
    x = _residual(
        self.stochastic_depth,
        x,
        lambda r: self.attn(self.norm1(r)),
        (self.norm1, self.attn),
        whole_compiled=True,
    )
    return _residual(
        self.stochastic_depth,
        x,
        lambda r: self.mlp(self.norm2(r)),
        (self.norm2, self.mlp),
        whole_compiled=True,
    )


def _tv_swin_block_v2(self: Any, x: Tensor) -> Tensor:
    x = _residual(
        self.stochastic_depth,
        x,
        lambda r: self.norm1(self.attn(r)),
        (self.norm1, self.attn),
        whole_compiled=True,
    )
    return _residual(
        self.stochastic_depth,
        x,
        lambda r: self.norm2(self.mlp(r)),
        (self.norm2, self.mlp),
        whole_compiled=True,
    )


def _tv_mbconv(self: Any, input: Tensor) -> Tensor:
    if not self.use_res_connect:
        return self.block(input)
    # a closure, not the module: skip_dropped_compute has already refused or warned about its BatchNorm
    return _residual(self.stochastic_depth, input, lambda r: self.block(r), (self.block,))


def _timm_resnet_tail(self: Any, x: Tensor, branch: Callable[[Tensor], Tensor], act: nn.Module) -> Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    return act(_residual(self.drop_path, shortcut, branch, (self,), source=x))


def _timm_basic_block(self: Any, x: Tensor) -> Tensor:
    def branch(r: Tensor) -> Tensor:
        r = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(r)))))
        r = self.bn2(self.conv2(r))
        return r if self.se is None else self.se(r)

    return _timm_resnet_tail(self, x, branch, self.act2)


def _timm_bottleneck(self: Any, x: Tensor) -> Tensor:
    def branch(r: Tensor) -> Tensor:
        r = self.act1(self.bn1(self.conv1(r)))
        r = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(r)))))
        r = self.bn3(self.conv3(r))
        return r if self.se is None else self.se(r)

    return _timm_resnet_tail(self, x, branch, self.act3)


def _timm_s2d(self: Any, r: Tensor) -> Tensor:
    return r if self.conv_s2d is None else self.bn_s2d(self.conv_s2d(r))


def _timm_ds_conv(self: Any, x: Tensor) -> Tensor:
    def branch(r: Tensor) -> Tensor:
        r = self.se(self.aa(self.bn1(self.conv_dw(_timm_s2d(self, r)))))
        return self.bn2(self.conv_pw(r))

    return _timm_skip_or_not(self, x, branch)


def _timm_inverted_residual(self: Any, x: Tensor) -> Tensor:
    def branch(r: Tensor) -> Tensor:
        r = self.bn1(self.conv_pw(_timm_s2d(self, r)))
        r = self.se(self.aa(self.bn2(self.conv_dw(r))))
        return self.bn3(self.conv_pwl(r))

    return _timm_skip_or_not(self, x, branch)


def _timm_edge_residual(self: Any, x: Tensor) -> Tensor:
    def branch(r: Tensor) -> Tensor:
        r = self.se(self.aa(self.bn1(self.conv_exp(r))))
        return self.bn2(self.conv_pwl(r))

    return _timm_skip_or_not(self, x, branch)


def _timm_skip_or_not(self: Any, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
    if not self.has_skip:
        return branch(x)
    return _residual(self.drop_path, x, branch, (self,))


# --- the table of known blocks ------------------------------------------------------------------


class KnownBlock(NamedTuple):
    """A residual block class of timm or torchvision that :func:`skip_dropped_compute` rewrites."""

    module: str
    """The module that defines the class, e.g. ``"timm.models.vision_transformer"``."""
    name: str
    """The class's qualified name."""
    drop_paths: tuple[str, ...]
    """The attributes holding the block's drop paths (a DropPath, ``nn.Identity`` or ``None``)."""
    outside: tuple[str, ...]
    """The children outside every branch (the shortcut), besides the drop paths."""
    attrs: tuple[str, ...]
    """Every other attribute the skipping forward reads (checked when the block is rewritten)."""
    forward: Callable[..., Tensor]
    """The skipping forward."""
    residual: Optional[str] = None
    """The attribute that says whether the block has its residual connection, if it may not."""

    @property
    def label(self) -> str:
        """``"timm vision_transformer.Block"``: the package, the last part of the module, the class."""
        parts = self.module.split(".")
        return f"{parts[0]} {parts[-1]}.{self.name}"


_TIMM = "timm.models."
_TV = "torchvision.models."
_RESNET = ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "aa", "se", "downsample")

BLOCKS: tuple[KnownBlock, ...] = (
    KnownBlock(
        _TIMM + "vision_transformer",
        "Block",
        ("drop_path1", "drop_path2"),
        (),
        ("norm1", "attn", "ls1", "norm2", "mlp", "ls2"),
        _timm_vit_block,
    ),
    KnownBlock(
        _TIMM + "eva",
        "EvaBlock",
        ("drop_path1", "drop_path2"),
        (),
        ("norm1", "attn", "gamma_1", "norm2", "mlp", "gamma_2"),
        _timm_eva_block,
    ),
    KnownBlock(
        _TIMM + "swin_transformer",
        "SwinTransformerBlock",
        ("drop_path1", "drop_path2"),
        (),
        ("norm1", "attn", "_attn", "norm2", "mlp"),
        _timm_swin_block,
    ),
    KnownBlock(
        _TIMM + "convnext",
        "ConvNeXtBlock",
        ("drop_path",),
        ("shortcut",),
        ("conv_dw", "use_conv_mlp", "norm", "mlp", "gamma", "shortcut"),
        _timm_convnext_block,
    ),
    KnownBlock(
        _TIMM + "mlp_mixer",
        "MixerBlock",
        ("drop_path",),
        (),
        ("norm1", "mlp_tokens", "norm2", "mlp_channels"),
        _timm_mixer_block,
    ),
    KnownBlock(
        _TIMM + "resnet",
        "BasicBlock",
        ("drop_path",),
        ("downsample", "act2"),
        (*_RESNET, "act2"),
        _timm_basic_block,
    ),
    KnownBlock(
        _TIMM + "resnet",
        "Bottleneck",
        ("drop_path",),
        ("downsample", "act3"),
        (*_RESNET, "act2", "conv3", "bn3", "act3"),
        _timm_bottleneck,
    ),
    KnownBlock(
        _TIMM + "_efficientnet_blocks",
        "DepthwiseSeparableConv",
        ("drop_path",),
        (),
        ("conv_s2d", "bn_s2d", "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2", "has_skip"),
        _timm_ds_conv,
        "has_skip",
    ),
    KnownBlock(
        _TIMM + "_efficientnet_blocks",
        "InvertedResidual",
        ("drop_path",),
        (),
        ("conv_s2d", "bn_s2d", "conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3", "has_skip"),
        _timm_inverted_residual,
        "has_skip",
    ),
    KnownBlock(
        _TIMM + "_efficientnet_blocks",
        "EdgeResidual",
        ("drop_path",),
        (),
        ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2", "has_skip"),
        _timm_edge_residual,
        "has_skip",
    ),
    KnownBlock(_TV + "convnext", "CNBlock", ("stochastic_depth",), (), ("block", "layer_scale"), _tv_cnblock),
    KnownBlock(
        _TV + "swin_transformer",
        "SwinTransformerBlock",
        ("stochastic_depth",),
        (),
        ("norm1", "attn", "norm2", "mlp"),
        _tv_swin_block,
    ),
    KnownBlock(
        _TV + "swin_transformer",
        "SwinTransformerBlockV2",
        ("stochastic_depth",),
        (),
        ("norm1", "attn", "norm2", "mlp"),
        _tv_swin_block_v2,
    ),
    *(
        KnownBlock(
            _TV + "efficientnet", name, ("stochastic_depth",), (), ("block",), _tv_mbconv, "use_res_connect"
        )
        for name in ("MBConv", "FusedMBConv")
    ),
)

_BY_CLASS = {(b.module, b.name): b for b in BLOCKS}


def known_block(cls: type) -> KnownBlock | None:
    """The entry of :data:`BLOCKS` whose class ``cls`` is exactly, else ``None``."""
    return _BY_CLASS.get((cls.__module__, cls.__qualname__))


# --- the rewritten classes ----------------------------------------------------------------------

_SKIPPING: dict[type, type] = {}


def _rebuild(base: type) -> nn.Module:
    """Unpickling: an empty instance of the skipping class of ``base`` (the state follows)."""
    cls: Any = skipping_class(base)
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: Any) -> Any:
    """Pickle as the original class's skipping subclass, rebuilt from the original (a module path)."""
    reduced = nn.Module.__reduce_ex__(self, protocol)
    return (_rebuild, (type(self)._skip_base,), *reduced[2:])  # type: ignore[attr-defined]


def skipping_class(base: type) -> type:
    """The subclass of the known block class ``base`` whose ``forward`` skips the dropped samples.

    One per class, named ``Skip`` + the class's name; ``isinstance`` with ``base`` still holds.
    """
    cls = _SKIPPING.get(base)
    if cls is None:
        entry = known_block(base)
        if entry is None:
            raise TypeError(f"skipping_class: {base.__qualname__} is not a block in spatialdrop's table")
        name = "Skip" + base.__name__
        cls = type(
            name,
            (base,),
            {
                "forward": entry.forward,
                "_skip_base": base,
                "__reduce_ex__": _reduce_ex,
                "__module__": __name__,
                "__doc__": f"{base.__qualname__} whose drop paths skip the dropped samples' compute "
                "(see spatialdrop.skip_dropped_compute).",
            },
        )
        _SKIPPING[base] = cls
    return cls


def is_skipping(m: nn.Module) -> bool:
    """Whether ``m`` is a block rewritten by :func:`skip_dropped_compute`."""
    return any(c in _SKIPPING.values() for c in type(m).__mro__)


# --- finding what to do -------------------------------------------------------------------------

_DROP_PATH_PEERS = ("timm DropPath", "torchvision StochasticDepth")


def _coupling(m: nn.Module) -> str | None:
    """Why a layer couples the samples of a batch (its output or state depends on the others)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batch statistics"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
        return "running statistics averaged over the batch"
    peer = peer_dropout(m)
    if peer is not None and peer.name.startswith("DropBlock"):
        return "kept values scaled by the batch's kept fraction"
    return None


def _drop_path_state(m: Optional[nn.Module]) -> str | None:
    """``None`` for a drop path that a skipping block runs; else why it stays a plain drop path."""
    if m is None or type(m) is nn.Identity:
        return "no drop path"
    if type(m) is DropPath:
        return None if m.scale else "unscaled DropPath (scale=False): drop_path_residual always scales"
    peer = _peer_of_class(type(m))
    if peer is None or peer.label not in _DROP_PATH_PEERS:
        return f"its drop path is a {type(m).__qualname__}"
    if peer.name == "StochasticDepth" and getattr(m, "mode", None) != "row":
        return f"StochasticDepth(mode={getattr(m, 'mode', None)!r}) drops the whole batch at once"
    if peer.name == "DropPath" and not getattr(m, "scale_by_keep", True):
        return "unscaled DropPath (scale_by_keep=False): drop_path_residual always scales"
    return None


class _Plan(NamedTuple):
    name: str
    block: nn.Module
    entry: KnownBlock
    skipped: tuple[str, ...]  # the drop paths whose branches skip
    coupled: tuple[str, ...]  # "bn1 (BatchNorm2d: batch statistics)"


def _branch_layers(block: nn.Module, entry: KnownBlock) -> Iterable[tuple[str, nn.Module]]:
    skip = set(entry.drop_paths) | set(entry.outside)
    for child_name, child in block.named_children():
        if child_name in skip:
            continue
        yield from child.named_modules(prefix=child_name)


def skip_dropped_compute(
    model: nn.Module,
    *,
    allow_batch_coupled: bool = False,
    exclude: Exclude = (),
    verbose: bool = False,
) -> nn.Module:
    r"""Make the residual blocks of a timm or torchvision model skip the dropped samples' compute.

    Stochastic depth drops a residual branch per sample: ``x + drop_path(branch(x), p)``. timm's
    ``DropPath`` and torchvision's ``StochasticDepth`` compute the branch for every sample and
    then zero the dropped ones. After this call each rewritten block gathers the kept samples,
    runs the branch on them alone and adds the result back
    (:func:`~spatialdrop.functional.drop_path_residual`): at drop rate ``p`` the branch's forward
    and backward work and the activations it keeps shrink by about a fraction ``p``.

    One call, in place: the model's drop paths become spatialdrop's :class:`DropPath` (as by
    :func:`convert_dropout`), and each block of a known class (matched exactly) gets a
    ``forward`` that runs its branches that way:

    - timm: ``vision_transformer.Block`` (ViT, DeiT), ``eva.EvaBlock``,
      ``swin_transformer.SwinTransformerBlock``, ``convnext.ConvNeXtBlock``,
      ``mlp_mixer.MixerBlock``;
    - torchvision: ``convnext.CNBlock``, ``swin_transformer.SwinTransformerBlock`` and
      ``SwinTransformerBlockV2``;
    - with ``allow_batch_coupled=True`` only (below): timm ``resnet.BasicBlock`` and
      ``Bottleneck``, ``_efficientnet_blocks.DepthwiseSeparableConv``, ``InvertedResidual``,
      ``EdgeResidual``; torchvision ``efficientnet.MBConv`` and ``FusedMBConv``.

    The meaning is DropPath's: each sample's branch is dropped with probability ``p`` or kept and
    scaled by ``1 / (1 - p)``. With :func:`keyed_masks` the same samples are dropped as by the
    converted model that computes every sample (the same output and gradients up to float
    rounding); eval mode gives the same bits; the ``state_dict`` keys, the submodules and the
    hooks registered on them stay (hooks on the drop path layers themselves no longer run: the
    block reads their ``p``, training mode and key instead of calling them). :class:`DropSchedule`
    and :func:`mc_predict` act on the drop path layers as before. Per-sample extra inputs of a
    branch travel with the kept rows (a 4-D attention mask or rope table with one row per sample,
    as timm's patch dropout gives); shared ones (a window mask, a rope table for every sample)
    are passed as they are. When a branch drops every sample it is not run and its parameters
    get zero gradients, as they would on the whole batch (so every rank of DDP or FSDP joins the
    same collectives). Each block's class becomes a subclass named ``Skip`` + its name.

    Blocks not in the list keep a plain :class:`DropPath` that computes every sample, and so do
    known blocks without a drop path (timm builds ``nn.Identity`` where the rate is 0), with an
    unscaled one (``scale_by_keep=False``) or without a residual connection; ``verbose`` lists
    them with the reason.

    A branch with a layer that couples the samples of a batch (BatchNorm in training mode, a
    tracking InstanceNorm, the batch-scaled DropBlock of timm or torchvision) would compute
    another function on the kept samples alone: its batch statistics would come from the kept
    samples only. Such blocks are refused (``ValueError``, nothing changed) unless
    ``allow_batch_coupled=True``, which rewrites them and warns.

    Call it before ``torch.compile``, ``DistributedDataParallel`` or ``fully_shard`` wrap the
    model. A second call changes nothing.

    Args:
        model: the model to edit (or a single block).
        allow_batch_coupled: rewrite blocks whose branch couples samples, with a warning.
            Default: False (refuse them).
        exclude: modules to leave as they are (and everything inside them): names as in
            ``model.named_modules()`` and module types, one or an iterable. Default: none.
        verbose: print a table: each known block and drop path layer, and what was done or why
            not. Default: False.

    Returns:
        ``model``, edited in place.

    Raises:
        ValueError: when the model has neither a drop path nor a rewritten block, or a block
            whose branch couples samples (unless ``allow_batch_coupled``); nothing is changed.

    Warns:
        UserWarning: with ``allow_batch_coupled=True``, naming the layers whose batch statistics
            now come from the kept samples only.

    Examples:
        With timm (the guide "The compute-skipping conversion" has the measured speed-ups):

        ```python
        model = timm.create_model("vit_small_patch16_224", drop_path_rate=0.4)
        skip_dropped_compute(model, verbose=True)  # every Block skips its dropped samples
        ```

        A block of your own is not rewritten (wrap its branches in :class:`ResidualDropPath`):

        >>> import torch
        >>> from torch import nn
        >>> from spatialdrop import DropPath, skip_dropped_compute
        >>> class MyBlock(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.fc, self.drop_path = nn.Linear(8, 8), DropPath(0.2)
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return x + self.drop_path(self.fc(x))
        >>> skip_dropped_compute(nn.Sequential(MyBlock(), MyBlock()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        ValueError: skip_dropped_compute: model must be a model with a known residual block ..., got one
        whose drop paths are all in blocks it does not know (MyBlock x2)
    """
    fn = "skip_dropped_compute"
    if not isinstance(model, nn.Module):
        fail(fn, "model", "an nn.Module", Shown(type(model).__name__), kind=TypeError)
    check_bool(fn, "allow_batch_coupled", allow_batch_coupled)
    check_bool(fn, "verbose", verbose)
    names, types = _exclusions(fn, model, exclude)

    def excluded(name: str, m: nn.Module) -> bool:
        return isinstance(m, types) or any(name == n or name.startswith(n + ".") or not n for n in names)

    plans: list[_Plan] = []
    left: list[tuple[str, str, str]] = []  # (module, what, why)
    done: list[str] = []  # blocks rewritten by an earlier call
    in_blocks: set[int] = set()  # the drop paths of rewritten blocks
    for name, m in model.named_modules():
        if excluded(name, m):
            continue
        entry = known_block(type(m))
        if entry is None:
            if is_skipping(m):
                done.append(name)
                in_blocks.update(id(getattr(m, a)) for a in known_block(type(m)._skip_base).drop_paths)  # type: ignore[union-attr]
            continue
        missing = [a for a in entry.attrs + entry.drop_paths if not hasattr(m, a)]
        if missing:
            left.append((name, entry.label, f"left: no attribute {missing[0]!r} (another version?)"))
            continue
        if entry.residual is not None and not getattr(m, entry.residual):
            left.append((name, entry.label, f"left: no residual connection ({entry.residual}=False)"))
            continue
        dps = {a: getattr(m, a) for a in entry.drop_paths}
        states = {a: _drop_path_state(dp) for a, dp in dps.items()}
        skipped = tuple(a for a, s in states.items() if s is None)
        if not skipped:
            left.append(
                (name, entry.label, "left: " + "; ".join(dict.fromkeys(s for s in states.values() if s)))
            )
            continue
        if any(excluded(f"{name}.{a}" if name else a, dps[a]) for a in skipped):
            left.append((name, entry.label, "left: its drop path is excluded"))
            continue
        inner = [
            f"{n} ({type(x).__name__})"
            for n, x in _branch_layers(m, entry)
            if isinstance(x, StructuredDropout)
        ]
        if inner:
            left.append((name, entry.label, f"left: its branch holds spatialdrop's {inner[0]}"))
            continue
        coupled = tuple(
            f"{n} ({type(x).__name__}: {why})" for n, x in _branch_layers(m, entry) if (why := _coupling(x))
        )
        plans.append(_Plan(name, m, entry, skipped, coupled))

    refused = [p for p in plans if p.coupled]
    if refused and not allow_batch_coupled:
        p = refused[0]
        where = p.name or "the model itself"
        more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
        fail(
            fn,
            "model",
            "a model whose blocks' branches treat every sample on its own (or allow_batch_coupled=True: "
            "a branch run on the kept samples only would take its batch statistics from them alone)",
            Shown(f"{where} ({p.entry.label}) with {', '.join(p.coupled)}{more}"),
        )

    # the model's drop paths become spatialdrop's (those of other blocks too: they stay plain)
    peers: dict[type, None] = {}
    skip_names: list[str] = list(names)
    for name, m in model.named_modules():
        peer = _peer_of_class(type(m))
        if peer is None or peer.label not in _DROP_PATH_PEERS or excluded(name, m):
            continue
        if peer.name == "StochasticDepth" and getattr(m, "mode", None) != "row":
            skip_names.append(name)
            left.append((name, peer.label, "left: mode='batch' drops the whole batch at once"))
            continue
        peers[type(m)] = None
    if not plans and not done:
        known = ", ".join(b.label for b in BLOCKS)
        fail(
            fn,
            "model",
            f"a model with a known residual block that has a drop path ({known})",
            _nothing(model, left),
        )
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.entry.label] = counts.get(p.entry.label, 0) + 1
    if peers:
        convert_dropout(model, include=tuple(peers), exclude=[*skip_names, *types])
    for p in plans:
        p.block.__class__ = skipping_class(type(p.block))
        in_blocks.update(id(getattr(p.block, a)) for a in p.skipped)
    if refused:
        layers = "; ".join(f"{p.name or 'the model'}: {', '.join(p.coupled)}" for p in refused[:3])
        more = f" (and {len(refused) - 3} more blocks)" if len(refused) > 3 else ""
        warnings.warn(
            f"{fn}: allow_batch_coupled=True: {len(refused)} rewritten blocks have branch layers that "
            f"couple samples, which now see the kept samples only (BatchNorm: batch statistics and "
            f"running averages from the kept samples alone): {layers}{more}",
            UserWarning,
            stacklevel=2,
        )
    if verbose:
        _print(model, plans, left, done, in_blocks, counts)
    return model


def _nothing(model: nn.Module, left: list[tuple[str, str, str]]) -> Shown:
    """What the model holds instead of a block to rewrite, for the error message."""
    if left:
        name, label, why = left[0]
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        where = name or "the model"
        return Shown(f"one whose known blocks are all left as they are ({where}, {label}: {why[6:]}{more})")
    parents: dict[str, int] = {}
    for name, m in model.named_modules():
        peer = _peer_of_class(type(m))
        if type(m) is DropPath or (peer is not None and peer.label in _DROP_PATH_PEERS):
            parent = model.get_submodule(name.rpartition(".")[0]) if name else m
            key = type(parent).__name__
            parents[key] = parents.get(key, 0) + 1
    if not parents:
        return Shown("one without a drop path")
    where = ", ".join(f"{k} x{n}" for k, n in parents.items())
    return Shown(f"one whose drop paths are all in blocks it does not know ({where})")


def _print(
    model: nn.Module,
    plans: list[_Plan],
    left: list[tuple[str, str, str]],
    done: list[str],
    in_blocks: set[int],
    counts: dict[str, int],
) -> None:
    rows = [
        (
            p.name,
            p.entry.label,
            "skips: " + ", ".join(f"{a} (p={getattr(p.block, a).p:.4g})" for a in p.skipped),
        )
        for p in plans
    ]
    rows += left
    rows += [(n, type(model.get_submodule(n)).__name__, "skips already") for n in done]
    listed = tuple(r[0] + "." for r in left)
    plain = [
        (n, "DropPath", "plain: in a block it does not know")
        for n, m in model.named_modules()
        if type(m) is DropPath and id(m) not in in_blocks and not n.startswith(listed)
    ]
    rows += plain
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    rows.sort(key=lambda r: order.get(r[0], -1))
    header = ("module", "block", "done")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(2)]
    for r in [header, *rows]:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}".rstrip())
    kinds = ", ".join(f"{label} x{n}" for label, n in counts.items())
    print(
        f"skips the dropped samples' compute in {len(plans)} block{'s' if len(plans) != 1 else ''}"
        f"{': ' + kinds if kinds else ''}; {len(plain)} plain DropPath layer{'s' if len(plain) != 1 else ''}"
    )
