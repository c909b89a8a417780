"""skip_dropped_compute: known residual blocks run each drop-path branch on the kept samples only.

Two parts, as in test_convert: stand-ins for timm's and torchvision's blocks (classes with the
peers' module paths, names and attributes, their forward copied) in the default run, and the real
timm and torchvision models, marked ``models``, in the second environment. Every check compares
the rewritten model with the converted model that computes every sample (``convert_dropout``):
keyed masks make both drop the same samples.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spatialdrop as sd
from distributed import run_world
from spatialdrop import (
    DropPath,
    DropSchedule,
    convert_dropout,
    keyed_masks,
    mask_context,
    skip_dropped_compute,
)
from spatialdrop.functional import drop_path
from spatialdrop.skip_compute import BLOCKS, is_skipping

# --- stand-ins ------------------------------------------------------------------------------------


def _standin(
    module: str, name: str, init: Callable[..., None], forward: Callable[..., Any]
) -> type[nn.Module]:
    def __init__(self: nn.Module, *args: Any, **kw: Any) -> None:
        nn.Module.__init__(self)
        init(self, *args, **kw)

    return type(
        name,
        (nn.Module,),
        {"__module__": module, "__qualname__": name, "__init__": __init__, "forward": forward},
    )


def _timm_drop_path_forward(self: nn.Module, x: Tensor) -> Tensor:  # timm.layers.drop.drop_path
    if self.drop_prob == 0.0 or not self.training:
        return x
    keep = 1 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep) if self.scale_by_keep else x * mask


def _timm_drop_path_init(self: Any, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
    self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep


TimmDropPath = _standin("timm.layers.drop", "DropPath", _timm_drop_path_init, _timm_drop_path_forward)


class Attention(nn.Module):
    """timm's Attention, in short: a 4-D ``attn_mask`` with one row per sample is per-sample."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # one head: (N, 1, L, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.squeeze(1))


def _vit_init(self: Any, dim: int = 8, drop_path: float = 0.5, drop_path_layer: Any = TimmDropPath) -> None:
    self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), Attention(dim), nn.Identity()
    self.drop_path1 = drop_path_layer(drop_path) if drop_path > 0 else nn.Identity()
    self.norm2, self.ls2 = nn.LayerNorm(dim), nn.Identity()
    self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    self.drop_path2 = drop_path_layer(drop_path) if drop_path > 0 else nn.Identity()


def _vit_forward(self: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


Block = _standin("timm.models.vision_transformer", "Block", _vit_init, _vit_forward)


def _mbconv_init(self: Any, ch: int = 4, p: float = 0.5) -> None:
    self.use_res_connect = True
    self.block = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU())
    self.stochastic_depth = DropPath(p)


def _mbconv_forward(self: Any, input: Tensor) -> Tensor:
    result = self.block(input)
    if self.use_res_connect:
        result = self.stochastic_depth(result)
        result += input
    return result


MBConv = _standin("torchvision.models.efficientnet", "MBConv", _mbconv_init, _mbconv_forward)


def vit(depth: int = 3, dim: int = 8, p: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(dim, p) for _ in range(depth)])


def _pair(model: nn.Module, seed: int = 5, **kw: Any) -> tuple[nn.Module, nn.Module]:
    """(the converted model that computes every sample, the same model skipping), both keyed."""
    plain = convert_dropout(copy.deepcopy(model))
    skipping = skip_dropped_compute(model, **kw)
    return keyed_masks(plain, seed), keyed_masks(skipping, seed)


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model: nn.Module, x: Tensor, step: int, *args: Any, **kw: Any) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    with mask_context(step=step, sample_ids=torch.arange(x.shape[0])):
        y = model(xi, *args, **kw)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    assert xi.grad is not None
    return y.detach(), {**_grads(model), "input": xi.grad}


def _assert_same_run(a: tuple[Tensor, dict[str, Tensor]], b: tuple[Tensor, dict[str, Tensor]]) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-4, atol=1e-5, msg=k)


def _kept(dp: DropPath, n: int, step: int) -> int:
    """How many of ``n`` samples the keyed DropPath ``dp`` keeps at ``step`` (its own draw)."""
    with mask_context(step=step, sample_ids=torch.arange(n)):
        key = dp.mask_key(n, torch.device("cpu"))
    return int(drop_path(torch.ones(n, 1), dp.p, key=key).count_nonzero())


def _count_rows(modules: list[nn.Module]) -> tuple[list[int], list[Any]]:
    seen: list[int] = []

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].shape[0])

    return seen, [m.register_forward_pre_hook(hook) for m in modules]


# --- the stand-in ViT block -----------------------------------------------------------------------


def test_keyed_output_and_gradients_equal_the_model_that_computes_every_sample() -> None:
    plain, skipping = _pair(vit())
    assert all(is_skipping(b) and isinstance(b, Block) for b in skipping)
    x = torch.randn(8, 5, 8)
    for step in range(4):
        _assert_same_run(_run(skipping, x, step), _run(plain, x, step))


def test_each_branch_runs_on_its_kept_rows_only() -> None:
    _, model = _pair(vit())
    n, counts = 16, []
    seen, hooks = _count_rows([m for b in model for m in (b.attn, b.mlp)])
    for step in range(6):
        with mask_context(step=step, sample_ids=torch.arange(n)):
            model(torch.randn(n, 5, 8))
        counts += [k for b in model for k in (_kept(b.drop_path1, n, step), _kept(b.drop_path2, n, step))]
    for h in hooks:
        h.remove()
    assert seen == [k for k in counts if k > 0]  # a branch with nothing kept is not run
    assert sum(seen) < 0.7 * n * len(counts)  # p = 0.5: about half the rows


def test_eval_is_bitwise_and_state_dict_keys_stay() -> None:
    model = vit()
    ref = convert_dropout(copy.deepcopy(model)).eval()
    keys = list(model.state_dict())
    skip_dropped_compute(model).eval()
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 5, 8)
    assert torch.equal(model(x), ref(x))


def test_timm_drop_paths_are_converted_and_p_read_at_call_time() -> None:
    model = vit()
    skip_dropped_compute(model)
    dps = [m for m in model.modules() if isinstance(m, DropPath)]
    assert len(dps) == 6
    assert not any(type(m).__name__ == "DropPath" and type(m) is not DropPath for m in model.modules())
    sched = DropSchedule(model, target_p=1.0, total_steps=2)
    sched.step(2)  # every drop path at p = 1: no branch runs
    seen, hooks = _count_rows([b.mlp for b in model])
    x = torch.randn(4, 5, 8)
    assert torch.equal(model.train()(x), x)
    sched.step(0)  # p = 0: every branch on every row
    model(x)
    assert seen == [4, 4, 4]
    for h in hooks:
        h.remove()


def test_a_branch_that_drops_every_sample_gives_zero_gradients() -> None:
    # the model that computes every sample gives its dropped branch zero gradients, not none
    model = skip_dropped_compute(vit(depth=1))
    model[0].drop_path1.p = 1.0
    model(torch.randn(3, 5, 8)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert all(
        torch.equal(grads[n], torch.zeros_like(grads[n]))
        for n in grads
        if n.startswith(("0.attn", "0.norm1"))
    )
    assert grads["0.mlp.0.weight"].abs().sum() > 0


class WithMask(nn.Module):
    """Calls each block with an attention mask, as timm's ViT does when given one."""

    def __init__(self, blocks: nn.Module, mask: Tensor) -> None:
        super().__init__()
        self.blocks, self.mask = blocks, mask

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b(x, attn_mask=self.mask)
        return x


def test_per_sample_attention_mask_travels_with_the_kept_rows() -> None:
    plain, skipping = _pair(vit())
    x = torch.randn(8, 5, 8)
    per_sample = torch.randn(8, 1, 5, 5)  # (N, heads, L, S): one mask per sample
    for step, mask in enumerate([per_sample, per_sample[:1], torch.randn(5, 5)]):  # and two shared ones
        _assert_same_run(_run(WithMask(skipping, mask), x, step), _run(WithMask(plain, mask), x, step))


def test_mc_predict_samples_the_skipping_blocks() -> None:
    model = skip_dropped_compute(vit()).eval()
    x = torch.randn(4, 5, 8)
    out = sd.mc_predict(model, x, samples=4)
    assert (out.variance > 0).any()
    assert not any(m.training for m in model.modules())
    assert torch.equal(model(x), convert_dropout(copy.deepcopy(vit())).eval()(x))


def test_second_call_changes_nothing_and_deepcopy_keeps_the_class() -> None:
    model = skip_dropped_compute(vit())
    classes = [type(b) for b in model]
    assert skip_dropped_compute(model) is model
    assert [type(b) for b in model] == classes
    for other in (copy.deepcopy(model),):
        assert [type(b) for b in other] == classes
        assert torch.equal(other.eval()(torch.ones(2, 5, 8)), model.eval()(torch.ones(2, 5, 8)))


def test_verbose_lists_every_block_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    class Mine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop_path = nn.Linear(8, 8), TimmDropPath(0.1)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.drop_path(self.fc(x))

    model = nn.Sequential(Block(8, 0.2), Block(8, 0.0), Mine(), Block(8, 0.2, scale_by_keep_false()))
    skip_dropped_compute(model, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["module", "block", "done"]
    assert lines[1].split() == [
        "0",
        "timm",
        "vision_transformer.Block",
        "skips:",
        "drop_path1",
        "(p=0.2),",
        "drop_path2",
        "(p=0.2)",
    ]
    assert lines[2].split()[:2] == ["1", "timm"]
    assert lines[2].endswith("left: no drop path")
    assert lines[3].split() == [
        "2.drop_path",
        "DropPath",
        "plain:",
        "in",
        "a",
        "block",
        "it",
        "does",
        "not",
        "know",
    ]
    assert lines[4].endswith(
        "left: unscaled DropPath (scale_by_keep=False): drop_path_residual always scales"
    )
    assert lines[-1] == (
        "skips the dropped samples' compute in 1 block: timm vision_transformer.Block x1; "
        "1 plain DropPath layer"
    )
    assert isinstance(model[2].drop_path, DropPath)  # converted, computing every sample


def scale_by_keep_false() -> Callable[[float], nn.Module]:
    return lambda p: TimmDropPath(p, scale_by_keep=False)


def test_exclude_leaves_blocks_and_their_drop_paths() -> None:
    model = vit()
    skip_dropped_compute(model, exclude=["1", "2.drop_path2"])
    assert is_skipping(model[0])
    assert not is_skipping(model[1])
    assert not is_skipping(model[2])
    assert type(model[1].drop_path1).__module__ == "timm.layers.drop"  # not converted either
    assert type(model[2].drop_path2).__module__ == "timm.layers.drop"
    assert type(model[2].drop_path1) is DropPath  # converted: its block is left, computing every sample


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"skip_dropped_compute: model must be an nn.Module, got list"):
        skip_dropped_compute([])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"allow_batch_coupled must be a bool"):
        skip_dropped_compute(vit(), allow_batch_coupled=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"exclude must be names from model.named_modules\(\), got 'x'"):
        skip_dropped_compute(vit(), exclude="x")
    with pytest.raises(ValueError, match=r"got one without a drop path$"):
        skip_dropped_compute(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"got one whose known blocks are all left as they are \(0, timm"):
        skip_dropped_compute(vit(p=0.0))


def test_batch_coupled_branch_is_refused_and_nothing_changes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MBConv(), MBConv())
    before = copy.deepcopy(model)
    with pytest.raises(
        ValueError,
        match=r"0 \(torchvision efficientnet.MBConv\) with block.1 "
        r"\(BatchNorm2d: batch statistics\) and 1 more",
    ):
        skip_dropped_compute(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]


def test_batch_coupled_opt_in_warns_and_the_statistics_come_from_the_kept_samples() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MBConv())
    plain = keyed_masks(copy.deepcopy(model), 1)
    with pytest.warns(
        UserWarning, match=r"allow_batch_coupled=True: 1 rewritten blocks .*0: block.1 \(BatchNorm2d"
    ):
        keyed_masks(skip_dropped_compute(model, allow_batch_coupled=True), 1)
    x = torch.randn(8, 4, 5, 5)
    step = next(s for s in range(50) if 0 < _kept(model[0].stochastic_depth, 8, s) < 8)
    conv_out: list[Tensor] = []
    model[0].block[0].register_forward_hook(lambda m, a, out: conv_out.append(out.detach()))
    plain[0].block[0].register_forward_hook(lambda m, a, out: conv_out.append(out.detach()))
    with mask_context(step=step, sample_ids=torch.arange(8)):
        model(x), plain(x)
    kept_rows, all_rows = conv_out
    kept = _kept(model[0].stochastic_depth, 8, step)
    assert kept_rows.shape[0] == kept
    assert all_rows.shape[0] == 8
    bn, bn_plain = model[0].block[1], plain[0].block[1]
    # running mean after one step: momentum * the batch mean, over the kept samples only
    torch.testing.assert_close(bn.running_mean, 0.1 * kept_rows.mean((0, 2, 3)))
    torch.testing.assert_close(bn_plain.running_mean, 0.1 * all_rows.mean((0, 2, 3)))
    assert not torch.allclose(bn.running_mean, bn_plain.running_mean)


@pytest.mark.filterwarnings("ignore:.*allow_batch_coupled=True:UserWarning")
def test_batch_coupled_opt_in_is_refused_where_the_compiled_block_cannot_gather() -> None:
    """A conv + BatchNorm branch compiled on the CPU with inductor's layout optimisation on runs on
    the whole batch: its BatchNorm would then normalise over other rows than eagerly, so the
    opted-in block is refused by name instead (one law, eager and compiled)."""
    import torch._inductor.config as inductor_config

    model = keyed_masks(skip_dropped_compute(nn.Sequential(MBConv()), allow_batch_coupled=True), 1)
    torch._dynamo.reset()
    with (
        inductor_config.patch(layout_optimization=True),  # the default, which forces the whole batch
        pytest.raises(Exception, match=r"skip_dropped_compute: model .*holds 1 \(BatchNorm2d\)"),
        mask_context(step=0, sample_ids=torch.arange(8)),
    ):
        torch.compile(model, backend="aot_eager")(torch.randn(8, 4, 5, 5))
    torch._dynamo.reset()


def test_the_table_names_each_block_once() -> None:
    labels = [(b.module, b.name) for b in BLOCKS]
    assert len(set(labels)) == len(labels) == 15


# --- real models (timm, torchvision): the `models` environment -----------------------------------
# small configurations (2-4 blocks, widths 8-32, 28-56 px images) of the models each block class
# comes from; every drop rate 0.5 (timm's first block gets 0 and stays as it is)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, drop_path_rate=0.5, num_classes=5, **kw)

    return make


def _timm_mixer() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=32, drop_path_rate=0.5)


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt(
        [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.5, num_classes=5
    )


def _tv_swin(v2: bool = False) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from torchvision.models import swin_transformer as tv

        kw: dict[str, Any] = (
            {"block": tv.SwinTransformerBlockV2, "downsample_layer": tv.PatchMergingV2} if v2 else {}
        )
        return tv.SwinTransformer(
            [4, 4], 16, [2, 2], [1, 2], [4, 4], stochastic_depth_prob=0.5, num_classes=5, **kw
        )

    return make


def _tv_efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting = [FusedMBConvConfig(1, 3, 1, 16, 16, 2), MBConvConfig(4, 3, 2, 16, 24, 2)]
    return EfficientNet(setting, dropout=0.1, stochastic_depth_prob=0.5, num_classes=5)  # type: ignore[arg-type]


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {  # (builder, image size)
    "timm-vit": (
        _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
        32,
    ),
    # patch dropout gives each sample its own rope table, which must travel with the kept rows
    "timm-eva": (
        _timm(
            "eva02_tiny_patch14_224",
            img_size=28,
            patch_size=7,
            depth=2,
            embed_dim=32,
            num_heads=2,
            patch_drop_rate=0.25,
        ),
        28,
    ),
    "timm-swin": (
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=56,
            window_size=7,
            depths=(2, 2),
            num_heads=(1, 2),
            embed_dim=16,
        ),
        56,
    ),
    "timm-convnext": (_timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)), 32),
    "timm-mixer": (_timm_mixer, 32),
    "tv-convnext": (_tv_convnext, 32),
    "tv-swin": (_tv_swin(), 32),
    "tv-swin_v2": (_tv_swin(v2=True), 32),
    # batch-coupled (BatchNorm): rewritten with allow_batch_coupled=True only
    "timm-resnet": (_timm("resnet18", layers=(1, 1, 1, 1)), 32),
    "timm-efficientnet": (_timm("efficientnet_b0"), 32),
    "tv-efficientnet": (_tv_efficientnet, 32),
}
COUPLED = {"timm-resnet", "timm-efficientnet", "tv-efficientnet"}
# per block class: (drop path, the first module of its branch), to count the rows each branch sees
PROBES: dict[str, list[tuple[str, str]]] = {
    "Block": [("drop_path1", "norm1"), ("drop_path2", "norm2")],
    "EvaBlock": [("drop_path1", "norm1"), ("drop_path2", "norm2")],
    "timm SwinTransformerBlock": [("drop_path1", "norm1"), ("drop_path2", "norm2")],
    "ConvNeXtBlock": [("drop_path", "conv_dw")],
    "MixerBlock": [("drop_path", "norm1"), ("drop_path", "norm2")],
    "CNBlock": [("stochastic_depth", "block")],
    "torchvision SwinTransformerBlock": [("stochastic_depth", "norm1"), ("stochastic_depth", "norm2")],
    "SwinTransformerBlockV2": [("stochastic_depth", "attn"), ("stochastic_depth", "mlp")],
    "BasicBlock": [("drop_path", "conv1")],
    "InvertedResidual": [("drop_path", "conv_pw")],
    "DepthwiseSeparableConv": [("drop_path", "conv_dw")],
    "MBConv": [("stochastic_depth", "block")],
    "FusedMBConv": [("stochastic_depth", "block")],
}


def _probes(block: nn.Module) -> list[tuple[str, str]]:
    base = type(block)._skip_base  # type: ignore[attr-defined]
    return PROBES.get(base.__name__) or PROBES[f"{base.__module__.split('.')[0]} {base.__name__}"]


def _real_pair(name: str) -> tuple[nn.Module, nn.Module, Tensor]:
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain, skipping = _pair(model, allow_batch_coupled=name in COUPLED)
    coupled = [w for w in record if "allow_batch_coupled=True" in str(w.message)]
    assert len(coupled) == (name in COUPLED)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    return plain, skipping, x


def _bn_eval(model: nn.Module) -> nn.Module:
    """BatchNorm in eval mode: each sample's output its own, so both models compute the same."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


@pytest.mark.models
@pytest.mark.parametrize("name", list(MODELS))
def test_real_model(name: str) -> None:
    plain, model, x = _real_pair(name)
    blocks = [m for m in model.modules() if is_skipping(m)]
    assert blocks, "every model here has blocks to rewrite"
    # state_dict: the same keys and values as the converted model's
    state, ref = model.state_dict(), plain.state_dict()
    assert list(state) == list(ref)
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    # eval: the same bits
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    # training with keyed masks: the same output and gradients, each branch on its kept rows only
    model.train(), plain.train()
    if name in COUPLED:
        _bn_eval(model), _bn_eval(plain)
    n, expected = x.shape[0], []
    probes = [(getattr(b, dp), getattr(b, child)) for b in blocks for dp, child in _probes(b)]
    seen, hooks = _count_rows([child for _, child in probes])
    for step in range(2):
        torch.manual_seed(step)  # eva's patch dropout draws from torch's generator
        got = _run(model, x, step)
        torch.manual_seed(step)
        _assert_same_run(got, _run(plain, x, step))
        expected += [k for k in (_kept(dp, n, step) for dp, _ in probes) if k > 0]
    for h in hooks:
        h.remove()
    assert sorted(seen) == sorted(expected)
    assert sum(seen) < n * len(probes) * 2


@pytest.mark.models
def test_real_model_pickles() -> None:
    _, model, x = _real_pair("timm-vit")
    copy_ = pickle.loads(pickle.dumps(model))
    assert [type(m) for m in copy_.modules()] == [type(m) for m in model.modules()]
    assert torch.equal(copy_.eval()(x), model.eval()(x))


@pytest.mark.models
def test_real_batchnorm_models_are_refused_by_default() -> None:
    for name in sorted(COUPLED):
        model = MODELS[name][0]()
        with pytest.raises(
            ValueError, match=r"or allow_batch_coupled=True: a branch run on the kept samples only"
        ):
            skip_dropped_compute(model)
        assert not any(is_skipping(m) for m in model.modules())


@pytest.mark.models
def test_real_convnext_block_with_a_downsampling_shortcut() -> None:
    from timm.models.convnext import ConvNeXtBlock

    torch.manual_seed(0)
    block = ConvNeXtBlock(8, 16, stride=2, drop_path=0.5)
    plain, model = _pair(block)
    x = torch.randn(6, 8, 8, 8)
    for step in range(3):
        _assert_same_run(_run(model, x, step), _run(plain, x, step))


# --- distributed: DDP and FSDP2 on 2 gloo ranks equal 1 rank; a rank with nothing kept joins in -----


def _dist_worker(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    n = 4
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    local = slice(rank * n // world, (rank + 1) * n // world)
    out: dict[str, Any] = {}
    for name in ("timm-vit", "tv-convnext"):
        for wrap in ("ddp", "fsdp2"):
            torch.manual_seed(0)
            model = keyed_masks(skip_dropped_compute(MODELS[name][0]()), seed=11)
            dps = [m for m in model.modules() if isinstance(m, DropPath)]
            if wrap == "ddp":
                model = DDP(model)
            else:
                for m in list(model.modules()):
                    if is_skipping(m):
                        fully_shard(m)
                fully_shard(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.02)
            losses = []
            for step in range(6):
                with mask_context(step=step, sample_ids=torch.arange(n)[local]):
                    loss = model(x[local]).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                total = loss.detach().clone()
                if world > 1:
                    torch.distributed.all_reduce(total)
                losses.append(total / world)
            out[f"{name}-{wrap}"] = torch.stack(losses)
        # steps at which some branch keeps nothing of one rank's half and something of the other's
        halves = [(0, 1), (2, 3)]
        out[f"{name}-lonely"] = sum(
            (_kept_ids(dp, step, halves[0]) == 0) != (_kept_ids(dp, step, halves[1]) == 0)
            for dp in dps
            for step in range(6)
        )
    return out


def _kept_ids(dp: DropPath, step: int, ids: tuple[int, ...]) -> int:
    with mask_context(step=step, sample_ids=torch.tensor(ids)):
        key = dp.mask_key(len(ids), torch.device("cpu"))
    return int(drop_path(torch.ones(len(ids), 1), dp.p, key=key).count_nonzero())


@pytest.mark.models
@pytest.mark.slow
def test_real_models_under_ddp_and_fsdp2_equal_one_rank(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    (one,) = run_world(_dist_worker, 1, tmp_path / "1", timeout_s=300)
    two = run_world(_dist_worker, 2, tmp_path / "2", timeout_s=300)
    for key, losses in one.items():
        if key.endswith("-lonely"):
            assert losses > 0, key  # a rank kept nothing of some branch while the other kept rows
            continue
        msg = f"{key}: {losses.tolist()} on 1 rank, {two[0][key].tolist()} on 2"
        torch.testing.assert_close(two[0][key], losses, rtol=1e-4, atol=1e-6, msg=msg)
        torch.testing.assert_close(two[1][key], losses, rtol=1e-4, atol=1e-6, msg=msg)


# --- torch.compile: a compiled training run equals eager, in few graphs -----------------------------


def _compiled_run(build: Callable[[], nn.Module], x: Tensor, dynamic: bool, steps: int = 20) -> None:
    """Train eager and compiled copies side by side with keyed masks: the same losses, <= 2 graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = keyed_masks(skip_dropped_compute(build()), seed=3)
    twin = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")  # inductor compiles take minutes here
    compiled = torch.compile(twin, backend=counter, dynamic=dynamic)
    runs = []
    for model, params in ((eager, eager.parameters()), (compiled, twin.parameters())):
        opt = torch.optim.SGD(params, lr=0.01)
        losses = []
        for step in range(steps):
            with mask_context(step=step, sample_ids=torch.arange(x.shape[0])):
                loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        runs.append(torch.stack(losses))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-5)
    assert 1 <= counter.frame_count <= 2, counter.frame_count


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_training_equals_eager(dynamic: bool) -> None:
    _compiled_run(vit, torch.randn(6, 5, 8), dynamic)


# torchvision's Swin blocks run their branches on the whole batch under the compiler (see
# skip_compute), and tracing their shifted windows with every size symbolic (dynamic=True) took
# over 10 minutes here: they are compiled in the default mode only (timm's Swin in both)
_COMPILED_RUNS = [
    (name, dynamic)
    for name in MODELS
    if name not in COUPLED
    for dynamic in (False, True)
    if not (dynamic and name.startswith("tv-swin"))
]


@pytest.mark.models
@pytest.mark.slow
@pytest.mark.parametrize(("name", "dynamic"), _COMPILED_RUNS)
def test_real_model_compiled_training_equals_eager(name: str, dynamic: bool) -> None:
    build, size = MODELS[name]
    _compiled_run(
        build, torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)), dynamic, 8
    )
