"""Every script in examples/ runs as its docstring says (a user copies these)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import spatialdrop

ROOT = Path(__file__).resolve().parents[1]
SRC = str(Path(spatialdrop.__file__).parent.parent)


def test_torchrun_keyed_two_processes_give_the_one_process_loss_curve() -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*cmd, str(ROOT / "examples" / "torchrun_keyed.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("step  loss (2 processes)  loss (1 process)"), out.stdout
    assert len(lines) == 1 + 8 + 1, out.stdout  # a header, 8 steps, the verdict
    assert lines[-1].startswith("loss curves equal: largest relative difference"), out.stdout
    curve = [float(line.split()[1]) for line in lines[1:-1]]
    assert len(set(curve)) == len(curve)  # the model trains: every step's loss differs
