"""Two processes, torch.distributed (gloo on loopback), DistributedDataParallel, a few steps.

What it shows: gradients and parameters stay in sync across ranks while each rank draws its own
dropout masks (unseeded processes, or seeded with ``seed + rank``); ranks seeded alike draw the
same masks; the schedule's rate agrees across ranks; a ResidualDropPath whose whole local batch
is dropped on one rank (its branch not called there) trains with ``find_unused_parameters=True``.
The run has a hard timeout: a hung process fails the test instead of hanging it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed import run_world
from spatialdrop import (
    DropBlock2d,
    DropPath,
    DropSchedule,
    ResidualDropPath,
    SpatialDropout2d,
    filter_dropout,
)

WORLD = 2
STEPS = 3
TIMEOUT_S = 90.0  # the whole run; it takes about 10 s on 2 cores
MODES = ("default", "same", "per_rank")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = filter_dropout(nn.Conv2d(3, 16, 3, padding=1), 0.5)
        self.drop = SpatialDropout2d(0.5)
        self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.block = DropBlock2d(0.5, 3)
        self.path = DropPath(0.5)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.stem(x))
        h = h + self.path(self.block(self.branch(h)))
        return self.head(h.mean((2, 3)))


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _run_mode(rank: int, mode: str) -> dict[str, list[torch.Tensor]]:
    if mode == "same":
        torch.manual_seed(123)
    elif mode == "per_rank":
        torch.manual_seed(123 + rank)  # the recommended way: a different stream per rank
    # "default": no seeding; each process starts from its own random seed
    net = Net()
    model = DDP(net)  # broadcasts rank 0's parameters: the init needs no common seed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DropSchedule(model, target_p=0.5, total_steps=2, start_p=0.3)
    rec: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("filters", "channels", "blocks", "paths", "local", "grads", "params", "rates")
    }
    drop = net.stem.parametrizations.weight[0]
    net.stem.register_forward_pre_hook(lambda m, a: rec["filters"].append(drop.current_mask().clone()))
    net.drop.register_forward_hook(lambda m, a, out: rec["channels"].append((out == 0).flatten(2).all(-1)))
    net.block.register_forward_hook(lambda m, a, out: rec["blocks"].append(out == 0))
    net.path.register_forward_hook(lambda m, a, out: rec["paths"].append((out == 0).flatten(1).all(-1)))
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of data
    for step in range(STEPS):
        sched.step(step)
        rec["rates"].append(torch.tensor([m.p for _, m in sched.modules]))
        x = torch.randn(8, 3, 6, 6, generator=data)
        target = torch.randint(0, 3, (8,), generator=data)
        if step == 0:  # local gradients, without the all-reduce, differ across ranks
            with model.no_sync():
                nn.functional.cross_entropy(model(x), target).backward()
            rec["local"].append(_flat_grads(net).clone())
            opt.zero_grad()
            for k in ("filters", "channels", "blocks", "paths"):
                rec[k].pop()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        rec["grads"].append(_flat_grads(net).clone())
        opt.step()
        rec["params"].append(torch.cat([p.detach().flatten() for p in net.parameters()]).clone())
    return rec


def _run_residual(rank: int) -> dict[str, list[torch.Tensor]]:
    """Step 1: rank 0 drops its whole batch (p = 1), so its branch gets no gradient; rank 1 keeps all."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), ResidualDropPath(nn.Linear(4, 4), 0.0), nn.Linear(4, 2))
    model = DDP(net, find_unused_parameters=True)  # without it: a RuntimeError at the step after
    rec: dict[str, list[torch.Tensor]] = {"local": [], "grads": []}
    data = torch.Generator().manual_seed(2000 + rank)
    for step in range(STEPS):
        net[1].p = 1.0 if (rank == 0 and step == 1) else 0.0
        x = torch.randn(3, 4, generator=data)
        with model.no_sync():  # this rank's own gradients (None where the branch did not run)
            model(x).sum().backward()
        rec["local"].append(torch.cat([_or_zeros(p) for p in net.parameters()]))
        model.zero_grad()
        model(x).sum().backward()
        rec["grads"].append(torch.cat([_or_zeros(p) for p in net.parameters()]))
        model.zero_grad()
    return rec


def _or_zeros(p: torch.Tensor) -> torch.Tensor:
    return (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().clone()


def _worker(rank: int, world: int) -> dict:
    assert world == WORLD
    seed = torch.initial_seed()  # before any seeding: the process's own random seed
    result = {mode: _run_mode(rank, mode) for mode in MODES}
    result["residual"] = _run_residual(rank)
    result["seed"] = seed  # type: ignore[assignment]
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_world(_worker, WORLD, tmp_path_factory.mktemp("ddp"), timeout_s=TIMEOUT_S)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    assert len(a) == len(b)
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_and_parameters_stay_in_sync(results: list[dict], mode: str) -> None:
    r0, r1 = results[0][mode], results[1][mode]
    assert len(r0["grads"]) == STEPS
    assert not torch.allclose(r0["local"][0], r1["local"][0])  # what each rank computed alone
    assert _same(r0["grads"], r1["grads"])  # what DDP all-reduced
    assert _same(r0["params"], r1["params"])
    assert not torch.equal(r0["params"][0], r0["params"][-1])  # it did train


@pytest.mark.parametrize("mode", ["default", "per_rank"])
def test_ranks_draw_their_own_masks(results: list[dict], mode: str) -> None:
    r0, r1 = results[0][mode], results[1][mode]
    for layer in ("filters", "channels", "blocks", "paths"):
        assert len(r0[layer]) == STEPS
        # 16 filters, 8 x 16 channels, 8 samples, p in [0.3, 0.5]: all STEPS masks equal by chance
        # with probability below (0.7**2 + 0.3**2)**(8 * STEPS) = 3e-6 (for the 8 samples)
        assert not _same(r0[layer], r1[layer]), layer
    for layer in ("filters", "channels", "blocks"):  # and new masks from step to step
        assert len({tuple(m.flatten().tolist()) for m in r0[layer]}) > 1, layer


def test_ranks_seeded_alike_draw_the_same_masks(results: list[dict]) -> None:
    # the pitfall the README warns about: torch.manual_seed(seed) on every rank
    r0, r1 = results[0]["same"], results[1]["same"]
    for layer in ("filters", "channels", "blocks", "paths"):
        assert _same(r0[layer], r1[layer]), layer


def test_unseeded_processes_start_from_different_seeds(results: list[dict]) -> None:
    assert results[0]["seed"] != results[1]["seed"]


@pytest.mark.parametrize("mode", MODES)
def test_schedule_agrees_across_ranks(results: list[dict], mode: str) -> None:
    r0, r1 = results[0][mode], results[1][mode]
    assert _same(r0["rates"], r1["rates"])
    expected = [0.3, 0.4, 0.5]
    for step, rates in enumerate(r0["rates"]):
        assert torch.allclose(rates, torch.full((4,), expected[step], dtype=rates.dtype), atol=1e-12)


def test_residual_drop_path_with_a_wholly_dropped_local_batch(results: list[dict]) -> None:
    """find_unused_parameters=True: the rank whose branch did not run contributes zeros to the mean."""
    r0, r1 = results[0]["residual"], results[1]["residual"]
    branch = slice(20, 40)  # the branch's weight (16) and bias (4) follow the first Linear's 20
    assert not r0["local"][1][branch].any()  # rank 0 dropped all: no gradient for its branch
    assert r1["local"][1][branch].abs().sum() > 0
    for step in range(STEPS):
        assert torch.equal(r0["grads"][step], r1["grads"][step])
        mean = (r0["local"][step] + r1["local"][step]) / 2
        torch.testing.assert_close(r0["grads"][step], mean, rtol=1e-6, atol=1e-7)
