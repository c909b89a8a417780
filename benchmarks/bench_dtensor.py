"""The cost of a DTensor call: a layer on a DTensor against the same layer on its local shard.

Run on 2 gloo processes (CPU, one thread each):

    PYTHONPATH=src torchrun --standalone --nproc-per-node 2 benchmarks/bench_dtensor.py [--quick]

Each row times forward + ``backward(g)`` (a fresh gradient buffer every call) of one layer on a
DTensor of the global shape with the row's placement, and of the same layer on a plain tensor of
that rank's local shape, in the same mode: keyed (a key over the global batch / over the local
samples) or unkeyed (the DTensor call broadcasts the first rank's noise table; the plain call
draws from torch's generator alone). The two are interleaved round by round, the order
alternating, each call timed from a barrier (so that a wait in the broadcast is the call's own,
not the other rank's lag). A first row times DTensor's own ``x * 2.0`` the same way: what any DTensor op
costs over the local one. The table gives each one's median wall time on rank 0, the ratio of
the medians and of the best times, and the ratio of the calling thread's CPU times (which leaves
out waiting). Goal: ≤ 1.2. ``--tuned-malloc`` keeps freed memory for reuse (as ``spatialdrop
bench --tuned-malloc``). ``--nproc-per-node 1`` measures the DTensor plumbing alone (no
collective runs on a mesh of one rank).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import spatialdrop as sd
from spatialdrop import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuned_malloc import steady_malloc


def _times_two(x: torch.Tensor, p: float, key: Any = None) -> torch.Tensor:
    return x * 2.0


def _drop_block(x: torch.Tensor, p: float, key: Any = None) -> torch.Tensor:
    return F.drop_block(x, p, 7, key=key)


LAYERS: dict[str, Callable[..., torch.Tensor]] = {
    "x * 2.0 (DTensor's own op)": _times_two,
    "spatial_dropout": F.spatial_dropout,
    "gaussian_spatial_dropout": F.gaussian_spatial_dropout,
    "alpha_spatial_dropout": F.alpha_spatial_dropout,
    "drop_path": F.drop_path,
    "drop_block (block 7)": _drop_block,
}
GOAL = 1.2


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    """Wall time and this thread's CPU time of one call, from a barrier."""
    dist.barrier()  # the ranks start together, as other collectives of a training step keep them
    start, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - start, time.thread_time() - cpu


def _step(
    layer: Callable[..., torch.Tensor], x: torch.Tensor, g: torch.Tensor, key: Any
) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer(x, 0.1, key=key).backward(g)

    return run


Row = tuple[str, str, str, list[float], list[float]]  # layer, placement, mode, DTensor, local


def _medians(times: list[tuple[float, float]]) -> list[float]:
    """Median wall time, median CPU time, best wall time."""
    return [statistics.median(t[0] for t in times), statistics.median(t[1] for t in times), min(times)[0]]


def bench(shape: tuple[int, ...], rounds: int) -> list[Row]:
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(shape)
    g = torch.randn(shape)
    rows = []
    for name, layer in LAYERS.items():
        spatial = (Shard(2),) if layer is _drop_block else ()  # its blocks cross the shard borders
        for placement in (Shard(0), Shard(1), *spatial, Replicate()):
            dx = distribute_tensor(x, mesh, [placement], src_data_rank=None).requires_grad_(True)
            dg = distribute_tensor(g, mesh, [placement], src_data_rank=None)
            lx = dx.to_local().detach().clone().requires_grad_(True)
            lg = dg.to_local().clone()
            start = 0 if placement != Shard(0) else dist.get_rank() * lx.shape[0]
            for keyed in (True,) if layer is _times_two else (True, False):
                gkey = sd.MaskKey(1, 2, 3, torch.arange(shape[0])) if keyed else None
                lkey = sd.MaskKey(1, 2, 3, torch.arange(start, start + lx.shape[0])) if keyed else None
                dist_step, local_step = _step(layer, dx, dg, gkey), _step(layer, lx, lg, lkey)
                for _ in range(3):
                    dist_step()
                    local_step()
                dt, lt = [], []
                for r in range(rounds):
                    if r % 2 == 0:
                        dt.append(_timed(dist_step))
                        lt.append(_timed(local_step))
                    else:
                        lt.append(_timed(local_step))
                        dt.append(_timed(dist_step))
                mode = "—" if layer is _times_two else "keyed" if keyed else "unkeyed"
                rows.append((name, str(placement), mode, _medians(dt), _medians(lt)))
    return rows


def broadcast_ms(shape: tuple[int, ...], rounds: int) -> float:
    """Median wall time of the unkeyed calls' one collective alone: a broadcast of an (N, C) table
    from the first rank (on the one-dimensional mesh, the default group's broadcast)."""
    table = torch.zeros(shape[0], shape[1])
    times = [_timed(lambda: dist.broadcast(table, src=0))[0] for _ in range(rounds)]
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small shape and few rounds (a smoke run)")
    parser.add_argument("--tuned-malloc", action="store_true", help="glibc: no mmap per tensor, no trimming")
    parser.add_argument("--rounds", type=int, default=41, help="timed rounds per row (default: 41)")
    args = parser.parse_args(argv)
    tuned = args.tuned_malloc and steady_malloc(True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    shape = (8, 16, 14, 14) if args.quick else (32, 64, 56, 56)
    rounds = 5 if args.quick else args.rounds
    started = time.perf_counter()
    try:
        rows = bench(shape, rounds)
        bcast = broadcast_ms(shape, rounds)
    finally:
        world = dist.get_world_size()
        rank = dist.get_rank()
        dist.destroy_process_group()
    if rank != 0:
        return 0
    allocator = "tuned allocator" if tuned else "glibc's default allocator"
    print(f"DTensor call / the same layer on the local shard, fwd+bwd, global shape {shape},")
    print(f"{world} gloo processes, 1 thread each, {allocator},")
    print(f"median (and best) of {rounds} interleaved rounds on rank 0; cpu: the calling thread's CPU time\n")
    print("| layer | placement | mode | DTensor ms | local ms | ratio | ratio of bests | cpu ratio |")
    print("|---|---|---|---|---|---|---|---|")
    wall, best, cpu = [], [], []
    for name, placement, mode, d, local in rows:
        wall.append(d[0] / local[0])
        cpu.append(d[1] / local[1])
        best.append(d[2] / local[2])
        print(
            f"| {name} | {placement} | {mode} | {d[0] * 1e3:.2f} | {local[0] * 1e3:.2f} "
            f"| {wall[-1]:.2f} | {best[-1]:.2f} | {cpu[-1]:.2f} |"
        )
    print(f"\nthe unkeyed calls' broadcast of a {shape[:2]} table alone: {bcast:.2f} ms (median)")
    for what, ratios in (("wall", wall), ("best wall", best), ("cpu", cpu)):
        for mode in ("keyed", "unkeyed"):
            mine = [r for r, row in zip(ratios, rows) if row[2] == mode]
            met = sum(r <= GOAL for r in mine)
            verdict = "met" if met == len(mine) else "MISSED"
            print(
                f"goal DTensor / local <= {GOAL} ({what}, {mode}): {verdict}, {met} of {len(mine)} rows "
                f"within (median {statistics.median(mine):.2f}, worst {max(mine):.2f})"
            )
    print(f"elapsed {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
