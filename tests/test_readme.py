"""Every ```python block of README.md and of the documentation (docs/**/*.md) runs as written,
each on its own (a reader can paste it). Blocks that cannot run here (timm, Lightning) use a
```text fence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = [(path.relative_to(ROOT).as_posix(), line, code) for path in PAGES for line, code in _blocks(path)]


def test_the_readme_has_python_blocks() -> None:
    # the usage example and the one-call conversion
    assert len(_blocks(README)) >= 2


def test_the_docs_have_python_blocks() -> None:
    assert len(BLOCKS) - len(_blocks(README)) >= 4


@pytest.mark.parametrize(("page", "line", "code"), BLOCKS, ids=[f"{p}:{line}" for p, line, _ in BLOCKS])
def test_block_runs(page: str, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    try:
        exec(compile(code, f"{page}, block at line {line}", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)
