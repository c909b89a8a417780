from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import FLOAT_DTYPES, assert_binomial
from distributed import run_world
from spatialdrop import (
    AlphaSpatialDropout2d,
    DropBlock2d,
    DropPath,
    GaussianSpatialDropout2d,
    MaskKey,
    SpatialDropout,
    SpatialDropout1d,
    SpatialDropout2d,
    SpatialDropout3d,
    keyed_masks,
    keyed_normal,
    keyed_uniform,
    mask_context,
)
from spatialdrop._module import StructuredDropout
from spatialdrop._philox import MASK32, philox4x32_int, uint32_to_uniform_int
from spatialdrop.functional import spatial_dropout
from spatialdrop.keyed import layer_id

SEED = 20240607


class _Residual(nn.Module):
    def __init__(self, channels: int, p: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.drop_path = DropPath(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.conv(x))


def _net() -> nn.Sequential:
    """A small conv net with every keyed layer: each one's output is recorded by ``_run``."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        SpatialDropout2d(0.3),
        DropBlock2d(0.2, 3),
        _Residual(8, 0.5),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Tanh(),
        SpatialDropout2d(0.5),
        GaussianSpatialDropout2d(0.3),
        AlphaSpatialDropout2d(0.3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _data(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _run(
    net: nn.Module, x: torch.Tensor, ids: torch.Tensor, step: int = 3
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Output, input gradient and the dropout layers' outputs of one forward/backward."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: seen.append(o.detach()))
        for m in net.modules()
        if isinstance(m, StructuredDropout)
    ]
    x = x.clone().requires_grad_(True)
    with mask_context(step=step, sample_ids=ids):
        out = net(x)
    out.sum().backward()
    for h in hooks:
        h.remove()
    return out.detach(), x.grad, seen


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _reference_uniform(seed: int, step: int, layer: int, sid: int, j: int) -> float:
    """keyed_uniform's documented layout, rebuilt from the int reference of Philox."""
    k0, k1, _, _ = philox4x32_int(layer & MASK32, layer >> 32, 0, 0x6D61736B, seed & MASK32, seed >> 32)
    words = philox4x32_int(j // 4, sid & MASK32, (sid >> 32) & MASK32, step, k0, k1)
    return uint32_to_uniform_int(words[j % 4])


# --- keyed_uniform: a pure function of (seed, step, layer, sample id, column) --------------


def test_keyed_uniform_follows_the_documented_layout() -> None:
    ids = [0, 1, 2**33 + 5, -3]
    key = MaskKey(seed=2**63 + 11, step=2**32 - 1, layer=0xDEADBEEF12345, sample_ids=torch.tensor(ids))
    u = keyed_uniform(key, 7)
    assert u.shape == (4, 7)
    assert u.dtype == torch.float32
    for i, sid in enumerate(ids):
        for j in range(7):
            assert u[i, j].item() == _reference_uniform(key.seed, key.step, key.layer, sid % 2**64, j)
    k0, k1, _, _ = philox4x32_int(
        key.layer & MASK32, key.layer >> 32, 0, 0x6D61736B, key.seed, key.seed >> 32
    )
    assert key.philox_seed() == k0 | k1 << 32


def test_keyed_uniform_pinned_values() -> None:
    # fixes the layout: a change here changes every keyed mask ever drawn
    u = keyed_uniform(MaskKey(0, 0, 0, torch.tensor([0, 1])), 3)
    bits = [[int(v) & MASK32 for v in row] for row in u.view(torch.int32).tolist()]
    assert bits == [[0x3EBA2DCF, 0x3EA2CE5D, 0x3F221DBD], [0x3F3A2981, 0x3F1772C3, 0x3EA66C90]]


def test_rows_depend_only_on_their_own_id() -> None:
    ids = torch.tensor([5, 17, 2, 99, 40])
    full = keyed_uniform(MaskKey(1, 2, 3, ids), 11)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(keyed_uniform(MaskKey(1, 2, 3, ids[perm]), 11), full[perm])
    for i in range(5):
        assert torch.equal(keyed_uniform(MaskKey(1, 2, 3, ids[i : i + 1]), 11)[0], full[i])
    # the first columns do not depend on how many are drawn
    assert torch.equal(keyed_uniform(MaskKey(1, 2, 3, ids), 4), full[:, :4])
    assert keyed_uniform(MaskKey(1, 2, 3, ids), 0).shape == (5, 0)
    assert keyed_uniform(MaskKey(1, 2, 3, ids[:0]), 3).shape == (0, 3)
    # int and tensor steps, any integer dtype of ids, give the same numbers
    same = keyed_uniform(MaskKey(1, torch.tensor(2, dtype=torch.int32), 3, ids.to(torch.int32)), 11)
    assert torch.equal(same, full)


@pytest.mark.parametrize("field", ["seed", "step", "layer", "sample_ids"])
def test_every_key_field_changes_the_numbers(field: str) -> None:
    base = MaskKey(7, 1, 2, torch.arange(50))
    changed = base._replace(**{field: torch.arange(50, 100) if field == "sample_ids" else 8})
    a, b = keyed_uniform(base, 40), keyed_uniform(changed, 40)
    # independent streams: u_a < 1/2 agrees with u_b < 1/2 about half of the time
    agree = int(((a < 0.5) == (b < 0.5)).sum())
    assert_binomial(agree, a.numel(), 0.5, f"agreement after changing {field}")


def test_keyed_uniform_is_uniform_and_uncorrelated_across_columns_and_samples() -> None:
    u = keyed_uniform(MaskKey(3, 0, 5, torch.arange(1000)), 64)
    for edge in (0.05, 0.3, 0.5, 0.8):
        assert_binomial(int((u < edge).sum()), u.numel(), edge, f"u < {edge}")
    low = u < 0.5
    assert_binomial(int((low[:, 1:] & low[:, :-1]).sum()), low[:, 1:].numel(), 0.25, "adjacent columns")
    assert_binomial(int((low[1:] & low[:-1]).sum()), low[1:].numel(), 0.25, "adjacent samples")
    assert_binomial(int((low[:, 3:] & low[:, :-3]).sum()), low[:, 3:].numel(), 0.25, "words of a block")


# --- spatial_dropout with key= -------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_keyed_drop_rate_and_structure(p: float, channel_dim: int) -> None:
    n, c = 400, 50
    x = torch.ones(n, c, 3, 3)
    if channel_dim == -1:
        x = x.movedim(1, -1).contiguous()
    key = MaskKey(SEED, 0, 1, torch.arange(n))
    y = spatial_dropout(x, p, channel_dim=channel_dim, key=key).movedim(channel_dim, 1)
    flat = y.reshape(n, c, -1)
    assert (flat.amax(-1) == flat.amin(-1)).all()
    scale = torch.tensor(1.0) / (1 - p)
    assert ((flat == 0) | (flat == scale)).all()
    dropped = flat[..., 0] == 0
    assert_binomial(int(dropped.sum()), n * c, p, "dropped channels")
    assert torch.equal(dropped, keyed_uniform(key, c) < p)  # channel c is column c


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64])
def test_same_masks_for_every_dtype(dtype: torch.dtype) -> None:
    key = MaskKey(SEED, 4, 9, torch.arange(16))
    x = torch.randn(16, 32, 4, 4).abs() + 0.5  # no zero inputs: zeros of y are the mask
    ref = spatial_dropout(x, 0.4, key=key) == 0
    y = spatial_dropout(x.to(dtype), 0.4, key=key)
    assert y.dtype == dtype
    assert torch.equal(y == 0, ref)
    # kept values are scaled exactly like the unkeyed path: in the input dtype
    scale = (torch.ones((), dtype=dtype) / (1 - 0.4)).to(dtype)
    assert torch.equal(y[y != 0], (x.to(dtype) * scale)[y != 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_layers_same_masks_for_every_dtype(dtype: torch.dtype) -> None:
    from spatialdrop.functional import alpha_spatial_dropout, drop_path, gaussian_spatial_dropout

    key = MaskKey(SEED, 2, 5, torch.arange(40))
    ones = torch.ones(40, 16, 3, 3)
    # DropPath: the same samples dropped
    ref = drop_path(ones, 0.5, key=key) == 0
    assert torch.equal(drop_path(ones.to(dtype), 0.5, key=key) == 0, ref)
    assert 0 < int(ref[:, 0, 0, 0].sum()) < 40
    # alpha: the same channels set to the saturation value (the output of a dropped 1 differs from a kept 1)
    a32 = alpha_spatial_dropout(ones, 0.4, key=key)
    a = alpha_spatial_dropout(ones.to(dtype), 0.4, key=key)
    dropped32 = a32 != a32.max()
    assert torch.equal(a != a.max(), dropped32)
    assert 0 < int(dropped32.sum()) < dropped32.numel()
    # Gaussian: the same normal draws; the factor is computed in float32 (float64 for float64
    # input) and rounded once to the input's dtype
    g32 = gaussian_spatial_dropout(ones, 0.3, key=key)
    g = gaussian_spatial_dropout(ones.to(dtype), 0.3, key=key)
    if dtype == torch.float64:
        torch.testing.assert_close(g, g32.double(), rtol=0.0, atol=1e-6)  # float32 rounding
    else:
        assert torch.equal(g, g32.to(dtype))


def test_keyed_gradient_inplace_and_trivial_p() -> None:
    key = MaskKey(1, 0, 0, torch.arange(4))
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    y = spatial_dropout(x, 0.25, key=key)
    y.sum().backward()
    noise = spatial_dropout(torch.ones(4, 6, 5, 5), 0.25, key=key)
    assert torch.equal(x.grad, noise)
    assert torch.equal(y.detach(), x.detach() * noise)
    z = x.detach().clone()
    assert spatial_dropout(z, 0.25, inplace=True, key=key) is z
    assert torch.equal(z, y.detach())
    assert spatial_dropout(x, 0.0, key=key) is x
    assert spatial_dropout(x, 0.5, training=False, key=key) is x
    assert (spatial_dropout(x, 1.0, key=key) == 0).all()


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda inplace: SpatialDropout2d(0.0, inplace), (3, 4, 4)),
        (lambda inplace: SpatialDropout1d(0.0, inplace), (3, 4)),
        (lambda inplace: DropBlock2d(0.0, 3, inplace), (3, 4, 4)),
        (lambda inplace: GaussianSpatialDropout2d(0.0, inplace), (3, 4, 4)),
        (lambda inplace: AlphaSpatialDropout2d(0.0, inplace), (3, 4, 4)),
        (lambda inplace: DropPath(0.0, inplace), (1, 3, 4, 4)),
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_keyed_layer_at_p0_after_relu_backpropagates(make: object, shape: tuple, inplace: bool) -> None:
    """p = 0 (a DropSchedule's first step) after a ReLU, unbatched or in place: the identity, and
    backward works as without keys (the key guard must not mark ReLU's saved output dirty)."""
    layer = make(inplace)  # type: ignore[operator]
    x = torch.randn(shape, requires_grad=True)
    grads = []
    for seed in (None, SEED):
        keyed_masks(layer, seed)
        x.grad = None
        with mask_context(step=0, sample_ids=torch.arange(1)):
            h = x.relu()
            y = layer(h)
            assert torch.equal(y, h)
            (y * torch.arange(y.numel()).view(y.shape)).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[1], grads[0])
    assert torch.equal(grads[1], (x > 0) * torch.arange(x.numel()).view(shape))


def test_keyed_path_leaves_global_rng_alone() -> None:
    x = torch.randn(3, 4, 2, 2)
    state = torch.get_rng_state()
    spatial_dropout(x, 0.5, key=MaskKey(0, 0, 0, torch.arange(3)))
    assert torch.equal(state, torch.get_rng_state())


# --- the guarantees of the issue: micro-batches, processes, dtypes ------------------------


def test_one_batch_equals_two_micro_batches() -> None:
    x = _data(8)
    ids = torch.arange(100, 108)
    big, small = keyed_masks(_net(), SEED), keyed_masks(_net(), SEED)
    out8, gx8, seen8 = _run(big, x, ids)
    outs, gxs, seens = [], [], []
    for half in (slice(0, 4), slice(4, 8)):
        o, g, s = _run(small, x[half], ids[half])
        outs.append(o)
        gxs.append(g)
        seens.append(s)
    assert torch.equal(out8, torch.cat(outs))
    assert torch.equal(gx8, torch.cat(gxs))
    assert len(seen8) == 6
    for layer in range(6):  # each dropout layer's output, masks included, bit for bit
        assert torch.equal(seen8[layer], torch.cat([s[layer] for s in seens]))
    # parameter gradients: sums over the batch, equal up to the order of the summation
    for name, g in _grads(big).items():
        torch.testing.assert_close(_grads(small)[name], g, rtol=1e-5, atol=1e-6)
    # masks are not a trivial all-keep: the spatial dropout layers drop channels, DropPath samples
    assert (seen8[0] == 0).any()
    assert (seen8[3] == 0).any()
    assert ((seen8[1] == 0) & (seen8[0] != 0)).any()  # DropBlock drops kept positions
    assert (seen8[2] == 0).flatten(1).all(1).any()  # DropPath


def test_masks_follow_samples_not_positions() -> None:
    x = _data(8)
    ids = torch.arange(8)
    perm = torch.tensor([7, 2, 5, 0, 1, 6, 3, 4])
    net = keyed_masks(_net(), SEED)
    out, _, _ = _run(net, x, ids)
    out_perm, _, _ = _run(net, x[perm], ids[perm])
    assert torch.equal(out_perm, out[perm])
    other_step, _, _ = _run(net, x, ids, step=4)
    assert not torch.equal(other_step, out)


def _ddp_worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    net = _net()
    ddp = keyed_masks(DistributedDataParallel(net), SEED)  # ids ignore the "module." prefix
    local = 8 // world
    ids = rank * local + torch.arange(local)  # the recipe for sample ids without a loader
    out, gx, seen = _run(ddp, _data(8)[rank * local : (rank + 1) * local], ids)
    return {"out": out, "gx": gx, "seen": seen, "grads": _grads(net)}


def test_one_process_equals_two_gloo_processes(tmp_path: Path) -> None:
    ranks = run_world(_ddp_worker, 2, tmp_path, timeout_s=150.0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting, for the same float summation inside a sample
    try:
        net = keyed_masks(_net(), SEED)
        out, gx, seen = _run(net, _data(8), torch.arange(8))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, torch.cat([r["out"] for r in ranks]))
    assert torch.equal(gx, torch.cat([r["gx"] for r in ranks]))
    assert len(seen) == 6
    for layer in range(6):
        assert torch.equal(seen[layer], torch.cat([r["seen"][layer] for r in ranks]))
    # DDP averages the ranks' gradients of the local sums: twice that is the full batch's sum
    for name, g in _grads(net).items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
        torch.testing.assert_close(ranks[0]["grads"][name] * 2, g, rtol=1e-5, atol=1e-6)


# --- the layer ids and the module switch -------------------------------------------------


class _Forward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.drop_a = SpatialDropout2d(0.5)
        self.drop_b = SpatialDropout2d(0.5)


class _Backward(nn.Module):
    def __init__(self) -> None:  # the same names, built and registered in the other order
        super().__init__()
        self.drop_b = SpatialDropout2d(0.5)
        self.drop_a = SpatialDropout2d(0.5)
        self.conv = nn.Conv2d(3, 4, 1)


def test_layer_ids_are_stable_hashes_of_names() -> None:
    # pinned: BLAKE2b-64 of the name, the same in every process and on every host; the name is
    # hashed as it is (wrappers are recognised by their class, see the tests below)
    assert layer_id("drop_a") != layer_id("module.drop_a") != layer_id("_orig_mod.module.drop_a")
    fwd, bwd = keyed_masks(_Forward(), 1), keyed_masks(_Backward(), 1)
    assert fwd.drop_a.keyed_layer == bwd.drop_a.keyed_layer == layer_id("drop_a")
    assert fwd.drop_b.keyed_layer == bwd.drop_b.keyed_layer != fwd.drop_a.keyed_layer
    x = torch.randn(6, 4, 3, 3)
    with mask_context(step=0, sample_ids=torch.arange(6)):
        assert torch.equal(fwd.drop_a(x), bwd.drop_a(x))
        assert not torch.equal(fwd.drop_a(x), fwd.drop_b(x))


class _Blocks(nn.Module):
    """Two residual blocks with keyed layers, and a child of its own called ``module``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), SpatialDropout2d(0.5))
        self.blocks = nn.ModuleList([_Residual(8, 0.5), _Residual(8, 0.5)])
        self.module = nn.Sequential(DropBlock2d(0.2, 3), GaussianSpatialDropout2d(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.module(x)


def _wrapped(how: str, net: nn.Module | None = None) -> tuple[nn.Module, dict[int, str]]:
    """``net`` (a new ``_Blocks`` by default) wrapped by torch's wrappers, and each module's name
    in the bare model."""
    from torch.ao.quantization import QuantWrapper
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
        offload_wrapper,
    )
    from torch.optim.swa_utils import AveragedModel

    net = _Blocks() if net is None else net
    names = {id(m): name for name, m in net.named_modules()}
    model: nn.Module = net
    if how == "compiled submodules":  # lazily compiled: wrapping compiles nothing
        net.blocks[1] = torch.compile(net.blocks[1])
        net.module[0] = torch.compile(net.module[0])  # a keyed layer itself
    elif how == "activation checkpointing":
        apply_activation_checkpointing(net, check_fn=lambda m: isinstance(m, (_Residual, DropBlock2d)))
    elif how == "nested":  # compile inside checkpoint inside DataParallel, compiled as a whole
        net.blocks[0] = checkpoint_wrapper(torch.compile(net.blocks[0]))
        model = torch.compile(nn.DataParallel(checkpoint_wrapper(net)))
    elif how == "offload, averaged, quantization":
        model = AveragedModel(QuantWrapper(net))  # holds a deep copy of the model
        net = model.module.module
        names = {id(m): name for name, m in net.named_modules()}
        net.blocks[0] = offload_wrapper(net.blocks[0])
    return model, names


@pytest.mark.parametrize(
    "how", ["compiled submodules", "activation checkpointing", "nested", "offload, averaged, quantization"]
)
def test_layer_ids_ignore_torch_wrappers_anywhere_in_the_path(how: str) -> None:
    model, names = _wrapped(how)
    keyed_masks(model, SEED)  # keyed after wrapping
    layers = [m for m in model.modules() if isinstance(m, StructuredDropout)]
    assert len(layers) == 5
    for m in layers:  # the id of the layer's name in the bare model
        assert m.keyed_layer == layer_id(names[id(m)]), names[id(m)]
    assert {names[id(m)] for m in layers} >= {"module.0", "module.1"}  # the child called module stays


def test_layer_ids_set_before_wrapping_stay_and_agree() -> None:
    net = keyed_masks(_Blocks(), SEED)
    ids = {id(m): m.keyed_layer for m in net.modules() if isinstance(m, StructuredDropout)}
    model, _ = _wrapped("nested", net)
    assert {id(m): m.keyed_layer for m in model.modules() if isinstance(m, StructuredDropout)} == ids
    keyed_masks(model, SEED)  # again, after wrapping: the same ids
    assert {id(m): m.keyed_layer for m in model.modules() if isinstance(m, StructuredDropout)} == ids


def test_the_wrapper_table_names_torch_classes() -> None:
    import importlib

    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as cw
    from torch.distributed.fsdp import _common_utils

    from spatialdrop.keyed import WRAPPERS, wrapped_attr

    for module, name, _ in WRAPPERS:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, nn.Module)
        assert (cls.__module__, cls.__qualname__) == (module, name)
    attrs = {name: attr for _, name, attr in WRAPPERS}
    assert attrs["ActivationWrapper"] == cw._CHECKPOINT_WRAPPED_MODULE
    assert attrs["FullyShardedDataParallel"] == _common_utils.FSDP_WRAPPED_MODULE
    inner = nn.Linear(2, 2)
    for wrapper in (torch.compile(inner), cw.checkpoint_wrapper(inner), nn.DataParallel(inner)):
        attr = wrapped_attr(wrapper)
        assert attr is not None
        assert wrapper._modules[attr] is inner
    assert wrapped_attr(inner) is None


def test_layer_id_pinned_value() -> None:
    import hashlib

    digest = hashlib.blake2b(b"features.3", digest_size=8, person=b"spatialdrop").digest()
    assert layer_id("features.3") == int.from_bytes(digest, "little")
    assert layer_id("features.3") == 0xC0702367A080BF3C


def test_state_dict_round_trip_keeps_masks() -> None:
    net = keyed_masks(_net(), SEED)
    keys_before = set(_net().state_dict())
    assert set(net.state_dict()) == keys_before  # keyed mode adds nothing to checkpoints
    restored = _net()
    with torch.no_grad():
        for p in restored.parameters():
            p.zero_()
    restored.load_state_dict(net.state_dict())
    keyed_masks(restored, SEED)
    a, ga, _ = _run(net, _data(), torch.arange(8))
    b, gb, _ = _run(restored, _data(), torch.arange(8))
    assert torch.equal(a, b)
    assert torch.equal(ga, gb)


def test_keyed_masks_switches_back_to_torch_exact() -> None:
    net = keyed_masks(nn.Sequential(SpatialDropout2d(0.5)), 3)
    assert net[0].keyed_seed == 3
    assert keyed_masks(net, None) is net
    assert net[0].keyed_seed is None
    assert net[0].keyed_layer is None
    x = torch.randn(4, 5, 3, 3)
    torch.manual_seed(1)
    ours = net(x)  # no context needed any more
    torch.manual_seed(1)
    assert torch.equal(ours, F.dropout2d(x, 0.5))


@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        (SpatialDropout, (3, 4, 5)),
        (SpatialDropout1d, (3, 4, 5)),
        (SpatialDropout2d, (3, 4, 5, 5)),
        (SpatialDropout3d, (3, 4, 2, 2, 2)),
    ],
)
def test_every_spatial_dropout_module_matches_the_function(cls: type, shape: tuple) -> None:
    m = keyed_masks(cls(0.5), 5)
    ids = torch.tensor([4, 8, 15])
    x = torch.randn(shape)
    with mask_context(step=16, sample_ids=ids):
        y = m(x)
    assert torch.equal(y, spatial_dropout(x, 0.5, key=MaskKey(5, 16, layer_id(""), ids)))
    if cls is not SpatialDropout:  # unbatched input: one id in the context
        with mask_context(step=16, sample_ids=ids[1:2]):
            assert torch.equal(m(x[1]), y[1])


def test_eval_mode_needs_no_context() -> None:
    m = keyed_masks(SpatialDropout2d(0.5), 0).eval()
    x = torch.randn(2, 3, 4, 4)
    assert m(x) is x


# --- errors ------------------------------------------------------------------------------


def test_keyed_layer_outside_a_context_raises() -> None:
    m = keyed_masks(SpatialDropout2d(0.5), 0)
    with pytest.raises(RuntimeError, match=r"SpatialDropout2d: this layer draws keyed masks .*mask_context"):
        m(torch.randn(2, 3, 4, 4))


def test_wrong_number_of_sample_ids_raises() -> None:
    m = keyed_masks(SpatialDropout2d(0.5), 0)
    too_many = (
        r"SpatialDropout2d: mask_context sample_ids must be one id per sample of the batch \(2\), got 3"
    )
    ctx = mask_context(step=0, sample_ids=torch.arange(3))
    with ctx, pytest.raises(ValueError, match=too_many):
        m(torch.randn(2, 3, 4, 4))
    with pytest.raises(
        ValueError, match=r"spatial_dropout: key.sample_ids must be one id per sample .*\(2\), got 5"
    ):
        spatial_dropout(torch.randn(2, 3, 4), 0.5, training=False, key=MaskKey(0, 0, 0, torch.arange(5)))


def test_key_and_generator_together_raise() -> None:
    with pytest.raises(ValueError, match=r"spatial_dropout: key must be None when a generator is given"):
        spatial_dropout(
            torch.randn(2, 3, 4), 0.5, generator=torch.Generator(), key=MaskKey(0, 0, 0, torch.arange(2))
        )


@pytest.mark.parametrize(
    ("key", "exc", "match"),
    [
        ("k", TypeError, r"key must be None or a spatialdrop.MaskKey, got str"),
        (
            MaskKey(-1, 0, 0, torch.arange(2)),
            ValueError,
            r"key.seed must be an int in \[0, 2\*\*64\), got -1",
        ),
        (MaskKey(2**64, 0, 0, torch.arange(2)), ValueError, r"key.seed must be an int in \[0, 2\*\*64\)"),
        (MaskKey(0.5, 0, 0, torch.arange(2)), TypeError, r"key.seed must be an int"),
        (MaskKey(0, 0, True, torch.arange(2)), TypeError, r"key.layer must be an int"),
        (
            MaskKey(0, 2**32, 0, torch.arange(2)),
            ValueError,
            r"spatial_dropout: key.step must be an int in \[0, 2\*\*32\) .*got 4294967296",
        ),
        (
            MaskKey(0, torch.tensor([1]), 0, torch.arange(2)),
            TypeError,
            r"key.step must be .* got a 1-D torch.int64 tensor",
        ),
        (MaskKey(0, 1.0, 0, torch.arange(2)), TypeError, r"key.step must be an int"),
        (
            MaskKey(0, 0, 0, torch.ones(2)),
            TypeError,
            r"spatial_dropout: key.sample_ids must be a 1-D integer tensor .* torch.float32",
        ),
        (
            MaskKey(0, 0, 0, torch.ones(2, 1, dtype=torch.long)),
            ValueError,
            r"key.sample_ids must be .* shape \(2, 1\)",
        ),
        (MaskKey(0, 0, 0, [0, 1]), TypeError, r"key.sample_ids must be a 1-D integer tensor .*, got list"),
    ],
)
def test_bad_keys_raise_even_in_eval(key: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        spatial_dropout(torch.randn(2, 3, 4), 0.5, training=False, key=key)  # type: ignore[arg-type]


def test_keyed_uniform_and_normal_name_themselves_and_their_arguments() -> None:
    with pytest.raises(TypeError, match=r"^keyed_uniform: key must be a spatialdrop.MaskKey, got NoneType$"):
        keyed_uniform(None, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^keyed_normal: key must be a spatialdrop.MaskKey, got NoneType$"):
        keyed_normal(None, 3)  # type: ignore[arg-type]
    key = MaskKey(0, 0, 0, torch.arange(2))
    with pytest.raises(
        ValueError, match=r"^keyed_normal: per_sample must be an int in \[0, 2\*\*33\], got 8589934593$"
    ):
        keyed_normal(key, 2**33 + 1)
    with pytest.raises(ValueError, match=r"^keyed_uniform: per_sample must be an int in \[0, 2\*\*34\], got"):
        keyed_uniform(key, 2**34 + 1)
    with pytest.raises(ValueError, match=r"^keyed_uniform: key.step must be an int in"):
        keyed_uniform(key._replace(step=-1), 2)


def test_bad_context_and_switch_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"mask_context: step must be an int in \[0, 2\*\*32\).*got -1"):
        mask_context(step=-1, sample_ids=torch.arange(2)).__enter__()
    with pytest.raises(TypeError, match=r"mask_context: sample_ids must be a 1-D integer tensor"):
        mask_context(step=0, sample_ids=torch.arange(2.0)).__enter__()
    with pytest.raises(TypeError, match=r"keyed_masks: model must be a torch.nn.Module, got int"):
        keyed_masks(3, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"keyed_masks: seed must be an int in \[0, 2\*\*64\), got -5"):
        keyed_masks(nn.Identity(), -5)
    with pytest.raises(TypeError, match=r"keyed_masks: seed must be an int"):
        keyed_masks(nn.Identity(), "7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"keyed_uniform: per_sample must be an int >= 0, got -1"):
        keyed_uniform(MaskKey(0, 0, 0, torch.arange(2)), -1)


@pytest.mark.parametrize("seed", [1, None])
def test_keyed_masks_refuses_a_model_without_keyed_layers(seed: int | None) -> None:
    from spatialdrop import DropSchedule, mc_predict

    plain = nn.Sequential(nn.Linear(3, 3))
    # one rule with DropSchedule and mc_predict: a model without the layers they act on is refused
    for call in (
        lambda: keyed_masks(plain, seed),
        lambda: DropSchedule(plain, 0.1, 10),
        lambda: mc_predict(plain, torch.randn(2, 3)),
    ):
        with pytest.raises(
            ValueError, match=r"^(keyed_masks|DropSchedule|mc_predict): model must be a model with "
        ):
            call()
    with pytest.raises(
        ValueError,
        match=r"keyed_masks: model must be a model with spatialdrop layers.*convert_dropout.*"
        r"got one whose dropout layers are Dropout x1, Dropout2d x2$",
    ):
        keyed_masks(nn.Sequential(nn.Dropout2d(), nn.Dropout(), nn.Sequential(nn.Dropout2d())), seed)


def test_contexts_nest_and_are_per_thread() -> None:
    m = keyed_masks(SpatialDropout2d(0.5), 0)
    x = torch.ones(2, 64, 1, 1)
    with mask_context(step=1, sample_ids=torch.arange(2)):
        outer = m(x)
        with mask_context(step=2, sample_ids=torch.arange(2)):
            inner = m(x)
        assert torch.equal(m(x), outer)
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                m(x)
            except RuntimeError as e:
                errors.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert len(errors) == 1  # the context does not leak into another thread
    assert not torch.equal(inner, outer)
    with pytest.raises(RuntimeError, match="mask_context"):
        m(x)


# --- transforms: compile, checkpoint, vmap -----------------------------------------------


def test_torch_compile_fullgraph_no_recompile_per_step() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = keyed_masks(nn.Sequential(SpatialDropout2d(0.5)), SEED)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(6, 16, 3, 3)
    for step in range(3):
        with mask_context(step=step, sample_ids=torch.arange(step, step + 6)):
            eager = m(x)
            assert torch.equal(compiled(x), eager)  # inductor's integer code gives the same bits
    assert counters["stats"]["unique_graphs"] == 1  # the step is a graph input, not a constant
    with pytest.raises(RuntimeError, match="mask_context"):  # compiled, still the clear error
        compiled(x)
    torch._dynamo.reset()


def test_checkpoint_recompute_gives_the_same_mask_by_construction() -> None:
    net = keyed_masks(_net(), SEED)
    x = _data()
    ids = torch.arange(8)
    _, g_plain, _ = _run(net, x, ids)
    xc = x.clone().requires_grad_(True)
    with mask_context(step=3, sample_ids=ids):
        torch.manual_seed(123)  # the global RNG is irrelevant, and its state is not restored
        out = checkpoint(net, xc, use_reentrant=False, preserve_rng_state=False)
    torch.manual_seed(999)
    with mask_context(step=3, sample_ids=ids):
        out.sum().backward()
    assert torch.equal(xc.grad, g_plain)


def test_vmap_over_samples_equals_the_batch() -> None:
    x = torch.randn(6, 8, 3, 3)
    ids = torch.tensor([3, 1, 4, 1, 5, 9])
    batch = spatial_dropout(x, 0.5, key=MaskKey(2, 7, 11, ids))

    def one(xi: torch.Tensor, sid: torch.Tensor) -> torch.Tensor:
        return spatial_dropout(xi.unsqueeze(0), 0.5, key=MaskKey(2, 7, 11, sid.unsqueeze(0))).squeeze(0)

    assert torch.equal(torch.func.vmap(one)(x, ids), batch)
    # vmap over steps (a batched step, unbatched ids): each step's numbers, as called one by one
    steps = torch.func.vmap(lambda st: keyed_uniform(MaskKey(2, st, 11, ids), 5))(torch.arange(3))
    assert all(torch.equal(steps[s], keyed_uniform(MaskKey(2, s, 11, ids), 5)) for s in range(3))
    # a keyed layer under vmap: the masks come from the context, the same for every vmapped copy
    m = keyed_masks(SpatialDropout2d(0.5), 2)
    xs = torch.ones(3, 6, 8, 2, 2)
    with mask_context(step=7, sample_ids=ids):
        ys = torch.func.vmap(m)(xs)
        assert all(torch.equal(ys[i], m(xs[0])) for i in range(3))


def test_keyed_normal_rows_follow_samples_and_are_standard_normal() -> None:
    from spatialdrop import keyed_normal

    ids = torch.arange(2000)
    z = keyed_normal(MaskKey(9, 1, 2, ids), 50)
    assert z.shape == (2000, 50)
    assert z.dtype == torch.float32
    assert torch.equal(keyed_normal(MaskKey(9, 1, 2, ids[7:9]), 50), z[7:9])
    u = keyed_uniform(MaskKey(9, 1, 2, ids[:3]), 100)
    expected = torch.sqrt(-2 * torch.log(u[:, 0::2].clamp_min(1e-7))) * torch.cos(
        6.283185307179586 * u[:, 1::2]
    )
    assert torch.equal(z[:3], expected)
    # P(|z| < 1) of a standard normal is 0.682689; P(z < 0) is 1/2
    assert_binomial(int((z.abs() < 1).sum()), z.numel(), 0.682689492, "|z| < 1")
    assert_binomial(int((z < 0).sum()), z.numel(), 0.5, "z < 0")


def test_benchmark_quick_run(capsys: pytest.CaptureFixture[str]) -> None:
    from spatialdrop.cli import main

    argv = ["bench", "--suite", "keyed", "--quick", "--repeats", "1", "--format", "markdown", "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.count("| `spatial_dropout(x, p, key=key)` |") == 2
    assert table.count("| `spatial_dropout(x, p)` |") == 2


# --- real models under every wrapper (the `models` environment) -----------------------------

WRAP_STEPS = 2
WRAP_BATCH = 4


def _real_model(name: str) -> nn.Module:
    """A timm ViT with converted DropPath, or a torchvision ResNet-18 with SpatialDropout2d added
    after every conv; the same weights in every process. The ResNet's BatchNorm layers stay in
    eval mode (a rank's BatchNorm would see only its part of the batch)."""
    import spatialdrop as sd

    torch.manual_seed(0)
    if name == "vit":
        import timm

        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, drop_path_rate=0.3, num_classes=4
        )
        return sd.convert_dropout(model).train()
    import torchvision

    model = sd.add_dropout(torchvision.models.resnet18(weights=None, num_classes=4))
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def _blocks(name: str, model: nn.Module) -> nn.Module:
    """The container of the model's residual blocks (a ModuleList or Sequential)."""
    return model.blocks if name == "vit" else model.layer2  # type: ignore[return-value]


def _wrap_real(name: str, how: str, mesh: object = None) -> nn.Module:
    """The real model wrapped as ``how`` says: words joined by ``+``, applied inside out."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    model = _real_model(name)
    parts = how.split("+")
    blocks = _blocks(name, model)
    if "checkpoint" in parts:
        block_type = type(blocks[1])
        apply_activation_checkpointing(model, check_fn=lambda m: type(m) is block_type)
    if "compile" in parts:  # one block compiled, and checkpointed as the others if asked
        blocks[1] = torch.compile(blocks[1], backend="aot_eager")
    if "fsdp2" in parts:
        from torch.distributed.fsdp import fully_shard

        for i in range(len(blocks)):
            fully_shard(blocks[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
    if "ddp" in parts:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    return model


def _train_real(model: nn.Module, rank: int, world: int) -> list[float]:
    """``WRAP_STEPS`` keyed SGD steps on a fixed global batch; the batch's mean loss at each."""
    import torch.distributed as dist

    import spatialdrop as sd

    keyed_masks(model, SEED)  # after wrapping
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WRAP_STEPS, WRAP_BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (WRAP_STEPS, WRAP_BATCH), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    local = WRAP_BATCH // world
    losses = []
    for step in range(WRAP_STEPS):
        part = slice(rank * local, (rank + 1) * local)
        ids = step * WRAP_BATCH + torch.arange(WRAP_BATCH)[part]
        opt.zero_grad()
        with sd.mask_context(step=step, sample_ids=ids):
            loss = F.cross_entropy(model(x[step, part]), y[step, part])
            loss.backward()  # inside the context: checkpointed blocks recompute with the same key
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
    return losses


WRAPPED_ONE = ["eager", "compile", "checkpoint", "checkpoint+compile"]
WRAPPED_WORLD = ["ddp", "ddp+checkpoint+compile", "fsdp2", "fsdp2+checkpoint"]


def _real_wrapped_worker(rank: int, world: int) -> dict[str, list[float]]:
    import warnings as w

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    with w.catch_warnings():
        w.simplefilter("ignore")  # timm's p=0 nn.Dropout layers stay unkeyed (a warning says so)
        for name in ("vit", "resnet"):
            for i, how in enumerate(WRAPPED_ONE):
                if i % world == rank:  # the one-process runs, shared out between the ranks
                    out[f"{name} {how}"] = _train_real(_wrap_real(name, how), 0, 1)
            for how in WRAPPED_WORLD:
                losses = _train_real(_wrap_real(name, how, mesh), rank, world)
                if rank == 0:
                    out[f"{name} {how}"] = losses
    return out


@pytest.mark.models
@pytest.mark.slow
def test_real_models_train_alike_under_every_wrapper(tmp_path: Path) -> None:
    ranks = run_world(_real_wrapped_worker, 2, tmp_path, timeout_s=600.0)
    got = {k: v for r in ranks for k, v in r.items()}
    differ = {}
    for name in ("vit", "resnet"):
        want = torch.tensor(got[f"{name} eager"])
        for how in WRAPPED_ONE[1:] + WRAPPED_WORLD:
            losses = torch.tensor(got[f"{name} {how}"])
            if not torch.allclose(losses, want, rtol=1e-4, atol=1e-5):
                differ[f"{name} {how}"] = (losses.tolist(), want.tolist())
    assert not differ, f"keyed losses (wrapped, eager) that differ: {differ}"
