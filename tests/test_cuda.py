"""Every public layer on a CUDA device: forward and backward in every float dtype, keyed masks equal
to the CPU's bit for bit, no host synchronisation, and the fused Triton DropBlock.

Run by ``benchmarks/gpu_check.py`` (``pytest -m cuda``). Every test skips, with the reason, without
CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import spatialdrop as sd
from spatialdrop import MaskKey, keyed_masks, mask_context

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run benchmarks/gpu_check.sh)"
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (name, factory, input shape): every public layer that drops activations
LAYERS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("SpatialDropout1d", lambda: sd.SpatialDropout1d(0.3), (4, 8, 16)),
    ("SpatialDropout2d", lambda: sd.SpatialDropout2d(0.3), (4, 8, 6, 6)),
    ("SpatialDropout3d", lambda: sd.SpatialDropout3d(0.3), (4, 8, 3, 4, 4)),
    ("SpatialDropout2d-last", lambda: sd.SpatialDropout2d(0.3, channel_dim=-1), (4, 6, 6, 8)),
    ("AlphaSpatialDropout2d", lambda: sd.AlphaSpatialDropout2d(0.3), (4, 8, 6, 6)),
    ("GaussianSpatialDropout2d", lambda: sd.GaussianSpatialDropout2d(0.3), (4, 8, 6, 6)),
    ("DropPath", lambda: sd.DropPath(0.3), (4, 8, 6, 6)),
    ("DropBlock1d", lambda: sd.DropBlock1d(0.3, 5), (4, 8, 32)),
    ("DropBlock2d", lambda: sd.DropBlock2d(0.2, 3), (4, 8, 12, 12)),
    ("DropBlock2d-even-big", lambda: sd.DropBlock2d(0.2, (4, 9)), (4, 8, 7, 7)),
    ("DropBlock2d-shared", lambda: sd.DropBlock2d(0.2, 3, shared_channels=True), (4, 8, 12, 12)),
    ("DropBlock2d-valid", lambda: sd.DropBlock2d(0.2, 3, seeding="valid"), (4, 8, 12, 12)),
    ("DropBlock2d-realized", lambda: sd.DropBlock2d(0.2, 3, scale="realized"), (4, 8, 12, 12)),
    ("DropBlock2d-none", lambda: sd.DropBlock2d(0.2, 3, scale="none"), (4, 8, 12, 12)),
    ("DropBlock2d-last", lambda: sd.DropBlock2d(0.2, 3, channel_dim=-1), (4, 12, 12, 8)),
    ("DropBlock3d", lambda: sd.DropBlock3d(0.2, 3), (2, 4, 6, 6, 6)),
]
IDS = [name for name, _, _ in LAYERS]
# keyed Gaussian noise goes through log/sqrt/cos, whose last bits differ between devices
INEXACT = {"AlphaSpatialDropout2d", "GaussianSpatialDropout2d"}


def _fwd_bwd(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "factory", "shape"), LAYERS, ids=IDS)
def test_forward_backward_every_dtype(
    name: str, factory: Callable[[], nn.Module], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    layer = factory().cuda()
    x = torch.randn(shape, device="cuda", dtype=dtype)
    y, g = _fwd_bwd(layer, x)
    assert y.dtype == dtype
    assert y.device.type == "cuda"
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    if name not in INEXACT:  # the gradient of a masking layer is the output over the input
        torch.testing.assert_close(g * x, y, rtol=1e-2, atol=1e-2)
    layer.eval()
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize(("name", "factory", "shape"), LAYERS, ids=IDS)
def test_keyed_cpu_equals_cuda(name: str, factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    ids = torch.arange(10, 10 + shape[0])
    outs = []
    for device in ("cpu", "cuda"):
        net = keyed_masks(nn.Sequential(factory()), 1234).to(device)
        with mask_context(step=7, sample_ids=ids.to(device)):
            outs.append(_fwd_bwd(net, x.to(device)))
    (y_cpu, g_cpu), (y_gpu, g_gpu) = outs
    if name in INEXACT:
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(y_gpu.cpu(), y_cpu)
        assert torch.equal(g_gpu.cpu(), g_cpu)


@pytest.mark.parametrize(("name", "factory", "shape"), LAYERS, ids=IDS)
@pytest.mark.parametrize("keyed", [False, True])
def test_no_host_sync(
    name: str, factory: Callable[[], nn.Module], shape: tuple[int, ...], keyed: bool
) -> None:
    net = nn.Sequential(factory()).cuda()
    if keyed:
        keyed_masks(net, 99)
    x = torch.randn(shape, device="cuda", requires_grad=True)
    ids = torch.arange(shape[0], device="cuda")
    step = torch.tensor(3, device="cuda")
    with mask_context(step=step, sample_ids=ids):
        _fwd_bwd(net, x)  # warm-up: first-call caches (thresholds, kernels) may copy to the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _fwd_bwd(net, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_filter_dropout_on_cuda() -> None:
    torch.manual_seed(0)
    conv = sd.filter_dropout(nn.Conv2d(3, 16, 3).cuda(), 0.5)
    x = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()


# --- the fused Triton DropBlock ------------------------------------------------------------

triton_kernels = pytest.importorskip(
    "spatialdrop._dropblock.triton_kernels", reason="spatialdrop's Triton module is missing"
)


def _triton_or_skip() -> None:
    from spatialdrop._dropblock.ops import triton_ready

    if not triton_ready(torch.ones(1, device="cuda")):
        pytest.skip("triton is not installed (pip install spatialdrop[triton]) or SPATIALDROP_BACKEND=torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(
    ("shape", "blocks", "seeding"),
    [((4, 8, 40), (7,), "uniform"), ((4, 8, 28, 28), (7, 7), "uniform"), ((4, 8, 14, 15), (3, 4), "valid"),
     ((2, 4, 8, 9, 10), (3, 3, 2), "uniform"), ((2, 4, 5, 5), (7, 7), "uniform")],
)  # fmt: skip
def test_triton_keyed_equals_cpu(
    shape: tuple[int, ...], blocks: tuple[int, ...], seeding: str, shared: bool, dtype: torch.dtype
) -> None:
    _triton_or_skip()
    from spatialdrop._dropblock.calibration import uniform_gamma, valid_gamma
    from spatialdrop.functional import drop_block

    p = 0.2
    gamma = uniform_gamma(p, blocks) if seeding == "uniform" else valid_gamma(p, shape[2:], blocks)
    x = torch.randn(shape, dtype=dtype)
    key = MaskKey(1, 2, 3, torch.arange(shape[0]))
    ref = drop_block(x, p, blocks, seeding=seeding, shared_channels=shared, key=key)
    gkey = MaskKey(1, 2, 3, key.sample_ids.cuda())
    y = triton_kernels.triton_drop_block(
        x.cuda(), gamma=gamma, blocks=blocks, seeding=seeding, shared=shared, p=p, key=gkey
    )
    assert torch.equal(y.cpu(), ref)


def test_triton_channels_last_grad_and_saved_bytes() -> None:
    _triton_or_skip()
    from spatialdrop._dropblock.calibration import uniform_gamma

    x = torch.randn(8, 16, 20, 20, device="cuda").to(memory_format=torch.channels_last).requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = triton_kernels.triton_drop_block(x, gamma=uniform_gamma(0.1, (5, 5)), blocks=(5, 5), p=0.1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert sum(saved) <= 8 * 1024 + 64  # the seed words and the thresholds: no per-element tensor
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    assert torch.equal(x.grad, (y != 0).float() * y.new_tensor(1 / 0.9))


def test_triton_op_under_compile_fullgraph() -> None:
    _triton_or_skip()
    from spatialdrop._dropblock.calibration import uniform_gamma

    key = MaskKey(5, 6, 7, torch.arange(4, device="cuda"))
    gamma = uniform_gamma(0.1, (7, 7))

    def f(x: torch.Tensor) -> torch.Tensor:
        return triton_kernels.triton_drop_block(x, gamma=gamma, blocks=(7, 7), p=0.1, key=key)

    x = torch.randn(4, 8, 28, 28, device="cuda")
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_triton_unkeyed_rate_and_no_sync() -> None:
    _triton_or_skip()
    from spatialdrop._dropblock.calibration import uniform_gamma

    p = 0.1
    x = torch.ones(64, 64, 28, 28, device="cuda")
    kw = {"gamma": uniform_gamma(p, (7, 7)), "blocks": (7, 7), "p": p}
    triton_kernels.triton_drop_block(x, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = triton_kernels.triton_drop_block(x, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rate = (y == 0).float().mean(dim=(0, 1)).cpu()  # per position, over 4096 maps
    for i, j in ((0, 0), (0, 14), (14, 14), (27, 27)):
        assert abs(float(rate[i, j]) - p) < 5 * (p * (1 - p) / 4096) ** 0.5


def test_residual_drop_path_keyed_cpu_equals_cuda_and_reads_the_kept_count_once() -> None:
    """The branch runs on the kept rows: their count is read on the host, one synchronisation."""
    import warnings

    x = torch.randn(16, 5, 8)
    ids = torch.arange(100, 116)
    outs = []
    for device in ("cpu", "cuda"):
        net = keyed_masks(nn.Sequential(sd.ResidualDropPath(nn.Tanh(), 0.4)), 1234).to(device)
        with mask_context(step=7, sample_ids=ids.to(device)):
            outs.append(_fwd_bwd(net, x.to(device)))
    (y_cpu, g_cpu), (y_gpu, g_gpu) = outs
    kept = (y_cpu != x).flatten(1).any(1)
    assert 0 < int(kept.sum()) < 16
    assert torch.equal((y_gpu.cpu() != x).flatten(1).any(1), kept)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-6, atol=1e-6)  # tanh: last-bit differences
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-6, atol=1e-6)
    net = keyed_masks(nn.Sequential(sd.ResidualDropPath(nn.Linear(8, 8), 0.4)), 99).cuda()
    xg = x.cuda().requires_grad_(True)
    with mask_context(step=torch.tensor(3, device="cuda"), sample_ids=ids.cuda()):
        _fwd_bwd(net, xg)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _fwd_bwd(net, xg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
