"""Size of the DropBlock engine: lines, files, branch points and the import graph (issue 31).

The engine is ``src/spatialdrop/_dropblock/`` (its Python modules and the C source) and
``src/spatialdrop/drop_block.py``. Branch points: ``if``/``elif`` statements, conditional
expressions and comprehension conditions in Python; ``if (`` and ``?`` in C (comments removed).
Usage, from a checkout (or any tree's root given as the argument)::

    python dev/engine_stats.py [ROOT] [--imports]
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path


def engine_files(root: Path) -> list[Path]:
    """The engine's files under ``root``."""
    package = root / "src" / "spatialdrop"
    block = package / "_dropblock"
    return sorted(block.glob("*.py")) + sorted(block.glob("*.c")) + [package / "drop_block.py"]


def branch_points(path: Path, text: str) -> int:
    """The branch points of one file (see the module's docstring)."""
    if path.suffix == ".c":
        code = re.sub(r"//.*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))
        return len(re.findall(r"\bif\s*\(", code)) + code.count("?")
    count = 0
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.If, ast.IfExp)):
            count += 1
        elif isinstance(node, ast.comprehension):
            count += len(node.ifs)
    return count


def relative_imports(text: str) -> list[str]:
    """The sibling modules a Python file imports relatively."""
    deps: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return sorted(deps)


def main() -> None:
    """Print the totals (and with ``--imports`` each Python file's relative imports)."""
    args = [a for a in sys.argv[1:] if a != "--imports"]
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    files = engine_files(root)
    texts = {f: f.read_text() for f in files}
    lines = sum(t.count("\n") for t in texts.values())
    branches = sum(branch_points(f, t) for f, t in texts.items())
    print(f"{root}: {lines} lines in {len(files)} files, {branches} branch points")
    if "--imports" in sys.argv:
        for f, t in texts.items():
            if f.suffix == ".py":
                print(f"  {f.stem}: {', '.join(relative_imports(t))}")


if __name__ == "__main__":
    main()
