"""The cases of ``spatialdrop bench``: which implementations are compared on which inputs.

A :class:`Case` is one input shape and the implementations timed side by side on it; an
:class:`Impl` is one callable ``input -> output`` (or a note saying why it is missing, e.g. a peer
that is not installed). The library is used only through its public API.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import spatialdrop
from spatialdrop.functional import (
    alpha_spatial_dropout,
    drop_block,
    drop_path,
    drop_path_residual,
    gaussian_spatial_dropout,
    spatial_dropout,
)

from ._optional import peer
from ._options import SUITES

__all__ = [
    "CALIBRATION",
    "REFERENCE",
    "SUITES",
    "Case",
    "Impl",
    "calibration_cases",
    "cases_for",
    "dropblock_cases",
    "family_cases",
    "keyed_cases",
    "residual_cases",
    "spatial_cases",
]

REFERENCE = "x * 2.0"
Fn = Callable[[Tensor], Tensor]


@dataclass
class Impl:
    """One implementation in a case: a callable ``input -> output``, or a note saying why not.

    ``eager`` names the call of the eager implementation that a compiled one is compared with.
    ``params``: more tensors whose gradients the forward + backward timing computes with the
    input's (a branch's weights, as in training). ``baseline``: the row the others' speed-up is
    measured against (``vs_baseline``).
    """

    library: str
    call: str
    fn: Fn | None
    note: str = ""
    drops: bool = True
    shared_channels: bool = False
    grad: bool = True
    eager: str = ""
    params: tuple[Tensor, ...] = ()
    baseline: bool = False


@dataclass
class Case:
    """One input shape and the implementations compared on it.

    ``timed`` cases get the ``x * 2.0`` reference and every measurement; the others (calibration)
    only the drop rates, plus the float16 check when ``fp16_check`` is set.
    """

    suite: str
    name: str
    shape: tuple[int, ...]
    spatial_axes: tuple[int, ...]
    impls: list[Impl]
    p: float
    timed: bool = True
    fp16_check: bool = False
    make_input: Callable[[tuple[int, ...]], Tensor] = field(default=lambda shape: torch.randn(shape))


def _missing(library: str, call: str, reason: str) -> Impl:
    """A peer's row without numbers: ``reason`` is "<library> not installed" or "... unavailable: ..."."""
    return Impl(library, call, None, note=reason)


def reference() -> Impl:
    """The bare ``x * 2.0`` that every timed case is measured against."""
    return Impl("torch", REFERENCE, lambda x: x * 2.0, drops=False)


def compiled(impl: Impl) -> Impl:
    """``impl`` under ``torch.compile(fullgraph=True)``, compared with ``impl`` in the same run.

    Static shapes (``dynamic=False``): the drop-rate draws on other shapes compile their own graph.
    """
    assert impl.fn is not None
    fn = torch.compile(impl.fn, fullgraph=True, dynamic=False)
    return Impl(
        impl.library,
        f"compile({impl.call})",
        fn,
        drops=impl.drops,
        shared_channels=impl.shared_channels,
        eager=impl.call,
    )


def _with_compiled(impls: list[Impl], compile_ours: bool) -> list[Impl]:
    """``impls`` followed by compiled twins of the first one (ours), when asked for."""
    return [*impls, compiled(impls[0])] if compile_ours else impls


def spatial_cases(quick: bool, p: float, compile_ours: bool = False) -> list[Case]:
    """Channel dropout against torch's ``dropout1d/2d/3d`` and the permute habit."""

    def ours(channel_dim: int = 1) -> Impl:
        call = "spatial_dropout(x, p" + ("" if channel_dim == 1 else f", channel_dim={channel_dim}") + ")"
        return Impl("spatialdrop", call, lambda x: spatial_dropout(x, p, channel_dim=channel_dim))

    def torch_fn(rank: int) -> Impl:
        fn = {1: F.dropout1d, 2: F.dropout2d, 3: F.dropout3d}[rank]
        return Impl("torch", f"F.dropout{rank}d(x, p)", lambda x: fn(x, p))

    habit = Impl(
        "torch",
        "F.dropout1d(x.permute(0, 2, 1), p).permute(0, 2, 1)",
        lambda x: F.dropout1d(x.permute(0, 2, 1), p).permute(0, 2, 1),
    )
    if quick:
        shapes = [(8, 64, 28, 28), (16, 128, 14, 14), (2, 16, 16, 16, 16), (8, 256, 128)]
    else:
        shapes = [(32, 64, 56, 56), (64, 256, 14, 14), (8, 32, 32, 32, 32), (32, 512, 256)]
    return [
        Case(
            "spatial", "2-D maps", shapes[0], (2, 3), _with_compiled([ours(), torch_fn(2)], compile_ours), p
        ),
        Case("spatial", "2-D maps, many channels", shapes[1], (2, 3), [ours(), torch_fn(2)], p),
        Case("spatial", "3-D volumes", shapes[2], (2, 3, 4), [ours(), torch_fn(3)], p),
        Case("spatial", "channels-last sequences (N, L, C)", shapes[3], (1,), [ours(-1), habit], p),
    ]


def _torchvision(rank: int, p: float, block: int) -> Impl:
    call = f"torchvision.ops.drop_block{rank}d(x, p, {block})"
    fn = peer("torchvision", f"torchvision.ops.drop_block{rank}d")
    if isinstance(fn, str):
        return _missing("torchvision", call, fn)
    return Impl("torchvision", call, lambda x: fn(x, p, block))


def _timm(p: float, block: int, couple: bool) -> Impl:
    call = f"timm drop_block_2d(x, p, {block}, couple_channels={couple})"
    fn = peer("timm", "timm.layers.drop_block_2d", "timm.models.layers.drop_block_2d")
    if isinstance(fn, str):
        return _missing("timm", call, fn)
    return Impl("timm", call, lambda x: fn(x, p, block, couple_channels=couple), shared_channels=couple)


def _package(rank: int, p: float, block: int) -> Impl:
    call = f"dropblock.DropBlock{rank}D(p, {block})"
    cls = peer("dropblock", f"dropblock.DropBlock{rank}D")
    if isinstance(cls, str):
        return _missing("dropblock", call, cls)
    return Impl("dropblock", call, cls(p, block), shared_channels=True)


def _ours_block(p: float, block: int, shared: bool = False, seeding: str = "uniform") -> Impl:
    options = (", shared_channels=True" if shared else "") + (
        f", seeding={seeding!r}" if seeding != "uniform" else ""
    )
    call = f"drop_block(x, p, {block}{options})"
    return Impl(
        "spatialdrop",
        call,
        lambda x: drop_block(x, p, block, shared_channels=shared, seeding=seeding),
        shared_channels=shared,
    )


def dropblock_cases(quick: bool, p: float, compile_ours: bool = False) -> list[Case]:
    """DropBlock speed against torchvision, timm and the ``dropblock`` package (and compiled)."""
    two = (8, 64, 28, 28) if quick else (32, 256, 28, 28)
    three = (2, 16, 16, 16, 16) if quick else (8, 32, 32, 32, 32)
    one = (8, 64, 784) if quick else (32, 256, 784)

    def case(name: str, shape: tuple[int, ...], impls: list[Impl], compile_it: bool = True) -> Case:
        axes = tuple(range(2, len(shape)))
        return Case("dropblock", name, shape, axes, _with_compiled(impls, compile_ours and compile_it), p)

    return [
        case(
            "2-D, block 7, a mask per channel",
            two,
            [_ours_block(p, 7), _torchvision(2, p, 7), _timm(p, 7, couple=False)],
        ),
        case(
            "2-D, block 7, one mask shared by the channels",
            two,
            [_ours_block(p, 7, shared=True), _timm(p, 7, couple=True), _package(2, p, 7)],
        ),
        case("3-D, block 5, a mask per channel", three, [_ours_block(p, 5), _torchvision(3, p, 5)]),
        case(
            "3-D, block 5, one mask shared by the channels",
            three,
            [_ours_block(p, 5, shared=True), _package(3, p, 5)],
        ),
        case(
            "1-D, block 7 (no peer has a DropBlock1d)",
            one,
            [_ours_block(p, 7), _ours_block(p, 7, shared=True)],
            compile_it=False,
        ),
    ]


def family_cases(quick: bool, p: float) -> list[Case]:
    """DropPath, Gaussian and alpha spatial dropout, filter dropout, and their peers."""
    from torch import nn

    maps = (8, 64, 28, 28) if quick else (32, 64, 56, 56)
    path = [Impl("spatialdrop", "drop_path(x, p)", lambda x: drop_path(x, p), shared_channels=True)]
    timm_call = "timm drop_path(x, p, True)"
    timm_drop_path = peer("timm", "timm.layers.drop_path", "timm.models.layers.drop_path")
    if isinstance(timm_drop_path, str):
        path.append(_missing("timm", timm_call, timm_drop_path))
    else:
        path.append(Impl("timm", timm_call, lambda x: timm_drop_path(x, p, True), shared_channels=True))
    tv_call = 'torchvision.ops.stochastic_depth(x, p, "row")'
    stochastic_depth = peer("torchvision", "torchvision.ops.stochastic_depth")
    if isinstance(stochastic_depth, str):
        path.append(_missing("torchvision", tv_call, stochastic_depth))
    else:
        path.append(
            Impl("torchvision", tv_call, lambda x: stochastic_depth(x, p, "row"), shared_channels=True)
        )
    gaussian = Impl(
        "spatialdrop", "gaussian_spatial_dropout(x, p)", lambda x: gaussian_spatial_dropout(x, p), drops=False
    )
    alpha = [
        Impl(
            "spatialdrop", "alpha_spatial_dropout(x, p)", lambda x: alpha_spatial_dropout(x, p), drops=False
        ),
        Impl(
            "torch",
            "F.feature_alpha_dropout(x, p, True)",
            lambda x: F.feature_alpha_dropout(x, p, True),
            drops=False,
        ),
    ]
    conv_in = (8, 64, 14, 14) if quick else (32, 64, 28, 28)
    torch.manual_seed(0)
    plain = nn.Conv2d(64, 64, 3, padding=1)
    dropped = spatialdrop.filter_dropout(nn.Conv2d(64, 64, 3, padding=1), p)
    convs = [
        Impl("torch", "nn.Conv2d(64, 64, 3)(x)", plain, drops=False),
        Impl("spatialdrop", "filter_dropout(nn.Conv2d(64, 64, 3), p)(x)", dropped, drops=False),
    ]
    return [
        Case("family", "DropPath (a draw per sample)", maps, (2, 3), path, p),
        Case("family", "Gaussian spatial dropout", maps, (2, 3), [gaussian], p),
        Case("family", "alpha spatial dropout", maps, (2, 3), alpha, p),
        Case("family", "filter dropout on a 3x3 conv", conv_in, (2, 3), convs, p),
    ]


class _Attention(torch.nn.Module):
    """timm's ViT attention written in torch (fused attention), for when timm is not installed."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class _Block(torch.nn.Module):
    """timm's pre-norm ViT ``Block`` (no layer scale, no drop path) written in torch."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        nn = torch.nn
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _vit_block(dim: int, heads: int) -> tuple[torch.nn.Module, str]:
    """A ViT block from timm (``Block(dim, heads, qkv_bias=True)``), or the torch twin without timm."""
    block = peer("timm", "timm.models.vision_transformer.Block")  # any import failure: the twin
    if isinstance(block, str):
        return _Block(dim, heads), "torch"
    return block(dim, heads, qkv_bias=True), "timm"


def _bottleneck(channels: int, width: int) -> torch.nn.Module:
    """The residual branch of a ResNet-50 bottleneck (1x1, 3x3, 1x1 convs with BatchNorm, no skip)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(channels, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
    )


RESIDUAL_RATES = (0.1, 0.3)


def _skipping(branch: torch.nn.Module, p: float) -> Fn:
    if not spatialdrop.batch_coupled_modules(branch):
        return lambda x: drop_path_residual(x, branch, p)

    def run(x: Tensor) -> Tensor:  # the bottleneck's BatchNorms: on the kept samples, as timed before
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "drop_path_residual: the branch has batch-coupled modules")
            return drop_path_residual(x, branch, p, allow_batch_coupled=True)

    return run


def _then(branch: torch.nn.Module, drop: Callable[[Tensor], Tensor]) -> Fn:
    return lambda x: x + drop(branch(x))


def residual_cases(quick: bool) -> list[Case]:
    """DropPath that skips the dropped samples' branch against ``x + DropPath(p)(branch(x))``.

    Branches: a ViT-S block's MLP (``norm2`` then ``mlp``), a whole ViT-S block, and a ResNet-50
    bottleneck's residual branch; at p = 0.1 and 0.3 (fixed: the speed-up should follow
    ``1 / (1 - p)``). Forward + backward compute the gradients of the branch's weights too, as in
    training. The baseline is timm's ``DropPath`` where timm is installed, else our
    ``drop_path`` (the same random numbers and bits as timm's).
    """
    found = peer("timm", "timm.layers.DropPath")  # any import failure: a one-line reason
    timm_missing = found if isinstance(found, str) else None
    TimmDropPath = found
    dim, heads, tokens, n = (96, 2, 50, 4) if quick else (384, 6, 197, 32)
    torch.manual_seed(0)
    block, source = _vit_block(dim, heads)
    norm2, mlp = block.get_submodule("norm2"), block.get_submodule("mlp")
    branches = [
        (f"a ViT-S block's MLP ({source}: norm2, mlp)", torch.nn.Sequential(norm2, mlp), (n, tokens, dim)),
        (f"a whole ViT-S block ({source} Block) as the branch", block, (n, tokens, dim)),
        (
            "a ResNet-50 bottleneck (1x1, 3x3, 1x1 convs, BatchNorm)",
            _bottleneck(64, 16) if quick else _bottleneck(256, 64),
            (2, 64, 14, 14) if quick else (n, 256, 56, 56),
        ),
    ]
    cases = []
    for name, branch, shape in branches:
        branch.train()
        params = tuple(branch.parameters())
        for p in RESIDUAL_RATES:
            ours = Impl(
                "spatialdrop",
                "drop_path_residual(x, branch, p)",
                _skipping(branch, p),
                drops=False,
                params=params,
            )
            impls = [ours]
            if timm_missing is None:
                base = _then(branch, TimmDropPath(p))
                impls.append(
                    Impl(
                        "timm",
                        "x + timm DropPath(p)(branch(x))",
                        base,
                        drops=False,
                        params=params,
                        baseline=True,
                    )
                )
            else:
                call = "x + drop_path(branch(x), p)"
                base = _then(branch, functools.partial(drop_path, p=p))
                impls.append(Impl("spatialdrop", call, base, drops=False, params=params, baseline=True))
                impls.append(_missing("timm", "x + timm DropPath(p)(branch(x))", timm_missing))
            cases.append(Case("family", f"DropPath residual, {name}", shape, (), impls, p))
    return cases


def keyed_cases(quick: bool, p: float) -> list[Case]:
    """Keyed spatial dropout (masks from a counter-based key) against the unkeyed one."""

    def keyed(key: spatialdrop.MaskKey) -> Fn:
        return lambda x: spatial_dropout(x, p, key=key)

    def draws(key: spatialdrop.MaskKey, channels: int) -> Fn:
        return lambda x: spatialdrop.keyed_uniform(key, channels)

    cases = []
    shapes = [(8, 64, 28, 28), (16, 256, 7, 7)] if quick else [(32, 64, 56, 56), (64, 256, 14, 14)]
    for shape in shapes:
        n, c = shape[0], shape[1]
        key = spatialdrop.MaskKey(seed=1234, step=7, layer=42, sample_ids=torch.arange(n))
        impls = [
            Impl("spatialdrop", "spatial_dropout(x, p)", lambda x: spatial_dropout(x, p)),
            Impl("spatialdrop", "spatial_dropout(x, p, key=key)", keyed(key)),
            Impl("torch", "F.dropout2d(x, p)", lambda x: F.dropout2d(x, p)),
            Impl(
                "spatialdrop",
                f"keyed_uniform(key, {c}) (the draws alone)",
                draws(key, c),
                drops=False,
                grad=False,
            ),
        ]
        cases.append(Case("keyed", "keyed vs unkeyed channel masks", shape, (2, 3), impls, p))
    return cases


CALIBRATION = [(28, 7, 0.1), (14, 5, 0.3), (7, 3, 0.3), (56, 7, 0.3), (7, 7, 0.1)]


def calibration_cases(quick: bool) -> list[Case]:
    """Drop rates of every 2-D DropBlock on independent single-channel maps (``p`` fixed per case)."""
    maps = 1024 if quick else 8192
    cases = []
    for i, (size, block, p) in enumerate(CALIBRATION):
        impls = [
            _ours_block(p, block),
            _ours_block(p, block, seeding="valid"),
            _torchvision(2, p, block),
            _timm(p, block, couple=True),
            _timm(p, block, couple=False),
            _package(2, p, block),
        ]
        name = f"{size}x{size} map, block {block}, p {p}"
        shape = (maps, 1, size, size)
        cases.append(Case("dropblock", name, shape, (2, 3), impls, p, timed=False, fp16_check=i == 0))
    return cases


def cases_for(suite: str, quick: bool, p: float, compile_ours: bool = True) -> list[Case]:
    """The cases of ``suite`` (one of :data:`SUITES` or ``all``).

    With ``compile_ours``, the 2-D spatial dropout case and the 2-D and 3-D DropBlock cases also
    time our layer under ``torch.compile(fullgraph=True)`` beside the eager one. The family suite's
    DropPath residual cases run at their own rates (:data:`RESIDUAL_RATES`), not at ``p``.
    """
    cases: list[Case] = []
    if suite in ("spatial", "all"):
        cases += spatial_cases(quick, p, compile_ours)
    if suite in ("dropblock", "all"):
        cases += dropblock_cases(quick, p, compile_ours) + calibration_cases(quick)
    if suite in ("family", "all"):
        cases += family_cases(quick, p) + residual_cases(quick)
    if suite in ("keyed", "all"):
        cases += keyed_cases(quick, p)
    return cases
