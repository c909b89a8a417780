"""Keyed masks under data parallelism: the same training whatever the world size and the tools.

A small CNN with filter dropout, SpatialDropout2d, DropBlock2d, DropPath and Gaussian dropout,
driven by a DropSchedule, trains 10 steps on a global batch of 8 (sample ids: dataset indices). Claims:

- DDP on 1, 2 and 4 ranks and FSDP2 (``fully_shard``) on 1 and 2 ranks give the loss of one
  process at every step (and its parameters at the end), up to the order of float sums;
- elastic resume: 5 steps on 2 ranks (FSDP2), a distributed checkpoint (model, optimizer,
  DropSchedule state and step), then 5 steps on 1 process = 10 uninterrupted steps;
- gradient accumulation: micro-batches give the steps of one batch;
- activation checkpointing with ``preserve_rng_state=False``: the gradients of the plain model.

Ranks are seeded differently after the model is built: keyed masks do not depend on it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import spatialdrop as sd
from distributed import run_world

SEED = 4242
STEPS = 10
BATCH = 8
DATA_X = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(5))
DATA_Y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(6))


class Block(nn.Module):
    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.path = sd.DropPath(0.2)
        self.checkpointed = checkpointed

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.path(self.conv(x).relu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            return x + checkpoint(self.branch, x, use_reentrant=False, preserve_rng_state=False)
        return x + self.branch(x)


class Net(nn.Module):
    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        self.stem = sd.filter_dropout(nn.Conv2d(3, 8, 3, padding=1), 0.1)
        self.drop = sd.SpatialDropout2d(0.2)
        self.block = sd.DropBlock2d(0.2, 3)
        self.res = Block(checkpointed)
        self.gauss = sd.GaussianSpatialDropout2d(0.2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.drop(self.stem(x).relu()))
        h = self.gauss(self.res(h))
        return self.head(h.mean((2, 3)))


def build(checkpointed: bool = False, mesh: Any = None) -> tuple[Net, torch.optim.Optimizer, sd.DropSchedule]:
    """The model, its optimizer and schedule; with a ``mesh``, the model is sharded by FSDP2 first."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same initial weights in every process
        net = Net(checkpointed)
    sd.keyed_masks(net, SEED)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(net, mesh=mesh)  # before the optimizer is built, as FSDP2 wants
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    sched = sd.DropSchedule(net, target_p=0.2, total_steps=STEPS, start_p=0.05)
    return net, opt, sched


def batch_ids(step: int) -> torch.Tensor:
    """The dataset indices of a step's global batch."""
    return (step * BATCH + torch.arange(BATCH)) % DATA_X.shape[0]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: sd.DropSchedule,
    steps: range,
    rank: int = 0,
    world: int = 1,
    micro: int = 1,
) -> list[float]:
    """Train ``steps``; each rank takes its contiguous part of the global batch, in ``micro`` pieces.

    Returns the global batch's mean loss at each step.
    """
    import torch.distributed as dist

    losses = []
    local = BATCH // world
    for step in steps:
        sched.step(step)
        ids = batch_ids(step)[rank * local : (rank + 1) * local]
        opt.zero_grad()
        total = torch.zeros(())
        for part in ids.chunk(micro):
            with sd.mask_context(step=step, sample_ids=part):
                loss = F.cross_entropy(model(DATA_X[part]), DATA_Y[part]) * (len(part) / local)
            loss.backward()
            total += loss.detach()
        opt.step()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
    return losses


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = full.detach().clone()
    return out


def _worker(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    torch.manual_seed(1000 + rank)  # keyed masks do not read it
    net, opt, sched = build()
    ddp = DistributedDataParallel(net)
    out["ddp"] = (train(ddp, opt, sched, range(STEPS), rank, world), _params(net))
    if world > 2:
        return out
    mesh = init_device_mesh("cpu", (world,))
    net, opt, sched = build(mesh=mesh)
    out["fsdp"] = (train(net, opt, sched, range(STEPS), rank, world), _params(net))
    if world == 2:  # elastic: the first half of the run, then a distributed checkpoint
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        net, opt, sched = build(mesh=mesh)
        half = STEPS // 2
        out["first_half"] = train(net, opt, sched, range(half), rank, world)
        model_state, optim_state = get_state_dict(net, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=ckpt)
        if rank == 0:
            torch.save({"sched": sched.state_dict(), "step": half}, Path(ckpt) / "schedule.pt")
    return out


_RESULTS: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Any:
    def get(world: int) -> tuple[list[dict[str, Any]], Path]:
        ckpt = tmp_path_factory.getbasetemp() / f"parallel-ckpt{world}"
        if world not in _RESULTS:
            out = tmp_path_factory.mktemp(f"parallel{world}")
            _RESULTS[world] = run_world(_worker, world, out, str(ckpt), timeout_s=300.0)
        return _RESULTS[world], ckpt

    return get


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """10 uninterrupted steps in this process, one thread (the workers' setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, opt, sched = build()
        return train(net, opt, sched, range(STEPS)), _params(net)
    finally:
        torch.set_num_threads(threads)


def _close(got: list[float], want: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)


def _worlds(*sizes: int) -> list[Any]:
    # 2 ranks in the default run; 1 and 4 in the slow subset (each spawn costs 20-60 s on 2 cores)
    return [pytest.param(w, marks=[] if w == 2 else [pytest.mark.slow], id=f"world{w}") for w in sizes]


@pytest.mark.parametrize("world", _worlds(1, 2, 4))
def test_ddp_same_loss_at_every_step(results: Any, reference: Any, world: int) -> None:
    ranks, _ = results(world)
    want_losses, want_params = reference
    for r in ranks:
        losses, params = r["ddp"]
        _close(losses, want_losses)
        for name, value in want_params.items():
            torch.testing.assert_close(params[name], value, rtol=1e-4, atol=1e-5)
    assert len(set(want_losses)) == STEPS  # it trains: no two steps alike


@pytest.mark.parametrize("world", _worlds(1, 2))
def test_fsdp2_same_loss_at_every_step(results: Any, reference: Any, world: int) -> None:
    ranks, _ = results(world)
    want_losses, want_params = reference
    for r in ranks:
        losses, params = r["fsdp"]
        _close(losses, want_losses)
        for name, value in want_params.items():
            torch.testing.assert_close(params[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world", _worlds(2))
def test_elastic_resume_on_another_world_size(results: Any, reference: Any, world: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ranks, ckpt = results(world)
    want_losses, want_params = reference
    half = STEPS // 2
    _close(ranks[0]["first_half"], want_losses[:half])
    net, opt, sched = build()  # one process, no process group
    model_state, optim_state = get_state_dict(net, opt)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(Path(ckpt) / "schedule.pt")
    sched.load_state_dict(extra["sched"])
    assert [m.p for _, m in sched.modules] == pytest.approx([0.05 + 0.15 * 4 / STEPS] * 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        second = train(net, opt, sched, range(extra["step"], STEPS))
    finally:
        torch.set_num_threads(threads)
    _close(second, want_losses[half:])
    for name, value in _params(net).items():
        torch.testing.assert_close(value, want_params[name], rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_equals_one_batch(reference: Any) -> None:
    want_losses, want_params = reference
    net, opt, sched = build()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = train(net, opt, sched, range(STEPS), micro=4)  # 4 micro-batches of 2
    finally:
        torch.set_num_threads(threads)
    _close(losses, want_losses)
    for name, value in _params(net).items():
        torch.testing.assert_close(value, want_params[name], rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_without_rng_state_gives_the_plain_gradients() -> None:
    plain, _, _ = build()
    ckpt, _, _ = build(checkpointed=True)
    grads = []
    for net in (plain, ckpt):
        ids = batch_ids(0)
        with sd.mask_context(step=3, sample_ids=ids):
            torch.manual_seed(7)  # the global RNG: irrelevant, and not restored for the recompute
            loss = F.cross_entropy(net(DATA_X[ids]), DATA_Y[ids])
        torch.manual_seed(8)
        with sd.mask_context(step=3, sample_ids=ids):  # the recompute runs inside backward
            loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert ckpt.res.checkpointed
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name
    assert grads[0]["res.conv.weight"].abs().sum() > 0
