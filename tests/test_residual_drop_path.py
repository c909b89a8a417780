"""ResidualDropPath / drop_path_residual: ``x + drop_path(branch(x))``, the branch on the kept rows only.

The contract table (tests/optable.py, an identity branch) covers the shared checks; here: real
branches (MLP, conv, attention with masks), the rows the branch sees, the same draw as
``drop_path``, gradients, extra arguments, the model tools, and ``torch.compile`` with and
without ``capture_dynamic_output_shape_ops``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spatialdrop as sd
from conftest import assert_binomial
from spatialdrop.functional import drop_path, drop_path_residual


class Recorder(nn.Module):
    """A branch that records the rows it is called on (and extra arguments), then runs ``inner``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[Tensor, tuple[Any, ...], dict[str, Any]]] = []

    def forward(self, rows: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.calls.append((rows.detach().clone(), args, kwargs))
        return self.inner(rows)


def mlp(d: int = 8, hidden: int = 16) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


class Attention(nn.Module):
    """Pre-norm self-attention with an optional shared (L, L) bias and a per-sample (N, L) padding mask."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: Tensor, bias: Tensor | None = None, *, pad: Tensor | None = None) -> Tensor:
        n, length, d = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        mask = torch.zeros(n, 1, length, length, dtype=x.dtype, device=x.device)
        if bias is not None:
            mask = mask + bias  # (L, L): shared by the batch
        if pad is not None:
            mask = mask.masked_fill(pad[:, None, None, :], float("-inf"))  # (N, L): True = padding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(n, length, d))


def kept_rows(y: Tensor, x: Tensor) -> Tensor:
    """Which samples got a branch added: the dropped ones are the input, bit for bit."""
    return (y != x).reshape(x.shape[0], -1).any(1)


# --- the law -----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_rows_are_x_plus_branch_over_1_minus_p_and_the_branch_sees_only_them(
    p: float, dtype: torch.dtype
) -> None:
    branch = Recorder(mlp()).to(dtype)
    x = torch.randn(32, 5, 8, dtype=dtype)
    y = drop_path_residual(x, branch, p, generator=torch.Generator().manual_seed(3))
    keep = kept_rows(y, x)
    assert 0 < int(keep.sum()) < 32
    assert len(branch.calls) == 1
    rows = branch.calls[0][0]
    assert torch.equal(rows, x[keep])  # the kept rows, in batch order, and nothing else
    with torch.no_grad():
        full = branch.inner(x)
    assert torch.equal(y[~keep], x[~keep])
    scale = torch.ones((), dtype=dtype).div_(1 - p)  # drop_path's scale, rounded to the dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype != torch.bfloat16 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y[keep], x[keep] + full[keep] * scale, **tol)


@pytest.mark.parametrize(
    "shape", [(12,), (12, 7), (12, 3, 4), (12, 2, 3, 3), (12, 2, 2, 3, 3), (12, 1, 2, 1, 2, 2)]
)
def test_any_rank_with_the_batch_first(shape: tuple[int, ...]) -> None:
    branch = Recorder(nn.Tanh())
    x = torch.randn(shape)
    y = drop_path_residual(x, branch, 0.5, generator=torch.Generator().manual_seed(0))
    keep = kept_rows(y, x)
    assert y.shape == x.shape
    assert torch.equal(branch.calls[0][0], x[keep])
    ref = x + drop_path(torch.tanh(x), 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept_rows(ref, x), keep)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("source", ["global", "generator", "key"])
def test_the_same_draw_and_bits_as_x_plus_drop_path(source: str) -> None:
    """The same samples dropped as by ``x + drop_path(branch(x))``; the kept rows equal to rounding
    (the scaled add is one fused multiply-add), the dropped ones bit for bit."""
    branch = mlp()
    x = torch.randn(40, 3, 8)
    key = sd.MaskKey(seed=5, step=2, layer=9, sample_ids=torch.arange(100, 140))

    def draw(f: Any) -> Tensor:
        if source == "global":
            torch.manual_seed(11)
            return f({})
        if source == "generator":
            return f({"generator": torch.Generator().manual_seed(11)})
        return f({"key": key})

    ours = draw(lambda kw: drop_path_residual(x, branch, 0.3, **kw))
    theirs = draw(lambda kw: x + drop_path(branch(x), 0.3, **kw))
    keep = kept_rows(theirs, x)
    assert 0 < int(keep.sum()) < 40
    assert torch.equal(kept_rows(ours, x), keep)
    assert torch.equal(ours[~keep], x[~keep])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    if source == "global":  # and the same random numbers were used up
        torch.manual_seed(11)
        drop_path_residual(x, branch, 0.3)
        a = torch.rand(3)
        torch.manual_seed(11)
        drop_path(x, 0.3)
        assert torch.equal(a, torch.rand(3))


def test_drop_rate_is_binomial_and_samples_independent() -> None:
    x = torch.randn(4000, 2)
    dropped = ~kept_rows(drop_path_residual(x, nn.Identity(), 0.3), x)
    assert_binomial(int(dropped.sum()), 4000, 0.3, "dropped samples")
    assert_binomial(int((dropped[0::2] & dropped[1::2]).sum()), 2000, 0.09, "both of a pair dropped")


def test_scale_is_1_over_1_minus_p_never_the_kept_fraction() -> None:
    x = torch.zeros(10, 1)
    for seed in range(20):
        y = drop_path_residual(
            x, lambda t: torch.ones_like(t), 0.5, generator=torch.Generator().manual_seed(seed)
        )
        assert set(y.flatten().tolist()) <= {0.0, 2.0}


# --- whole-batch cases -------------------------------------------------------------------


def test_eval_p_zero_and_empty_call_the_branch_once_on_the_whole_batch() -> None:
    x = torch.randn(6, 4)
    for kwargs in ({"training": False}, {"p": 0.0}):
        branch = Recorder(nn.Linear(4, 4))
        state = torch.get_rng_state()
        y = drop_path_residual(x, branch, **{"p": 0.5, **kwargs})
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
        assert len(branch.calls) == 1
        assert torch.equal(branch.calls[0][0], x)
        with torch.no_grad():
            assert torch.equal(y, x + branch.inner(x))
    for empty in (torch.randn(0, 4), torch.randn(3, 0)):
        branch = Recorder(nn.Identity())
        assert drop_path_residual(empty, branch, 0.5).shape == empty.shape
        assert len(branch.calls) == 1


def test_all_dropped_skips_the_branch_and_returns_the_input() -> None:
    x = torch.randn(4, 3)
    branch = Recorder(nn.Linear(3, 3))
    assert drop_path_residual(x, branch, 1.0) is x
    key = sd.MaskKey(0, 0, 0, torch.arange(4))
    dropped = sd.keyed_uniform(key, 1)[:, 0] < 0.9
    assert bool(dropped.all())  # this key drops all 4 samples at p = 0.9
    assert drop_path_residual(x, branch, 0.9, key=key) is x
    assert branch.calls == []
    x.requires_grad_(True)
    drop_path_residual(x, branch, 1.0).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert branch.inner.weight.grad is None  # no gradient: see the DDP note in the README


def test_none_dropped_runs_the_branch_on_the_input_itself() -> None:
    x = torch.randn(4, 3)
    key = sd.MaskKey(0, 0, 0, torch.arange(4))
    assert bool((sd.keyed_uniform(key, 1)[:, 0] >= 0.05).all())  # this key keeps all 4 at p = 0.05
    seen: list[Tensor] = []
    y = drop_path_residual(x, lambda t: seen.append(t) or t * 2, 0.05, key=key)
    assert seen[0] is x  # no gather
    assert torch.equal(y, x + drop_path(x * 2, 0.05, key=key))


# --- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_gradients_equal_those_of_x_plus_drop_path(p: float) -> None:
    branch = mlp().double()
    twin = copy.deepcopy(branch)
    x = torch.randn(24, 3, 8, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = torch.randn_like(x)
    (drop_path_residual(xa, branch, p, generator=torch.Generator().manual_seed(2)) * w).sum().backward()
    ((xb + drop_path(twin(xb), p, generator=torch.Generator().manual_seed(2))) * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(branch.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_a_fixed_draw() -> None:
    branch = mlp(3, 4).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    key = sd.MaskKey(1, 2, 3, torch.arange(6))
    f = lambda t: drop_path_residual(t, branch, 0.5, key=key)  # noqa: E731
    assert 0 < int(kept_rows(f(x), x).sum()) < 6
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_forward_mode_jvp_equals_that_of_x_plus_drop_path() -> None:
    branch = mlp(4, 6).double()
    x, t = torch.randn(10, 3, 4, dtype=torch.float64), torch.randn(10, 3, 4, dtype=torch.float64)
    key = sd.MaskKey(3, 1, 4, torch.arange(10))
    _, ours = torch.func.jvp(lambda v: drop_path_residual(v, branch, 0.5, key=key), (x,), (t,))
    _, theirs = torch.func.jvp(lambda v: v + drop_path(branch(v), 0.5, key=key), (x,), (t,))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert 0 < int(kept_rows(drop_path_residual(x, branch, 0.5, key=key), x).sum()) < 10


# --- layouts and dtypes ------------------------------------------------------------------


def test_channels_last_conv_branch_gets_channels_last_rows_and_keeps_the_format() -> None:
    conv = Recorder(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(8, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    rows_fmt: list[bool] = []
    conv.register_forward_pre_hook(
        lambda m, a: rows_fmt.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    y = drop_path_residual(x, conv, 0.5, generator=torch.Generator().manual_seed(1))
    assert rows_fmt == [True]
    assert y.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = x + drop_path(conv.inner(x), 0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_non_contiguous_input() -> None:
    x = torch.randn(10, 8, 6)[:, ::2].transpose(1, 2)
    assert not x.is_contiguous()
    y = drop_path_residual(x, torch.sin, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(
        y, drop_path_residual(x.contiguous(), torch.sin, 0.5, generator=torch.Generator().manual_seed(4))
    )


def test_a_branch_in_another_dtype_promotes_like_the_plain_sum() -> None:
    x = torch.randn(16, 3)
    branch = lambda t: t.double() * 3  # noqa: E731
    y = drop_path_residual(x, branch, 0.5, generator=torch.Generator().manual_seed(0))
    ref = x + drop_path(branch(x), 0.5, generator=torch.Generator().manual_seed(0))
    assert y.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


# --- extra arguments ---------------------------------------------------------------------


def test_shared_arguments_pass_unchanged_and_batched_ones_follow_the_kept_rows() -> None:
    torch.manual_seed(0)
    attn = Attention()
    n, length = 12, 5
    x = torch.randn(n, length, 8)
    bias = torch.randn(length, length)
    pad = torch.zeros(n, length, dtype=torch.bool)
    pad[:, -2:] = torch.rand(n, 1) < 0.5  # some samples padded
    block = sd.ResidualDropPath(attn, 0.5, batched_args=["pad"])
    torch.manual_seed(7)
    y = block(x, bias, pad=pad)
    with torch.no_grad():
        full = attn(x, bias, pad=pad)
    keep = kept_rows(y, x)
    assert 0 < int(keep.sum()) < n
    torch.testing.assert_close(y[keep], x[keep] + 2 * full[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(y[~keep], x[~keep])
    # positional batched argument, through the functional form
    rec = Recorder(nn.Identity())
    y = drop_path_residual(
        x, rec, 0.5, args=(bias, pad), batched_args=(1,), generator=torch.Generator().manual_seed(3)
    )
    (_, args, kwargs), keep = rec.calls[0], kept_rows(y, x)
    assert args[0] is bias
    assert torch.equal(args[1], pad[keep])
    assert kwargs == {}


def test_a_per_sample_argument_not_declared_batched_fails_in_the_branch() -> None:
    """Undeclared arguments are passed unchanged: an (N, L) mask meets K < N rows and the branch raises."""
    torch.manual_seed(0)
    block = sd.ResidualDropPath(Attention(), 0.5)
    x = torch.randn(12, 5, 8)
    pad = torch.zeros(12, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        block(x, pad=pad)
    block.eval()
    assert block(x, pad=pad).shape == x.shape  # eval: the whole batch, the mask fits


def test_batched_args_errors_name_the_argument() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(
        ValueError,
        match=r"^drop_path_residual: kwargs\['pad'\] must be a tensor with the batch \(4\) at dim 0, "
        r"as batched_args says, got shape \(3,\)$",
    ):
        drop_path_residual(x, nn.Identity(), 0.5, kwargs={"pad": torch.ones(3)}, batched_args=["pad"])
    with pytest.raises(ValueError, match=r"^drop_path_residual: args\[0\] must be .*, got float$"):
        drop_path_residual(x, nn.Identity(), 0.5, args=(1.0,), batched_args=[0])
    with pytest.raises(TypeError, match=r"^ResidualDropPath: batched_args must be a collection of ints"):
        sd.ResidualDropPath(nn.Identity(), batched_args=[True])
    assert repr(sd.ResidualDropPath(nn.Identity(), 0.3, batched_args=[0, "pad"])).startswith(
        "ResidualDropPath(\n  p=0.3, batched_args=(0, 'pad')\n"
    )


# --- the module among the tools -----------------------------------------------------------


class ViTish(nn.Module):
    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.attn = sd.ResidualDropPath(Attention(), p)
        self.mlp = sd.ResidualDropPath(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.BatchNorm1d(5), nn.Linear(16, 8)),
            p,
            allow_batch_coupled=True,
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mlp(self.attn(self.embed(x))).mean(1))


@pytest.mark.filterwarnings("ignore:.*batch-coupled modules:UserWarning")
def test_state_dict_deepcopy_and_nested_names() -> None:
    net = ViTish()
    keys = list(net.state_dict())
    assert "attn.branch.qkv.weight" in keys
    assert "mlp.branch.1.weight" in keys
    twin = copy.deepcopy(net)
    x = torch.randn(6, 5, 8)
    torch.manual_seed(3)
    a = net(x)
    torch.manual_seed(3)
    assert torch.equal(twin(x), a)
    fresh = ViTish()
    fresh.load_state_dict(net.state_dict())
    net.eval()
    fresh.eval()
    assert torch.equal(fresh(x), net(x))


def test_drop_schedule_mc_dropout_and_keyed_masks_find_it() -> None:
    net = ViTish(0.0)
    sched = sd.DropSchedule(net, target_p=0.4, total_steps=4)
    assert [name for name, _ in sched.modules] == ["attn", "mlp"]
    sched.step(4)
    assert net.attn.p == net.mlp.p == pytest.approx(0.4)
    net.train()
    with sd.mc_dropout(net):
        assert net.attn.training
        assert net.mlp.training
        assert not net.mlp.branch[2].training  # the branch's BatchNorm stays in eval
        assert not net.attn.branch.training
    assert net.mlp.branch[2].training
    net.eval()
    out = sd.mc_predict(net, torch.randn(4, 5, 8), samples=8)
    assert bool((out.variance > 0).any())
    assert all(m.training is False for m in net.modules())
    sd.keyed_masks(net, seed=3)
    assert net.attn.keyed_seed == 3
    assert net.attn.keyed_layer != net.mlp.keyed_layer


def test_keyed_masks_equal_drop_path_s_for_the_same_key() -> None:
    branch = mlp()
    ours = sd.keyed_masks(nn.Sequential(sd.ResidualDropPath(branch, 0.4)), seed=21)
    theirs = sd.keyed_masks(nn.Sequential(sd.DropPath(0.4)), seed=21)  # the same qualified name "0"
    assert ours[0].keyed_layer == theirs[0].keyed_layer
    x = torch.randn(30, 3, 8)
    ids = torch.arange(1000, 1030)
    with sd.mask_context(step=6, sample_ids=ids):
        a = ours(x)
        b = x + theirs(branch(x))
    keep = kept_rows(b, x)
    assert 0 < int(keep.sum()) < 30
    assert torch.equal(kept_rows(a, x), keep)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with sd.mask_context(step=6, sample_ids=ids[10:]):  # a sample's mask does not depend on its batch
        assert torch.equal(ours(x[10:]), a[10:])


def test_batchnorm_in_the_branch_sees_only_the_kept_samples() -> None:
    """With the opt-in (and its warning), batch statistics of a branch come from the kept samples."""
    bn = nn.BatchNorm1d(3, momentum=1.0)  # running stats = the last batch's statistics
    x = torch.randn(16, 3) * 3 + 1
    with pytest.warns(UserWarning, match=r"batch-coupled modules \['\(BatchNorm1d\)'\]"):
        y = drop_path_residual(
            x, bn, 0.5, generator=torch.Generator().manual_seed(5), allow_batch_coupled=True
        )
    keep = kept_rows(y, x)
    assert 2 <= int(keep.sum()) < 16
    torch.testing.assert_close(bn.running_mean, x[keep].mean(0))


# --- torch.compile -----------------------------------------------------------------------


class Block(nn.Module):
    """A pre-norm transformer block written as two ResidualDropPath layers."""

    def __init__(self, p: float = 0.4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = sd.ResidualDropPath(Attention(), p)
        self.mlp = sd.ResidualDropPath(mlp(), p)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))


def _graph_ops(explained: Any) -> set[str]:
    nodes = (n for g in explained.graphs for n in g.graph.nodes)
    return {str(n.target) for n in nodes if n.op in ("call_function", "call_method")}


COMPILE_CASES = [
    pytest.param("aot_eager", False, False, id="aot_eager-default"),
    pytest.param("aot_eager", False, True, id="aot_eager-capture"),
    pytest.param("aot_eager", True, True, id="aot_eager-capture-dynamic", marks=pytest.mark.slow),
    pytest.param("inductor", False, False, id="inductor-default"),
    pytest.param("inductor", True, False, id="inductor-default-dynamic", marks=pytest.mark.slow),
    pytest.param("inductor", False, True, id="inductor-capture", marks=pytest.mark.slow),
    pytest.param("inductor", True, True, id="inductor-capture-dynamic", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("backend", "dynamic", "capture"), COMPILE_CASES)
def test_compile_fullgraph_gives_eager_s_law_and_gradients(
    backend: str, dynamic: bool, capture: bool
) -> None:
    """Keyed masks, so eager and compiled draw alike. With or without
    ``capture_dynamic_output_shape_ops`` the compiled layer gathers the kept rows (an unbacked size
    from ``spatialdrop::kept_index``) in one graph."""
    net = sd.keyed_masks(Block(), seed=4)
    twin = copy.deepcopy(net)
    partial: list[bool] = []  # per eager layer call: were some samples dropped and some kept?
    for layer in (twin.attn, twin.mlp):
        layer.register_forward_hook(
            lambda m, a, y: partial.append(0 < int(kept_rows(y, a[0]).sum()) < y.shape[0])
        )
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
            x = torch.randn(16, 5, 8)
            with sd.mask_context(step=0, sample_ids=torch.arange(16)):
                explained = torch._dynamo.explain(net)(x)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0)
            assert any("kept_index" in op for op in _graph_ops(explained))  # the gather, any flags
            torch._dynamo.reset()
            compiled = torch.compile(net, backend=backend, dynamic=dynamic, fullgraph=True)
            for step, n in enumerate((16, 16, 10) if dynamic else (16, 16)):
                xc = torch.randn(n, 5, 8).requires_grad_(True)
                xe = xc.detach().clone().requires_grad_(True)
                with sd.mask_context(step=step, sample_ids=torch.arange(n) * 3):
                    yc, ye = compiled(xc), twin(xe)
                torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
                w = torch.randn_like(yc)
                (yc * w).sum().backward()
                (ye * w).sum().backward()
                torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
                for a, b in zip(net.parameters(), twin.parameters()):
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
                    a.grad = b.grad = None
        assert sum(partial) >= 2  # the masks did drop some samples and keep others
    finally:
        torch._dynamo.reset()


# --- real networks (the models environment) ------------------------------------------------


@pytest.mark.models
def test_timm_vit_mlp_branch_drops_what_timm_s_drop_path_drops() -> None:
    """A timm ViT block's MLP as the branch: the same samples as timm's ``DropPath`` under the same seed."""
    from timm.layers import DropPath
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(32, 4, qkv_bias=True, init_values=0.1)
    branch = nn.Sequential(block.norm2, block.mlp, block.ls2)
    x = torch.randn(24, 9, 32)
    torch.manual_seed(5)
    ours = sd.ResidualDropPath(branch, 0.3)(x)
    torch.manual_seed(5)
    theirs = x + DropPath(0.3)(branch(x))
    keep = kept_rows(theirs, x)
    assert 0 < int(keep.sum()) < 24
    assert torch.equal(kept_rows(ours, x), keep)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.models
@pytest.mark.slow
def test_timm_block_as_the_branch_compiles_with_an_unbacked_kept_count() -> None:
    """inductor, ``capture_dynamic_output_shape_ops``: timm's attention reshapes the gathered rows."""
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    net = sd.keyed_masks(nn.Sequential(sd.ResidualDropPath(Block(32, 4, qkv_bias=True), 0.4)), seed=2)
    twin = copy.deepcopy(net)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            compiled = torch.compile(net, fullgraph=True, dynamic=True)
            for step, n in enumerate((12, 7)):
                xc = torch.randn(n, 9, 32).requires_grad_(True)
                xe = xc.detach().clone().requires_grad_(True)
                with sd.mask_context(step=step, sample_ids=torch.arange(n)):
                    yc, ye = compiled(xc), twin(xe)
                torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
                yc.sum().backward()
                ye.sum().backward()
                torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
                for a, b in zip(net.parameters(), twin.parameters()):
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
                    a.grad = b.grad = None
    finally:
        torch._dynamo.reset()


# --- issue 29 item 6: optional batched arguments -------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_an_optional_batched_argument_absent_or_none_is_not_gathered(training: bool) -> None:
    """``batched_args=["pad"]`` with no ``pad`` (or ``pad=None``, or a batched position past ``args``):
    the call runs, with the rows the key drops, like the same call without ``batched_args``."""
    torch.manual_seed(0)
    attn = Attention()
    x = torch.randn(12, 5, 8)
    block = sd.ResidualDropPath(attn, 0.5, batched_args=["pad"]).train(training)
    plain = sd.ResidualDropPath(attn, 0.5).train(training)
    for kwargs in ({}, {"pad": None}):
        torch.manual_seed(3)
        y = block(x, **kwargs)
        torch.manual_seed(3)
        assert torch.equal(y, plain(x))
    rec = Recorder(nn.Identity())
    y = drop_path_residual(
        x, rec, 0.5, training=training, args=(None,), batched_args=(0, 1), generator=torch.Generator()
    )
    assert rec.calls[0][1] == (None,)


# --- batch-coupled branches --------------------------------------------------------------


COUPLED = [
    pytest.param(lambda: nn.BatchNorm1d(3), (8, 3), "(BatchNorm1d)", id="bn1d"),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),
        (8, 3, 4, 4),
        "1 (BatchNorm2d)",
        id="bn2d",
    ),
    pytest.param(lambda: nn.BatchNorm3d(3), (8, 3, 2, 2, 2), "(BatchNorm3d)", id="bn3d"),
    pytest.param(lambda: nn.SyncBatchNorm(3), (8, 3, 4), "(SyncBatchNorm)", id="syncbn"),
    pytest.param(lambda: nn.LazyBatchNorm1d(), (8, 3), "(LazyBatchNorm1d)", id="lazybn"),
    pytest.param(
        lambda: nn.BatchNorm1d(3, track_running_stats=False).eval(),
        (8, 3),
        "(BatchNorm1d)",
        id="bn-no-stats-eval",
    ),
    pytest.param(
        lambda: nn.InstanceNorm1d(3, track_running_stats=True),
        (8, 3, 4),
        "(InstanceNorm1d)",
        id="instancenorm-stats",
    ),
]


@pytest.mark.parametrize(("make", "shape", "name"), COUPLED)
def test_a_batch_coupled_branch_is_refused_by_default(make: Any, shape: tuple[int, ...], name: str) -> None:
    branch = make()
    x = torch.randn(shape)
    msg = (
        r"^drop_path_residual: branch must be one that treats the samples independently .*"
        rf"allow_batch_coupled=True .*, got one with batch-coupled modules \['{re.escape(name)}'\]$"
    )
    with pytest.raises(ValueError, match=msg):
        drop_path_residual(x, branch, 0.5)
    with pytest.raises(ValueError, match=msg):
        sd.ResidualDropPath(branch, 0.5)(x)
    with pytest.raises(ValueError, match=msg):  # draw="exact_count" is refused the same way
        drop_path_residual(x, branch, 0.5, draw="exact_count")
    # p = 0, eval: the whole batch, as the plain block: not refused
    assert drop_path_residual(x, branch, 0.0).shape == x.shape
    assert drop_path_residual(x, branch.eval(), 0.5, training=False).shape == x.shape


@pytest.mark.parametrize(
    "branch",
    [
        nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)),
        nn.GroupNorm(1, 3),
        nn.InstanceNorm1d(3),
        nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3).eval()),  # running statistics: per sample
    ],
    ids=["layernorm", "groupnorm", "instancenorm", "bn-eval"],
)
def test_per_sample_branches_are_not_batch_coupled(branch: nn.Module) -> None:
    assert sd.batch_coupled_modules(branch) == []
    x = torch.randn(8, 3, 4)
    assert drop_path_residual(x, branch, 0.5).shape == x.shape


def test_the_batch_coupled_opt_in_warns_and_uses_the_kept_rows() -> None:
    bn = nn.BatchNorm1d(3, momentum=1.0)
    x = torch.randn(32, 3)
    with pytest.warns(UserWarning, match=r"^drop_path_residual: the branch has batch-coupled modules"):
        y = sd.ResidualDropPath(bn, 0.5, allow_batch_coupled=True)(x)
    keep = kept_rows(y, x)
    torch.testing.assert_close(bn.running_mean, x[keep].mean(0))


# --- draw="exact_count" (DINOv2's law) ----------------------------------------------------


@pytest.mark.parametrize(("n", "p"), [(32, 0.4), (10, 0.25), (7, 0.5), (3, 0.9)])
def test_exact_count_keeps_round_n_times_1_minus_p_rows_scaled_n_over_k(n: int, p: float) -> None:
    k = int(n * (1 - p) + 0.5)
    x = torch.zeros(n, 2)
    for seed in range(10):
        rec = Recorder(nn.Identity())
        y = (
            drop_path_residual(
                x + 1, rec, p, draw="exact_count", generator=torch.Generator().manual_seed(seed)
            )
            - 1
        )
        kept = y.abs().sum(1) > 0
        assert int(kept.sum()) == k
        if k:
            torch.testing.assert_close(y[kept], torch.full((k, 2), n / k))
            assert rec.calls[0][0].shape[0] == k if k < n else True
        else:
            assert rec.calls == []


def test_exact_count_picks_each_sample_with_rate_k_over_n() -> None:
    n, p, trials = 10, 0.3, 2000
    counts = torch.zeros(n)
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1)
    for _ in range(trials):
        counts += (drop_path_residual(x, lambda t: t + 1, p, draw="exact_count", generator=g) != 0)[:, 0]
    for c in counts.tolist():
        assert_binomial(int(c), trials, 0.7, "sample kept")


def test_exact_count_keyed_is_a_function_of_the_key_and_gradients_flow() -> None:
    branch = mlp().double()
    x = torch.randn(20, 3, 8, dtype=torch.float64, requires_grad=True)
    key = sd.MaskKey(1, 2, 3, torch.arange(20))
    f = lambda t: drop_path_residual(t, branch, 0.4, key=key, draw="exact_count")  # noqa: E731
    a, b = f(x), f(x)
    assert torch.equal(a, b)
    assert int(kept_rows(a, x).sum()) == 12
    assert torch.autograd.gradcheck(lambda t: f(t)[:, :1], (x,))


def test_draw_and_options_are_checked_and_shown() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(
        ValueError,
        match=r"^drop_path_residual: draw must be one of 'per_sample', 'exact_count', got 'dinov2'$",
    ):
        drop_path_residual(x, nn.Identity(), 0.5, draw="dinov2")
    with pytest.raises(TypeError, match=r"^ResidualDropPath: allow_batch_coupled must be a bool, got 1$"):
        sd.ResidualDropPath(nn.Identity(), allow_batch_coupled=1)  # type: ignore[arg-type]
    layer = sd.ResidualDropPath(nn.Identity(), 0.3, draw="exact_count", allow_batch_coupled=True)
    assert repr(layer).startswith(
        "ResidualDropPath(\n  p=0.3, draw='exact_count', allow_batch_coupled=True\n"
    )


def test_kept_index_op_passes_opcheck() -> None:
    from spatialdrop.residual_drop_path import kept_index

    for keep in (torch.tensor([0.0, 2.0, 0.0, 2.0]), torch.zeros(3), torch.ones(5)):
        assert torch.equal(kept_index(keep), keep.nonzero().squeeze(1))
        torch.library.opcheck(kept_index, (keep,), test_utils=("test_schema", "test_faketensor"))


# --- the saving and the law under torch.compile (issue 33) --------------------------------


class DrawBlock(nn.Module):
    """``Block`` with a chosen ``draw`` (and branch kinds): attention, MLP."""

    def __init__(self, p: float = 0.4, draw: str = "per_sample") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = sd.ResidualDropPath(Attention(), p, draw=draw)
        self.mlp = sd.ResidualDropPath(mlp(), p, draw=draw)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))


def _train_compiled_and_eager(
    net: nn.Module,
    steps: int,
    sizes: Any,
    shape: tuple[int, ...],
    *,
    dynamic: bool | None = None,
    fullgraph: bool = True,
    backend: str = "inductor",
) -> tuple[int, list[int]]:
    """Keyed training steps, compiled and eager from the same weights: outputs, input and weight
    gradients and buffers equal. Returns the graphs dynamo compiled and the rows kept per step."""
    from torch._dynamo.utils import counters

    twin = copy.deepcopy(net)
    kept: list[int] = []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    for step in range(steps):
        n = sizes(step)
        xc = torch.randn(n, *shape).requires_grad_(True)
        xe = xc.detach().clone().requires_grad_(True)
        with sd.mask_context(step=step, sample_ids=torch.arange(n) * 7):
            yc, ye = compiled(xc), twin(xe)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        kept.append(int(kept_rows(ye, xe).sum()))
        w = torch.randn_like(yc)
        (yc * w).sum().backward()
        (ye * w).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
        for a, b in zip(net.parameters(), twin.parameters()):  # BatchNorm's sums: rounding ~1e-5
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
            a.grad = b.grad = None
        for a, b in zip(net.buffers(), twin.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    graphs = int(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return graphs, kept


def _explained_ops(net: nn.Module, x: Tensor) -> set[str]:
    torch._dynamo.reset()
    with sd.mask_context(step=0, sample_ids=torch.arange(x.shape[0])):
        explained = torch._dynamo.explain(net)(x)
    torch._dynamo.reset()
    return _graph_ops(explained)


@pytest.mark.parametrize(
    ("draw", "dynamic"),
    [
        pytest.param("per_sample", None, id="per_sample"),
        pytest.param("exact_count", None, id="exact_count"),
        pytest.param("per_sample", True, id="per_sample-dynamic", marks=pytest.mark.slow),
        pytest.param("exact_count", True, id="exact_count-dynamic", marks=pytest.mark.slow),
    ],
)
def test_compiled_keyed_training_equals_eager_in_at_most_2_graphs_over_20_steps(
    draw: str, dynamic: bool | None
) -> None:
    """The default dynamo configuration: the kept rows are gathered in the graph (``kept_index``
    for DropPath's law, ``topk`` for the exact count), the kept count changes at every step, and
    the compiled steps equal the eager ones; with ``dynamic=True`` the batch size changes too."""
    net = sd.keyed_masks(DrawBlock(0.4, draw), seed=4)
    ops = _explained_ops(net, torch.randn(16, 5, 8))
    assert any(("kept_index" if draw == "per_sample" else "topk") in op for op in ops)
    sizes = (lambda s: 16) if not dynamic else (lambda s: (16, 12, 9, 20)[s % 4])
    graphs, kept = _train_compiled_and_eager(net, 20, sizes, (5, 8), dynamic=dynamic)
    assert graphs <= 2, f"{graphs} graphs over 20 steps"
    if draw == "per_sample":
        assert len(set(kept)) >= 4  # the kept count did change
    else:  # a sample is kept by either of the 2 layers: at least k = round(0.6 n) of the n
        assert all(k >= round(sizes(s) * 0.6) for s, k in enumerate(kept))


def conv_branch() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))


@pytest.mark.parametrize(
    "config",
    [
        pytest.param("default", id="default"),
        pytest.param("capture", id="capture_dynamic_output_shape_ops"),
        pytest.param("no-layout-opt", id="layout_optimization-off", marks=pytest.mark.slow),
    ],
)
def test_conv_branch_compiles_on_the_cpu_without_inductor_s_crash(config: str) -> None:
    """Inductor's layout optimisation crashes on a convolution of an unbacked batch (a size/stride
    assertion, with or without ``capture_dynamic_output_shape_ops``): such a branch runs on the
    whole batch (the same law) unless ``layout_optimization`` is off, where it is gathered."""
    import torch._inductor.config as inductor_config

    net = sd.keyed_masks(nn.Sequential(sd.ResidualDropPath(conv_branch(), 0.5)), seed=3)
    patches = {
        "default": {},
        "capture": {"capture_dynamic_output_shape_ops": True},
        "no-layout-opt": {},
    }[config]
    with (
        torch._dynamo.config.patch(**patches),
        inductor_config.patch(layout_optimization=config != "no-layout-opt"),
    ):
        gathered = any("kept_index" in op for op in _explained_ops(net, torch.randn(8, 4, 6, 6)))
        assert gathered == (config == "no-layout-opt")
        graphs, kept = _train_compiled_and_eager(net, 4, lambda s: 8, (4, 6, 6))
    assert graphs == 1
    assert any(0 < k < 8 for k in kept)


def test_conv_and_batchnorm_branch_compiled_on_the_cpu_is_refused_or_exact_count() -> None:
    """The issue's example: a conv + BatchNorm branch, opted in. Where inductor's crash keeps the
    kept rows from being gathered the whole-batch fallback would normalise over other rows than
    eager, so it is refused by name; ``draw="exact_count"`` (a static shape) gathers and equals eager."""
    import torch._inductor.config as inductor_config

    branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    net = sd.keyed_masks(
        nn.Sequential(sd.ResidualDropPath(copy.deepcopy(branch), 0.5, allow_batch_coupled=True)), seed=1
    )
    torch._dynamo.reset()
    with (
        inductor_config.patch(layout_optimization=True),  # the default: the whole-batch fallback
        pytest.raises(Exception, match=r"layout_optimization = False"),
        sd.mask_context(step=0, sample_ids=torch.arange(8)),
    ):
        torch.compile(net, backend="inductor")(torch.randn(8, 4, 3, 3))
    exact = sd.keyed_masks(
        nn.Sequential(sd.ResidualDropPath(branch, 0.5, draw="exact_count", allow_batch_coupled=True)), seed=1
    )
    with pytest.warns(UserWarning, match="batch-coupled"):
        _, kept = _train_compiled_and_eager(exact, 3, lambda s: 8, (4, 3, 3))
    assert kept == [4, 4, 4]


@pytest.mark.filterwarnings("ignore:.*batch-coupled modules:UserWarning")
@pytest.mark.parametrize(
    "draw",
    ["per_sample", pytest.param("exact_count", marks=pytest.mark.slow)],
)
def test_batch_coupled_opt_in_compiled_equals_eager(draw: str) -> None:
    """BatchNorm in an MLP branch, opted in: the same kept rows eager and compiled, so the same
    outputs, gradients and running statistics."""
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(5), nn.GELU(), nn.Linear(16, 8))
    net = sd.keyed_masks(
        nn.Sequential(sd.ResidualDropPath(branch, 0.4, draw=draw, allow_batch_coupled=True)), seed=5
    )
    _, kept = _train_compiled_and_eager(net, 4, lambda s: 12, (5, 8), fullgraph=False)
    assert any(1 < k < 12 for k in kept)


def test_exact_count_compiled_with_no_sample_kept_returns_the_input() -> None:
    """``k = round(3 * 0.1) = 0``: the input, compiled as eagerly (no division by ``k``)."""
    torch._dynamo.reset()
    f = torch.compile(
        lambda t: drop_path_residual(t, nn.Identity(), 0.9, draw="exact_count"),
        backend="aot_eager",
        fullgraph=True,
    )
    x = torch.randn(3, 2)
    assert torch.equal(f(x), x)
    assert int(kept_rows(f(torch.zeros(10, 2) + 1), torch.zeros(10, 2) + 1).sum()) == 1
    torch._dynamo.reset()
