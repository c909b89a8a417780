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
    assert len(dps) == 6 and not any(
        type(m).__name__ == "DropPath" and type(m) is not DropPath for m in model.modules()
    )
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
    assert lines[2].split()[:2] == ["1", "timm"] and lines[2].endswith("left: no drop path")
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
    assert lines[4].endswith("left: unscaled DropPath (scale_by_keep=False): drop_path_residual always scales")
    assert lines[-1] == (
        "skips the dropped samples' compute in 1 block: timm vision_transformer.Block x1; 1 plain DropPath layer"
    )
    assert isinstance(model[2].drop_path, DropPath)  # converted, computing every sample


def scale_by_keep_false() -> Callable[[float], nn.Module]:
    return lambda p: TimmDropPath(p, scale_by_keep=False)


def test_exclude_leaves_blocks_and_their_drop_paths() -> None:
    model = vit()
    skip_dropped_compute(model, exclude=["1", "2.drop_path2"])
    assert is_skipping(model[0]) and not is_skipping(model[1]) and not is_skipping(model[2])
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
        match=r"0 \(torchvision efficientnet.MBConv\) with block.1 \(BatchNorm2d: batch statistics\) and 1 more",
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
    assert kept_rows.shape[0] == kept and all_rows.shape[0] == 8
    bn, bn_plain = model[0].block[1], plain[0].block[1]
    # running mean after one step: momentum * the batch mean, over the kept samples only
    torch.testing.assert_close(bn.running_mean, 0.1 * kept_rows.mean((0, 2, 3)))
    torch.testing.assert_close(bn_plain.running_mean, 0.1 * all_rows.mean((0, 2, 3)))
    assert not torch.allclose(bn.running_mean, bn_plain.running_mean)


def test_the_table_names_each_block_once() -> None:
    labels = [(b.module, b.name) for b in BLOCKS]
    assert len(set(labels)) == len(labels) == 15
