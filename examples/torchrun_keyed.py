"""Keyed masks under DDP: the loss curve of 2 processes is the loss curve of 1.

Run it with::

    torchrun --standalone --nproc-per-node 2 examples/torchrun_keyed.py

(``python examples/torchrun_keyed.py`` runs it as one process.) Every rank trains a small CNN
with spatialdrop layers under ``DistributedDataParallel`` (gloo, CPU), reading its part of each
global batch through a ``DistributedSampler``; each sample's masks are keyed by its dataset
index. Rank 0 then trains the same model in one process on the same global batches and prints
both loss curves: they agree up to the order of float sums (the masks are the same bits). The
script exits with status 1 if they do not.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import spatialdrop as sd

SEED = 1234  # the keyed masks' seed: the same on every rank
GLOBAL_BATCH = 16
EPOCHS = 2


class Indexed(Dataset):
    """Images, labels and each sample's dataset index (its id for the keyed masks)."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 12, 12, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), sd.SpatialDropout2d(0.1))
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), sd.DropBlock2d(0.1, 3))
        self.path = sd.DropPath(0.2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.path(self.block(h)))


def build() -> tuple[nn.Module, torch.optim.Optimizer, sd.DropSchedule]:
    torch.manual_seed(0)  # the same initial weights for both runs (DDP would broadcast rank 0's)
    net = sd.keyed_masks(Net(), seed=SEED)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = sd.DropSchedule(net, target_p=0.2, total_steps=EPOCHS * 64 // GLOBAL_BATCH)
    return net, opt, sched


def train(model: nn.Module, opt: torch.optim.Optimizer, sched: sd.DropSchedule, batches: list) -> list[float]:
    """One optimizer step per global batch; returns the mean loss of each global batch."""
    losses = []
    for step, (x, y, idx) in enumerate(batches):
        sched.step(step)
        with sd.mask_context(step=step, sample_ids=idx):  # idx: global ids, not positions
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
        opt.step()
        total = loss.detach().clone()
        if dist.is_initialized():  # the global batch's mean over equal local batches
            dist.all_reduce(total)
            total /= dist.get_world_size()
        losses.append(float(total))
    return losses


def local_batches(data: Dataset, rank: int, world: int) -> list:
    """The batches that ``rank`` of ``world`` reads: a DistributedSampler's part of every global batch."""
    batches = []
    for epoch in range(EPOCHS):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        batches += list(DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler))
    return batches


def main() -> int:
    torch.set_num_threads(1)
    launched = "WORLD_SIZE" in os.environ
    if launched:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    data = Indexed()
    net, opt, sched = build()
    model = DistributedDataParallel(net) if launched else net
    curve = train(model, opt, sched, local_batches(data, rank, world))
    if launched:
        # DDP's reducer holds the process group: free it first, so that the group's gloo threads
        # end here and not in the interpreter's teardown, where they can abort the process
        # ("terminate called without an active exception") after the work is done
        del model
        gc.collect()
        dist.destroy_process_group()
    if rank != 0:
        return 0
    # the same global batches in one process: every rank's part of each step, concatenated
    parts = [local_batches(data, r, world) for r in range(world)]
    whole = [[torch.cat(t) for t in zip(*step)] for step in zip(*parts)]
    net, opt, sched = build()
    reference = train(net, opt, sched, whole)
    print(f"step  loss ({world} process{'es' if world > 1 else ''})  loss (1 process)")
    for step, (a, b) in enumerate(zip(curve, reference)):
        print(f"{step:4d}  {a:.7f}{'':13s}{b:.7f}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(curve, reference))
    same = worst <= 1e-5
    verdict = "equal" if same else "DIFFERENT"
    print(f"loss curves {verdict}: largest relative difference {worst:.1e} over {len(curve)} steps")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
