"""MkDocs hooks (mkdocs.yml, ``hooks:``): the example gallery, executed at build time.

A gallery page (``docs/gallery/*.md``) holds a line ``<!-- example: examples/NAME.py -->``. At
build time the hook runs that script with the command its docstring gives (the first indented
line starting with ``python`` or ``torchrun``), in the interpreter that runs mkdocs (the
``.venv-models`` environment, which has timm and torch.distributed), with this checkout's
``src`` first on ``PYTHONPATH``, and puts the script's source and its output in the page. A
script that exits with a non-zero status, or runs longer than ``TIMEOUT_S``, fails the build.
``SPATIALDROP_DOCS_EXAMPLES=skip`` leaves the scripts out for a quick look at the pages: it logs
a warning, so a strict build (``mkdocs build --strict``, ``bash dev/docs.sh``) fails with it.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Sphinx roles in the docstrings (":func:`x`"): Markdown shows the role's name; keep the code only
ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj):(?=<code>)")
MARKER = re.compile(r"^<!-- example: (examples/[\w.-]+\.py) -->$", re.MULTILINE)
COMMAND = re.compile(r"^\s+((?:python|torchrun) .+)$", re.MULTILINE)
TIMEOUT_S = 300
_cache: dict[str, str] = {}
log = logging.getLogger("mkdocs.hooks.gallery")


def _fail(message: str) -> Exception:
    """The error that stops the build: mkdocs' PluginError (RuntimeError without mkdocs, as in tests)."""
    try:
        from mkdocs.exceptions import PluginError
    except ImportError:
        return RuntimeError(message)
    return PluginError(message)


def example_command(script: Path) -> list[str]:
    """The command the script's docstring gives, as argv for this interpreter."""
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    found = COMMAND.search(doc)
    if found is None:
        raise _fail(f"{script.name}: its docstring gives no indented 'python ...' or 'torchrun ...' line")
    argv = shlex.split(found.group(1))
    head = [sys.executable] if argv[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
    return head + [str(ROOT / a) if a.startswith("examples/") else a for a in argv[1:]]


def run_example(rel: str) -> str:
    """Run one example; return the Markdown for its source and output."""
    script = ROOT / rel
    if not script.is_file():
        raise _fail(f"gallery: {rel} does not exist")
    argv = example_command(script)
    shown = " ".join(["python" if a == sys.executable else a for a in argv]).replace(str(ROOT) + "/", "")
    shown = shown.replace("python -m torch.distributed.run", "torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise _fail(f"gallery: {shown} ran longer than {TIMEOUT_S} s") from exc
    seconds = time.monotonic() - start
    output = (done.stdout + done.stderr).replace(str(ROOT) + "/", "")
    if done.returncode != 0:
        raise _fail(f"gallery: {shown} exited with status {done.returncode}:\n{output[-3000:]}")
    source = script.read_text(encoding="utf-8")
    return (
        f"```python\n{source}```\n\n"
        f"Output of `{shown}`, run when this site was built ({seconds:.0f} s):\n\n"
        f"```text\n{output.rstrip()}\n```\n"
    )


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each example marker by the script's source and the output of a fresh run."""

    def expand(match: re.Match[str]) -> str:
        rel = match.group(1)
        if os.environ.get("SPATIALDROP_DOCS_EXAMPLES") == "skip":
            log.warning("gallery: %s not run (SPATIALDROP_DOCS_EXAMPLES=skip)", rel)
            return f"*`{rel}` was not run in this build.*\n"
        if rel not in _cache:
            _cache[rel] = run_example(rel)
        return _cache[rel]

    return MARKER.sub(expand, markdown)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Drop the Sphinx role names that the docstrings carry before their code spans."""
    return ROLE.sub("", html)
