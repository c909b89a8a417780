"""Run a test's worker in ``world`` processes (gloo on loopback, CPU), once, with a hard timeout.

One spawn per world size runs every case of a test module (starting a process and importing torch
costs seconds on the 2-core CI machine; a case costs milliseconds). Each rank returns a picklable
result; a rank that raises writes its traceback, and a hung run is killed and fails.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, out_dir: str, worker: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        try:
            result = worker(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # the result is written and the group destroyed: leave without the interpreter's teardown, where
    # a C++ thread of the process group once aborted a rank ("terminate called without an active
    # exception", exit code -6) after its work was done
    os._exit(0)


def run_world(
    worker: Callable[..., Any], world: int, out_dir: Path, *args: Any, timeout_s: float = 300.0
) -> list[Any]:
    """``[worker(rank, world, *args) for rank in range(world)]``, each in its own process.

    ``worker`` must be a module-level function (the processes are spawned). The process group
    is set up before it runs and torn down after.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, str(out_dir), worker, args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    errors = "\n".join(f.read_text() for f in sorted(out_dir.glob("*.err")))
    if hung:
        pytest.fail(f"{world} workers still running after {timeout_s} s (killed)\n{errors}")
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"exit codes {codes}\n{errors}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
