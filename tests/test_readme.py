"""Every ```python block of README.md runs as written, each on its own (a reader can paste it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_the_readme_has_python_blocks() -> None:
    assert len(_blocks()) >= 4


@pytest.mark.parametrize(("line", "code"), _blocks(), ids=[f"line{line}" for line, _ in _blocks()])
def test_readme_block_runs(line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    try:
        exec(compile(code, f"README.md, block at line {line}", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)
