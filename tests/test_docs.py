"""The documentation's sources (mkdocs.yml, docs/, README.md), checked without mkdocs.

`bash dev/docs.sh` builds the site strictly and `dev/docs_test.py` opens it in a browser; these
tests hold what the default suite can check from the sources alone.
"""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path

import pytest

import spatialdrop

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
ENTRY = re.compile(r"^::: (spatialdrop(?:\.\w+)+)\s*$", re.MULTILINE)


def _public_names() -> set[str]:
    """Every public callable or class: spatialdrop.__all__, and the __all__ of the modules in it."""
    names = set()
    for name in spatialdrop.__all__:
        obj = getattr(spatialdrop, name)
        if isinstance(obj, types.ModuleType):
            names |= {f"spatialdrop.{name}.{sub}" for sub in obj.__all__}
        elif not name.startswith("__"):
            names.add(f"spatialdrop.{name}")
    return names


def _api_entries() -> dict[str, str]:
    return {
        m.group(1): page.name
        for page in (DOCS / "api").glob("*.md")
        for m in ENTRY.finditer(page.read_text())
    }


def test_every_public_name_has_an_api_entry() -> None:
    names = _public_names()
    assert "spatialdrop.DropBlock2d" in names
    assert "spatialdrop.functional.drop_block" in names
    missing = sorted(names - set(_api_entries()))
    assert not missing, f"no '::: NAME' entry in docs/api/*.md for {missing}"


def test_every_api_entry_names_a_public_name_once() -> None:
    entries = [m.group(1) for page in (DOCS / "api").glob("*.md") for m in ENTRY.finditer(page.read_text())]
    assert len(entries) == len(set(entries)), sorted(e for e in entries if entries.count(e) > 1)
    assert not set(entries) - _public_names(), sorted(set(entries) - _public_names())


def test_the_api_index_names_the_version() -> None:
    assert "spatialdrop.__version__" in (DOCS / "api" / "index.md").read_text()


def _nav_pages() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") :]
    return set(re.findall(r"^\s+- (?:[^\n]*: )?([\w/.-]+\.md)\s*$", nav, re.MULTILINE))


def test_every_docs_page_is_in_the_nav() -> None:
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not pages - _nav_pages(), sorted(pages - _nav_pages())


def _hooks() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "dev" / "docs_hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_gallery_page_that_runs_it() -> None:
    hooks = _hooks()
    marked = {
        m.group(1)
        for page in (DOCS / "gallery").glob("*.md")
        for m in hooks.MARKER.finditer(page.read_text())
    }
    examples = {p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*.py")}
    assert examples == marked
    for rel in examples:
        argv = hooks.example_command(ROOT / rel)  # the command its docstring gives
        assert str(ROOT / rel) in argv


def test_the_gallery_hook_refuses_an_example_without_a_command(tmp_path: Path) -> None:
    script = tmp_path / "x.py"
    script.write_text('"""No command here."""\n')
    with pytest.raises(Exception, match=r"gives no indented 'python \.\.\.'"):
        _hooks().example_command(script)


CODE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def test_the_gallery_hook_embeds_the_output_and_fails_with_a_failing_example(tmp_path: Path) -> None:
    hooks = _hooks()
    for name, body, status in (("ok.py", "print('hello from the example')", 0), ("bad.py", "sys.exit(3)", 3)):
        script = tmp_path / name
        script.write_text(f'"""Run it with::\n\n    python {script}\n"""\nimport sys\n{body}\n')
        if status == 0:
            markdown = hooks.run_example(str(script))
            assert "```python\n" in markdown
            assert "hello from the example" in markdown
        else:
            with pytest.raises(Exception, match="exited with status 3"):
                hooks.run_example(str(script))


def _prose(path: Path) -> list[str]:
    """The paragraphs of a Markdown file outside its code blocks (which quote program output)."""
    text = CODE.sub("", path.read_text(encoding="utf-8"))
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


@pytest.mark.parametrize(
    "path", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_no_figure_reads_as_a_changelog(path: Path) -> None:
    # each figure is stated once, with its date: never "an earlier run", never "now 0.3 %"
    for paragraph in _prose(path):
        assert not re.search(r"\bearlier runs?\b", paragraph, re.IGNORECASE), paragraph
        if re.search(r"\d", paragraph):
            assert not re.search(r"\bnow\b", paragraph, re.IGNORECASE), paragraph


def test_the_changelog_check_catches_the_old_wording(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Saved: 3 % (now 0.3 %).\n\n640 s (an earlier run, not re-measured)\n")
    with pytest.raises(AssertionError):
        test_no_figure_reads_as_a_changelog(page)


def test_the_readme_is_short_and_starts_with_the_set_up() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.split()) <= 1500
    first_screen = "\n".join(text.splitlines()[:40])
    demo = (
        'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[demo]"'
        " && .venv/bin/spatialdrop demo"
    )
    assert demo in first_screen
    assert "\nbash dev/test.sh\n" in first_screen
    assert "bash dev/docs.sh" in text
    assert "](docs/demo.png)" in text


def test_the_readme_links_to_files_or_to_pages_of_the_site() -> None:
    # a docs page listed in mkdocs.yml's nav exists wherever the strict build passes
    nav = {f"docs/{page}" for page in _nav_pages()}
    for target in re.findall(
        r"\]\(([^)#\s]+)(?:#[^)]*)?\)", CODE.sub("", README.read_text(encoding="utf-8"))
    ):
        if target.startswith(("http://", "https://")):
            continue
        assert (ROOT / target).exists() or target in nav, target
