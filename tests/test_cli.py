from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import spatialdrop
from spatialdrop.cli import _io, _optional, bench, demo, demo_train, main, show

CLI_DIR = Path(spatialdrop.cli.__file__).parent


# --- the command line itself ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "bench", "show"])
def test_help_of_each_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: spatialdrop {command}")
    assert "--out" in out


def test_top_level_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "bench", "show"):
        assert command in out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"spatialdrop {spatialdrop.__version__}"


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: spatialdrop" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "-p", "1.5"], "argument -p/--p: must be a probability in [0, 1), got '1.5'"),
        (["demo", "--seeds", "0"], "argument --seeds: must be an int >= 1, got '0'"),
        (["demo", "--epochs", "ten"], "argument --epochs: must be an int >= 1, got 'ten'"),
        (["demo", "--data", "cifar"], "argument --data: invalid choice: 'cifar'"),
        (["bench", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["bench", "--suite", "everything"], "argument --suite: invalid choice: 'everything'"),
        (["show", "--block-size", "0"], "argument --block-size: must be an int >= 1, got '0'"),
        (["show", "--bogus"], "unrecognized arguments: --bogus"),
        (["train"], "invalid choice: 'train'"),
    ],
)
def test_bad_option_exits_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: spatialdrop" in err


def test_missing_optional_dependency_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _optional.importlib.import_module

    def no_matplotlib(name: str, *args: object) -> object:
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(_optional.importlib, "import_module", no_matplotlib)
    out = tmp_path / "masks.png"
    assert main(["show", "--no-progress", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "spatialdrop show: needs matplotlib" in err
    assert 'pip install "spatialdrop[demo]"' in err
    assert not out.exists()
    # the demo checks before it trains
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 1
    assert "spatialdrop demo: needs matplotlib" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    src = str(Path(spatialdrop.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "spatialdrop", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"spatialdrop {spatialdrop.__version__}"


# --- output paths: checked before any work -------------------------------------------------------


def _bad_paths(tmp_path: Path) -> dict[str, Path]:
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    return {
        "/proc/x": Path("/proc/x"),
        "/proc/x/y.txt": Path("/proc/x/y.txt"),
        "an existing file": existing,
        "a file as parent folder": existing / "y.txt",
    }


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a /proc file system")
@pytest.mark.parametrize("command", ["demo", "bench", "show"])
@pytest.mark.parametrize("which", ["/proc/x", "/proc/x/y.txt", "an existing file", "a file as parent folder"])
def test_bad_output_path_exits_2_at_once_without_computing(
    command: str,
    which: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_work(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(demo, "run_demo", no_work)
    monkeypatch.setattr(bench, "run_bench", no_work)
    monkeypatch.setattr(show, "run_show", no_work)
    path = _bad_paths(tmp_path)[which]
    started = time.perf_counter()
    assert main([command, "--out", str(path)]) == 2
    assert time.perf_counter() - started < 2.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"spatialdrop: error: spatialdrop {command} --out: ")
    assert "Traceback" not in err
    assert (tmp_path / "existing.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["bench", "show"])
def test_force_overwrites_an_existing_file(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs: list[Path] = []
    monkeypatch.setattr(bench, "run_bench", lambda **kw: runs.append(kw["out"]) or 0)
    monkeypatch.setattr(show, "run_show", lambda **kw: runs.append(kw["out"]) or 0)
    path = tmp_path / ("existing.txt" if command == "bench" else "existing.png")
    path.write_text("keep me")
    assert main([command, "--out", str(path)]) == 2
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err
    assert main([command, "--out", str(path), "--force"]) == 0
    assert runs == [path]


def test_missing_output_folders_are_fine_and_created_only_when_writing(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    _io.check_file(target, force=False, what="t")
    assert not (tmp_path / "a").exists()
    _io.write_text(target, "done\n")
    assert target.read_text() == "done\n"


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _io.write_atomic(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_show_ctrl_c_exits_130_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(show, "rate_map", interrupted)
    out = tmp_path / "m.png"
    assert main(["show", "--size", "8", "--block-size", "3", "--no-progress", "--out", str(out)]) == 130
    assert capsys.readouterr().err == "spatialdrop show: interrupted\n"
    assert not out.exists()


# --- help texts state the code's defaults ---------------------------------------------------------


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("field", ["seeds", "epochs", "mc_samples", "p", "block_size"])
def test_demo_help_states_the_defaults_the_code_uses(field: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("demo", capsys)
    option = "--" + field.replace("_", "-") if field != "p" else "-p P"
    found = re.search(re.escape(option) + r"[^(]*\(default: ([^)]*)\)", text)
    assert found is not None, text
    numbers = re.findall(r"[\d.]+", found.group(1))
    expected = [
        getattr(demo_train.make_settings(d, q), field) for q in (False, True) for d in ("digits", "volumes")
    ]
    # "A for digits, B for volumes; with --quick C and D", with equal pairs written once
    shown = [float(n) for n in numbers]
    pairs = [expected[:2], expected[2:]]
    want = [v for pair in pairs for v in (pair[:1] if pair[0] == pair[1] else pair)]
    if pairs[0] == pairs[1]:
        want = want[: len(want) // 2]
    assert shown == [float(v) for v in want], (field, found.group(1))


# --- the applications stay apart from the library -------------------------------------------------


def _sources() -> list[Path]:
    return sorted(CLI_DIR.glob("*.py"))


def test_the_applications_use_only_the_public_api() -> None:
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: relative import out of the cli package"
                if node.level == 0 and node.module and node.module.startswith("spatialdrop"):
                    assert node.module in ("spatialdrop", "spatialdrop.functional"), (
                        f"{path.name}: {node.module}"
                    )
                    assert all(not a.name.startswith("_") or a.name == "__version__" for a in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("spatialdrop.") or alias.name == "spatialdrop.functional"
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "spatialdrop"
            ):
                assert not node.attr.startswith("_") or node.attr == "__version__", (
                    f"{path.name}: {node.attr}"
                )


def test_no_application_file_is_over_500_lines_and_none_names_a_ticket() -> None:
    for path in _sources():
        text = path.read_text()
        assert len(text.splitlines()) <= 500, path.name
        assert re.search(r"\bissues?\b\s*#?\d|\bticket", text, re.IGNORECASE) is None, path.name


def test_the_library_has_no_application_modules_left_beside_it() -> None:
    package = CLI_DIR.parent
    assert not any(
        (package / name).exists() for name in ("_bench.py", "_demo.py", "_show.py", "_optional.py")
    )
    assert (package / "__main__.py").read_text().count("\n") < 15


# --- options are never abbreviated; -p has a long form --------------------------------------------


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["show", "--pa", "masks"], "--pa: did you mean --panels?"),
        (["show", "--bl", "3"], "--bl: did you mean --block-size?"),
        (["demo", "--ep", "3"], "--ep: did you mean --epochs?"),
        (["bench", "--quik"], "--quik: did you mean --quick?"),
        (["bench", "--block-size", "3"], "unrecognized arguments: --block-size 3"),
    ],
)
def test_abbreviated_or_misspelt_options_are_refused_with_a_hint(
    argv: list[str], hint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for module, name in ((demo, "run_demo"), (bench, "run_bench"), (show, "run_show")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("ran with an unknown option"))
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: spatialdrop {argv[0]} ")  # the command's own usage
    assert hint in err
    assert err.strip().splitlines()[-1].startswith(f"spatialdrop {argv[0]}: error: unrecognized arguments")


def test_options_before_the_command_get_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--p", "0.2", "show", "--size", "8"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "spatialdrop: error: options go after the command: spatialdrop show --p 0.2 --size 8"


@pytest.mark.parametrize("command", ["demo", "bench", "show"])
def test_dash_dash_p_is_the_long_form_of_p(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []
    monkeypatch.setattr(demo, "run_demo", lambda settings, *a, **k: seen.append(settings.p) or 0)
    monkeypatch.setattr(bench, "run_bench", lambda **k: seen.append(k["p"]) or 0)
    monkeypatch.setattr(show, "run_show", lambda **k: seen.append(k["p"]) or 0)
    out = tmp_path / {"demo": "d", "bench": "o.txt", "show": "o.png"}[command]
    assert main([command, "--p", "0.25", "--out", str(out)]) == 0
    assert main([command, "-p", "0.3", "--out", str(out)]) == 0
    assert seen == [0.25, 0.3]  # not --panels, not an error


@pytest.mark.parametrize("command", ["demo", "bench", "show"])
def test_a_huge_seed_is_refused_in_one_line(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--seed", "99999999999999999999999"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (
        f"spatialdrop {command}: error: argument --seed: must be an int in "
        "[0, 2**63 - 1 = 9223372036854775807], got '99999999999999999999999'"
    )


def test_the_largest_seed_is_accepted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seeds: list[int] = []
    monkeypatch.setattr(show, "run_show", lambda **k: seeds.append(k["seed"]) or 0)
    assert main(["show", "--seed", str(2**63 - 1), "--out", str(tmp_path / "m.png")]) == 0
    assert seeds == [2**63 - 1]


@pytest.mark.parametrize("command", [None, "demo", "bench", "show"])
def test_help_fits_an_80_column_terminal(
    command: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main([command, "--help"] if command else ["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 5
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a /proc file system")
@pytest.mark.parametrize(
    ("command", "out", "message"),
    [
        ("show", "/proc/x/y.png", "cannot create the folder /proc/x: cannot write in /proc"),
        ("show", "/proc/x/a/b.png", "cannot create the folder /proc/x/a: cannot write in /proc"),
        ("show", "/proc/x.png", "spatialdrop show --out: cannot write in /proc ("),
        ("demo", "/proc/x/y", "cannot create the folder /proc/x/y: cannot write in /proc"),
    ],
)
def test_an_unwritable_output_names_the_folder_asked_for(
    command: str, out: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--out", out]) == 2
    assert message in capsys.readouterr().err


# --- optional dependencies: missing or broken ------------------------------------------------------


class _BrokenPeers:
    """Import hook: the named top-level packages are installed but raise while importing."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def find_spec(self, name: str, path: object = None, target: object = None) -> Any:
        import importlib.machinery

        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        raise RuntimeError("operator torchvision::nms does not exist\n(and a second line)")


@pytest.fixture
def broken_peers(monkeypatch: pytest.MonkeyPatch) -> Any:
    """torchvision and timm installed but broken (a torchvision built for another torch)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("torchvision", "timm"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenPeers("torchvision", "timm"), *sys.meta_path])
    _optional._import_peer.cache_clear()
    yield
    _optional._import_peer.cache_clear()


def test_a_broken_peer_is_unavailable_with_its_reason(broken_peers: None) -> None:
    reason = "unavailable: RuntimeError: operator torchvision::nms does not exist"
    assert _optional.peer("timm", "timm.layers.drop_block_2d") == f"timm {reason}"
    assert _optional.peer("torchvision", "torchvision.ops.drop_block2d") == f"torchvision {reason}"
    assert _optional.peer("spatialdrop_no_such_peer", "spatialdrop_no_such_peer.f") == (
        "spatialdrop_no_such_peer not installed"
    )
    # a peer that imports but lacks the function is unavailable, with the reason
    assert _optional.peer("json", "json.no_such_function").startswith("json unavailable: AttributeError: ")


def test_show_and_bench_with_broken_peers_say_why_and_finish(
    broken_peers: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    layers = show.rate_layers(0.1, 3)
    notes = [layer for _, layer in layers if isinstance(layer, str)]
    assert notes == [
        "torchvision unavailable: RuntimeError: operator torchvision::nms does not exist",
        "timm unavailable: RuntimeError: operator torchvision::nms does not exist",
    ]
    out = tmp_path / "r.png"
    argv = ["show", "--size", "8", "--block-size", "3", "--draws", "50", "--panels", "rates", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    from spatialdrop.cli import bench_cases

    impls = bench_cases.family_cases(True, 0.1)[0].impls
    assert [i.note for i in impls if i.fn is None] == [
        "timm unavailable: RuntimeError: operator torchvision::nms does not exist",
        "torchvision unavailable: RuntimeError: operator torchvision::nms does not exist",
    ]
    monkeypatch.setattr(bench, "cases_for", lambda *a: bench_cases.family_cases(True, 0.1)[:1])
    argv = ["bench", "--quick", "--repeats", "1", "--no-progress", "--no-compile"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "timm unavailable: RuntimeError: operator torchvision::nms does not exist; its rows show —" in (
        " ".join(captured.out.split())
    )
    assert "not installed, so their rows show" not in captured.out


def test_a_broken_required_dependency_exits_1_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _optional.importlib.import_module

    def broken_matplotlib(name: str, *args: object) -> object:
        if name.split(".")[0] == "matplotlib":
            raise RuntimeError("matplotlib was built for another numpy")
        return real(name, *args)

    monkeypatch.setattr(_optional.importlib, "import_module", broken_matplotlib)
    assert main(["show", "--no-progress", "--out", str(tmp_path / "m.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert (
        "needs matplotlib, which is unavailable (RuntimeError: matplotlib was built for another numpy)" in err
    )


def test_no_progress_needs_no_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _optional.importlib.import_module

    def no_tqdm(name: str, *args: object) -> object:
        if name.split(".")[0] == "tqdm":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(_optional.importlib, "import_module", no_tqdm)
    with _optional.progress("bench", total=3, desc="d", enabled=False) as bar:
        bar.set_postfix_str("case")
        bar.update(1)
        bar.reset()
    with pytest.raises(_optional.MissingDependency, match="needs tqdm, which is not installed"):
        _optional.progress("bench", total=3, desc="d", enabled=True)


# --- the bad-input table: every command, each refused at once, before any work -------------------


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("computed before checking the command line")

    monkeypatch.setattr(demo, "run_demo", no_work)
    monkeypatch.setattr(bench, "run_bench", no_work)
    monkeypatch.setattr(show, "run_show", no_work)


def _folder_named(tmp_path: Path, name: str) -> str:
    (tmp_path / name).mkdir(parents=True)
    return str(tmp_path / name)


def _demo_out_holding_a_folder(tmp_path: Path, name: str) -> str:
    (tmp_path / "d" / name).mkdir(parents=True)
    return str(tmp_path / "d")


def _link(tmp_path: Path, name: str, target: str) -> str:
    (tmp_path / name).symlink_to(target)
    return str(tmp_path / name)


# (command and options, a function of tmp_path giving --out, what the one line says)
BAD_INPUTS: dict[str, tuple[list[str], Any, str]] = {
    "demo: figure.png in --out is a folder": (
        ["demo", "--force"],
        lambda t: _demo_out_holding_a_folder(t, "figure.png"),
        "figure.png is a folder, expected a file name",
    ),
    "demo: results.json in --out is a folder": (
        ["demo", "--force"],
        lambda t: _demo_out_holding_a_folder(t, "results.json"),
        "results.json is a folder, expected a file name",
    ),
    "bench: --out is a folder": (["bench", "--force"], lambda t: _folder_named(t, "b.txt"), "is a folder"),
    "show: --out is a folder": (["show", "--force"], lambda t: _folder_named(t, "s.png"), "is a folder"),
    "show: --out links to a folder": (
        ["show", "--force"],
        lambda t: _link(t, "l.png", _folder_named(t, "f.png")),
        "is a folder",
    ),
    "show: --out is a link loop": (
        ["show", "--force"],
        lambda t: _link(t, "loop.png", str(t / "loop.png")),
        "cannot be followed",
    ),
    "bench: --out /dev/null": (["bench", "--force"], lambda t: "/dev/null", "is not a regular file"),
    "show: --out /dev/null": (["show", "--force"], lambda t: "/dev/null", "is not a regular file"),
    "demo: --out /dev/null": (["demo", "--force"], lambda t: "/dev/null", "exists and is not a folder"),
    "demo: --out ''": (["demo"], lambda t: "", "argument --out: must be a file or folder name, got ''"),
    "bench: --out ''": (["bench"], lambda t: "", "argument --out: must be a file or folder name, got ''"),
    "show: --out ''": (["show"], lambda t: "", "argument --out: must be a file or folder name, got ''"),
    "show: a huge --size": (
        ["show", "--size", "100000"],
        lambda t: str(t / "m.png"),
        "argument --size: must be an int in [1, 512]",
    ),
    "bench: a suffix naming another format": (
        ["bench", "--format", "json"],
        lambda t: str(t / "b.md"),
        "the suffix '.md' means --format markdown, not json",
    ),
    "show: a suffix naming another format": (
        ["show", "--format", "pdf"],
        lambda t: str(t / "m.png"),
        "the suffix '.png' means --format png, not pdf",
    ),
    "bench: a suffix naming no format": (["bench"], lambda t: str(t / "b.log"), "cannot write a '.log' file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_at_once_with_one_line_and_writes_nothing(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_work(monkeypatch)
    options, out, message = BAD_INPUTS[case]
    argv = [*options, "--out", out(tmp_path)]
    before = sorted(tmp_path.rglob("*"))
    started = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: its usage, then the one line naming the option
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert time.perf_counter() - started < 2.0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("spatialdrop"), err
    assert message in last, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing replaced


def test_force_writes_through_a_symbolic_link(tmp_path: Path) -> None:
    target = tmp_path / "t.png"
    target.write_text("old")
    link = tmp_path / "l.png"
    link.symlink_to(target)
    argv = ["show", "--size", "8", "--block-size", "3", "--panels", "masks", "--no-progress", "--force"]
    assert main([*argv, "--out", str(link)]) == 0
    assert link.is_symlink()  # still the link, and its target got the image
    assert target.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png", "t.png"]


def test_write_all_replaces_every_file_or_none(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")

    def fail(tmp: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.write_all({a: lambda tmp: tmp.write_text("new a"), b: fail})
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    _io.write_all({a: lambda tmp: tmp.write_text("new a"), b: lambda tmp: tmp.write_text("new b")})
    assert (a.read_text(), b.read_text()) == ("new a", "new b")


def test_write_new_never_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.partial.md"
    assert _io.write_new(path, "first") == path
    assert _io.write_new(path, "second") == tmp_path / "x.partial-2.md"
    assert _io.write_new(path, "third") == tmp_path / "x.partial-3.md"
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.partial-2.md", "x.partial-3.md", "x.partial.md"]


# --- one rule for the output format of every command ---------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fmt"),
    [
        (["bench", "--out", "r.md"], "markdown"),
        (["bench", "--out", "r.MARKDOWN"], "markdown"),
        (["bench", "--out", "r.json"], "json"),
        (["bench", "--out", "r.csv"], "csv"),
        (["bench", "--out", "r.txt"], "table"),
        (["bench", "--out", "r"], "table"),
        (["bench", "--out", "r", "--format", "csv"], "csv"),
        (["bench", "--out", "r.md", "--format", "markdown"], "markdown"),
        (["bench", "--out", "r.log", "--format", "json"], "json"),
        (["bench", "--format", "json"], "json"),
        (["show", "--out", "m.pdf"], "pdf"),
        (["show", "--out", "m"], "png"),
        (["show", "--out", "m", "--format", "svg"], "svg"),
        (["show", "--out", "m.fig", "--format", "jpeg"], "jpeg"),
    ],
)
def test_the_suffix_of_out_chooses_the_format_unless_format_is_given(
    argv: list[str], fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(bench, "run_bench", lambda **k: seen.append(k["fmt"]) or 0)
    monkeypatch.setattr(show, "run_show", lambda **k: seen.append(k["fmt"]) or 0)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    assert seen == [fmt]


# --- after the work started: no traceback; SIGTERM ends as Ctrl-C does -----------------------------


def test_a_failure_after_the_work_started_is_one_line_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise IsADirectoryError(21, "Is a directory", "figure.png")

    monkeypatch.setattr(show, "rate_map", broken)
    out = tmp_path / "m.png"
    argv = ["show", "--size", "8", "--block-size", "3", "--panels", "rates", "--no-progress"]
    monkeypatch.setattr(show, "rate_layers", lambda p, b: [("ours", lambda x: x)])
    monkeypatch.setattr(show, "_refusal", broken)  # the panel's own note fails too
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == "spatialdrop show: failed: IsADirectoryError: [Errno 21] Is a directory: 'figure.png'\n"
    assert not out.exists()


def _workers(pid: int) -> list[int]:
    """The multiprocessing workers among the children of ``pid`` (not its resource tracker)."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
    except OSError:  # a process that ended meanwhile
        pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
def test_sigterm_stops_the_demo_and_its_workers_like_ctrl_c(tmp_path: Path) -> None:
    src = str(Path(spatialdrop.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = ["demo", "--quick", "--epochs", "500", "--seeds", "1", "--mc-samples", "2", "--jobs", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spatialdrop", *argv, "--no-progress", "--out", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = _workers(proc.pid)
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "no workers"
        time.sleep(1.0)
        proc.send_signal(15)
        _, err = proc.communicate(timeout=60)
    finally:  # a failing run leaves no process behind either
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, 9)
        proc.wait()
    assert proc.returncode == 143, err
    assert err.startswith("spatialdrop demo: terminated after "), err
    assert err.count("\n") == 1, err  # one line: no traceback, no leaked-semaphore warning
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []


# --- errors come before the torch import -----------------------------------------------------------


def _script(code: str) -> subprocess.CompletedProcess[str]:
    src = str(Path(spatialdrop.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--quik"],
        ["show", "--size", "100000"],
        ["demo", "--out", ""],
        ["bench", "--out", "/dev/null", "--force"],
        ["bench", "--out", "/dev/stdout", "--force"],  # a pipe here
        ["show", "--out", "x.gif"],
    ],
)
def test_the_script_refuses_bad_input_before_importing_torch(argv: list[str]) -> None:
    done = _script(
        "import sys, spatialdrop_cli\n"
        "try:\n"
        f"    code = spatialdrop_cli.main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "Traceback" not in done.stderr


def test_the_script_imports_the_library_once_the_command_line_is_checked(tmp_path: Path) -> None:
    out = tmp_path / "m.png"
    argv = [
        "show",
        "--size",
        "8",
        "--block-size",
        "3",
        "--panels",
        "masks",
        "--no-progress",
        "--out",
        str(out),
    ]
    done = _script(
        f"import spatialdrop_cli, spatialdrop\nprint(spatialdrop_cli.main({argv!r}), spatialdrop.__version__)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["0", spatialdrop.__version__]
    assert out.read_bytes().startswith(b"\x89PNG")


# --- the models run of dev/test.sh (-p no:doctest) reads the project's pytest settings cleanly -----


def test_the_run_without_the_doctest_plugin_warns_of_no_unknown_option(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    done = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:doctest",
                "-o",
                "addopts=-ra",
                "-p",
                "no:cacheprovider",
            ),
            *("-c", str(root / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_one.py")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Unknown config option" not in done.stdout + done.stderr
    assert "1 passed" in done.stdout
