from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import mmap
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spatialdrop.cli import bench, bench_cases, bench_measure, bench_report, main

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None
GOALS_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "goals.py"


def _load_goals() -> Any:
    """``benchmarks/goals.py`` as a module: the goals live beside the benchmarks, not in the library."""
    spec = importlib.util.spec_from_file_location("bench_goals", GOALS_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_goals"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


goals = _load_goals()

BENCH = ["bench", "--quick", "--repeats", "2", "--no-progress", "--threads", "1", "--no-compile"]


def test_bench_json_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--suite", "spatial", "--format", "json", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} in ")
    report = json.loads(out.read_text())
    assert set(report) == {"command", "partial", "smoke_run", "environment", "rows"}  # no verdicts
    assert report["partial"] is False
    # --quick is a smoke run on small shapes: it says so (benchmarks/goals.py then checks none)
    assert report["smoke_run"] is True
    _, read = goals.read_report(out)
    checked = goals.goals(read)
    assert [(g.what, g.measured) for g in checked] == [
        (g.what, g.measured) for g in goals.goals([bench_measure.Row(**r) for r in report["rows"]])
    ]
    assert {g.what.split(":")[0] for g in checked} == {
        f"spatial dropout, {c.name} {'x'.join(map(str, c.shape))}"
        for c in bench_cases.spatial_cases(True, 0.1)
        if c.name != "2-D maps, many channels"
    }
    assert report["environment"]["torch_threads"] == 1
    assert report["environment"]["torch"] == torch.__version__
    rows = report["rows"]
    assert {r["case"] for r in rows} == {c.name for c in bench_cases.spatial_cases(True, 0.1)}
    assert set(rows[0]) == {f.name for f in bench_measure.Row.__dataclass_fields__.values()}
    for r in rows:
        assert r["fwd_ms"] > 0
        assert r["fwd_bwd_ms"] > 0
        if r["call"] == bench_cases.REFERENCE:
            assert r["fwd_ratio"] == 1.0
            assert r["saved_bytes"] == 0
            assert r["drop_mean"] is None
        else:
            # channel dropout at p = 0.1: a rate near p, saving only the per-channel noise
            assert 0.05 < r["drop_mean"] < 0.15
            assert r["saved_fraction"] < 0.01
    libraries = {r["library"] for r in rows}
    assert libraries == {"torch", "spatialdrop"}


def test_bench_dropblock_suite(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BENCH, "--suite", "dropblock", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["kind"] for r in rows} == {"speed", "calibration"}
    ours = [r for r in rows if r["library"] == "spatialdrop" and r["kind"] == "speed"]
    assert len(ours) == 6
    for r in ours:
        assert float(r["fwd_bwd_ms"]) > 0
        assert float(r["drop_mean"]) == pytest.approx(0.1, abs=0.02)
        assert float(r["saved_fraction"]) < 0.25  # at most a quarter of the input
    # calibration: our default seeding drops p at the corners and the centre too
    uniform = [
        r
        for r in rows
        if r["kind"] == "calibration" and r["call"].startswith("drop_block") and "valid" not in r["call"]
    ]
    assert len(uniform) == len(bench_cases.CALIBRATION)
    for r in uniform:
        p = float(r["p"])
        for key in ("drop_mean", "drop_corner", "drop_centre"):
            assert float(r[key]) == pytest.approx(p, abs=0.06), (r["case"], key)
    assert uniform[0]["fp16_ok"] == "True"
    # peers: measured when installed, else listed with a note and no numbers
    tv = [r for r in rows if r["library"] == "torchvision"]
    assert len(tv) == 2 + len(bench_cases.CALIBRATION)
    for r in tv:
        if HAS_TORCHVISION:
            assert float(r["drop_mean"]) > 0
        else:
            assert r["note"].startswith("torchvision not installed")
            assert r["drop_mean"] == ""


def test_bench_family_and_keyed_suites(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--suite", "family", "--format", "json", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["suite"] for r in rows} == {"family"}
    path = next(r for r in rows if r["call"] == "drop_path(x, p)")
    assert path["drop_mean"] == pytest.approx(0.1, abs=0.03)  # 2048 single-channel samples
    assert path["saved_fraction"] < 0.01
    conv = next(r for r in rows if r["call"].startswith("filter_dropout"))
    assert conv["fwd_bwd_ms"] > 0
    assert conv["drop_mean"] is None  # filters, not activations: no activation drop rate
    # DropPath residual: three branches at p = 0.1 and 0.3, ours and the baseline x + DropPath(branch(x))
    residual = [r for r in rows if r["case"].startswith("DropPath residual")]
    ours = [r for r in residual if r["call"] == "drop_path_residual(x, branch, p)"]
    assert sorted((r["case"].split(", ")[1][:12], r["p"]) for r in ours) == [
        ("a ResNet-50 ", 0.1),
        ("a ResNet-50 ", 0.3),
        ("a ViT-S bloc", 0.1),
        ("a ViT-S bloc", 0.3),
        ("a whole ViT-", 0.1),
        ("a whole ViT-", 0.3),
    ]
    base = [r for r in residual if r["call"].startswith("x + ") and r["fwd_bwd_ms"] is not None]
    assert len(base) == 6
    assert all(r["vs_baseline"] == 1.0 for r in base)
    for r in ours:
        twin = next(b for b in base if b["case"] == r["case"] and b["p"] == r["p"])
        assert r["vs_baseline"] == pytest.approx(twin["fwd_bwd_ms"] / r["fwd_bwd_ms"])
    timm = [r for r in residual if "timm DropPath" in r["call"]]
    assert len(timm) == 6
    if not HAS_TIMM:  # the baseline is then our drop_path (timm's bits), timm's rows carry a note
        assert all(r["note"].startswith("timm not installed") for r in timm)
    assert main([*BENCH, "--suite", "keyed", "--format", "json", "--out", str(out), "--force"]) == 0
    rows = json.loads(out.read_text())["rows"]
    keyed = [r for r in rows if r["call"] == "spatial_dropout(x, p, key=key)"]
    assert len(keyed) == 2
    for r in keyed:
        assert 0.05 < r["drop_mean"] < 0.15
    draws = [r for r in rows if r["call"].startswith("keyed_uniform")]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] is None for r in draws)


@pytest.mark.parametrize(
    ("fmt", "titles"),
    [
        ("table", ("call", "fwd ms", "f+b ms", "f+b/ref", "tv/ours", "/eager", "saved", "drop")),
        (
            "markdown",
            (
                "| case | shape | library | call |",
                "fwd / x * 2.0",
                "fwd+bwd ms",
                "fwd+bwd compiled / eager",
                "saved for bwd",
                "drop mean",
                "drop corner",
                "drop centre",
            ),
        ),
    ],
)
def test_bench_text_formats_have_the_columns(
    fmt: str, titles: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*BENCH, "--suite", "spatial", "--format", fmt]) == 0
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert "torch threads 1" in out
    for title in titles:
        assert title in out
    assert "F.dropout1d(x.permute(0, 2, 1), p).permute(0, 2, 1)" in out
    assert re.fullmatch(r"bench done in \d+ s\n", captured.err)  # the elapsed time, beside the results


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt is Linux only")
def test_bench_uses_the_default_allocator_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [*BENCH, "--suite", "spatial", "--format", "json", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["environment"]["malloc"] == "default (glibc)"
    assert main([*argv, "--tuned-malloc", "--force"]) == 0
    if bench_measure.steady_malloc(False):  # glibc: tuned during the run, defaults restored after it
        assert json.loads(out.read_text())["environment"]["malloc"] == bench.TUNED_MALLOC


def test_bench_goals_are_checked_on_the_medians() -> None:
    Row = bench_measure.Row  # Row(kind, suite, case, shape, p, library, call, fwd, ratio, f+b, ratio)
    rows = [
        Row("speed", "spatial", "2-D maps", "s", 0.1, "torch", "x * 2.0", 1.0, 1.0, 2.0, 1.0),
        Row(
            "speed",
            "spatial",
            "2-D maps",
            "s",
            0.1,
            "spatialdrop",
            "spatial_dropout(x, p)",
            1.1,
            1.1,
            2.6,
            1.3,
        ),
        Row("speed", "spatial", "2-D maps", "s", 0.1, "torch", "F.dropout2d(x, p)", 1.1, 1.1, 2.2, 1.1),
        Row(
            "speed",
            "dropblock",
            "2-D, block 7, a mask per channel",
            "s",
            0.1,
            "torch",
            "x * 2.0",
            1.0,
            1.0,
            2.0,
            1.0,
            clean_calls=10,
            calls=15,
        ),
        Row(  # 2.5x over all calls, 1.25x over those that got no fresh pages
            "speed",
            "dropblock",
            "2-D, block 7, a mask per channel",
            "s",
            0.1,
            "spatialdrop",
            "drop_block(x, p, 7)",
            3.0,
            3.0,
            5.0,
            2.5,
            vs_torchvision=19.0,
            saved_fraction=0.03,
            fwd_bwd_clean_ratio=1.25,
            clean_calls=9,
            calls=15,
        ),
        Row(
            "speed",
            "dropblock",
            "2-D, block 7, a mask per channel",
            "s",
            0.1,
            "spatialdrop",
            "compile(drop_block(x, p, 7))",
            3.0,
            3.0,
            5.25,
            2.6,
            fwd_bwd_vs_eager=1.05,
        ),
        Row(
            "speed",
            "dropblock",
            "3-D, block 5, a mask per channel",
            "s",
            0.1,
            "spatialdrop",
            "drop_block(x, p, 5)",
            3.0,
            3.0,
            2.4,
            1.2,
            vs_torchvision=25.0,
        ),
    ]
    mlp = "DropPath residual, a ViT-S block's MLP (timm: norm2, mlp)"
    bottleneck = "DropPath residual, a ResNet-50 bottleneck (1x1, 3x3, 1x1 convs, BatchNorm)"
    ours, timm = "drop_path_residual(x, branch, p)", "x + timm DropPath(p)(branch(x))"
    for case, p, speed_up in ((mlp, 0.3, 1.4), (mlp, 0.1, 1.3), (bottleneck, 0.3, 1.2)):
        rows.append(
            Row(
                "speed", "family", case, "s", p, "spatialdrop", ours, 1.0, 1.0, 2.0, 1.0, vs_baseline=speed_up
            )
        )
        rows.append(Row("speed", "family", case, "s", p, "timm", timm, 1.0, 1.0, 2.0, 1.0, vs_baseline=1.0))
    checked = {g.what: g.met for g in goals.goals(rows)}
    assert checked == {
        "spatial dropout, 2-D maps s: torch's forward time / ours": True,  # 1.1 / 1.1
        "spatial dropout, 2-D maps s: torch's fwd+bwd time / ours": False,  # 2.2 / 2.6 = 0.85
        "spatial dropout, 2-D maps s: forward time / x * 2.0": True,  # 1.1
        "spatial dropout, 2-D maps s: fwd+bwd time / x * 2.0": False,  # 1.3
        "DropBlock 2-D per channel s: fwd+bwd time / x * 2.0, calls that got no fresh pages "
        "(9 of ours and 10 of x * 2.0's 15 calls)": True,  # 1.25 <= 1.3
        "DropBlock 3-D per channel s: fwd+bwd time / x * 2.0, all calls": True,  # 1.2 <= 1.3
        "DropBlock 3-D per channel s: torchvision's fwd+bwd time / ours": True,  # 25 >= 20
        "DropBlock 2-D per channel s: torchvision's fwd+bwd time / ours": False,  # 19 < 20
        "DropBlock 2-D per channel s: bytes saved for backward / input bytes": True,
        "compile(drop_block(x, p, 7)) s: fwd+bwd time compiled / eager": True,  # 1.05 <= 1.1
        f"{mlp} s, p 0.3: x + DropPath(branch(x)) fwd+bwd time / ours": True,  # 1.4 >= 1.25
        f"{mlp} s, p 0.3: |fwd+bwd speed-up / (1 / (1 - p)) - 1|": True,  # 1.4 * 0.7 = 0.98
        f"{mlp} s, p 0.1: |fwd+bwd speed-up / (1 / (1 - p)) - 1|": False,  # 1.3 * 0.9 = 1.17
        f"{bottleneck} s, p 0.3: |fwd+bwd speed-up / (1 / (1 - p)) - 1|": False,  # 1.2 * 0.7 = 0.84
    }
    text = "\n".join(str(g) for g in goals.goals(rows))
    assert re.search(r"issue|#\d|\[\d+\]", text, re.IGNORECASE) is None  # stated by what they measure


@pytest.mark.parametrize(("ours", "reference"), [(9, 2), (2, 9), (None, 9)])
def test_memory_goals_fall_back_to_all_calls(ours: int | None, reference: int) -> None:
    # fewer than 3 calls without fresh pages on either side: the median of all calls decides
    Row = bench_measure.Row
    case = "2-D, block 7, a mask per channel"
    rows = [
        Row(
            "speed",
            "dropblock",
            case,
            "s",
            0.1,
            "torch",
            "x * 2.0",
            1.0,
            1.0,
            2.0,
            1.0,
            clean_calls=reference,
        ),
        Row(
            "speed",
            "dropblock",
            case,
            "s",
            0.1,
            "spatialdrop",
            "drop_block(x, p, 7)",
            3.0,
            3.0,
            5.0,
            2.5,
            fwd_bwd_clean_ratio=None if ours is None else 1.25,
            clean_calls=ours,
        ),
    ]
    (goal,) = [g for g in goals.goals(rows) if "x * 2.0" in g.what]
    assert goal.what.endswith(", all calls")
    assert goal.measured == 2.5
    assert not goal.met


def test_clean_calls_are_those_without_fresh_pages() -> None:
    times = [1.0, 9.0, 2.0, 8.0, 3.0]
    faults = [0, 6272, 15, 6300, 1]
    assert bench_measure._clean_median(times, faults, 784) == (2.0, 3)
    assert bench_measure._clean_median(times, [784] * 5, 784) == (None, 0)


def test_bench_drop_rates_see_the_corners() -> None:
    def corners_only(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[..., 0, 0] = y[..., 0, -1] = y[..., -1, 0] = y[..., -1, -1] = 0
        return y

    mean, corner, centre = bench_measure.drop_rates(corners_only, (2, 3, 5, 5), (2, 3), min_samples=1)
    assert (mean, corner, centre) == (pytest.approx(4 / 25), 1.0, 0.0)


@pytest.mark.parametrize("suite", ["spatial", "dropblock", "family", "keyed"])
def test_bench_table_fits_in_100_columns(suite: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BENCH, "--suite", suite, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) > 10
    too_wide = [line for line in lines if len(line) > bench_report.WIDTH]
    assert too_wide == []
    assert re.search(r"\bissues?\b", out, re.IGNORECASE) is None


def test_compiled_rows_sit_next_to_eager_with_their_ratio(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    compiled: list[dict[str, Any]] = []

    def fake_compile(fn: Any, **options: Any) -> Any:  # compiling for real takes minutes here
        compiled.append(options)
        return lambda x: fn(x)

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "bench.json"
    argv = [a for a in BENCH if a != "--no-compile"]
    assert main([*argv, "--suite", "all", "--format", "json", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    twins = [r for r in rows if r["call"].startswith("compile(")]
    assert {(r["case"], r["call"]) for r in twins} == {
        ("2-D maps", "compile(spatial_dropout(x, p))"),
        ("2-D, block 7, a mask per channel", "compile(drop_block(x, p, 7))"),
        (
            "2-D, block 7, one mask shared by the channels",
            "compile(drop_block(x, p, 7, shared_channels=True))",
        ),
        ("3-D, block 5, a mask per channel", "compile(drop_block(x, p, 5))"),
        (
            "3-D, block 5, one mask shared by the channels",
            "compile(drop_block(x, p, 5, shared_channels=True))",
        ),
    }
    assert compiled == [{"fullgraph": True, "dynamic": False}] * 5
    for twin in twins:
        eager = next(r for r in rows if r["case"] == twin["case"] and r["call"] == twin["call"][8:-1])
        assert twin["fwd_bwd_vs_eager"] == pytest.approx(twin["fwd_bwd_ms"] / eager["fwd_bwd_ms"])
        assert twin["fwd_vs_eager"] == pytest.approx(twin["fwd_ms"] / eager["fwd_ms"])
        assert eager["fwd_bwd_vs_eager"] is None


def test_an_implementation_that_fails_gets_a_note_and_the_others_are_measured() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("compiler says no\nsecond line")

    impls = [
        bench_cases.Impl("spatialdrop", "spatial_dropout(x, p)", lambda x: x * 1.0),
        bench_cases.Impl(
            "spatialdrop", "compile(spatial_dropout(x, p))", broken, eager="spatial_dropout(x, p)"
        ),
    ]
    case = bench_cases.Case("spatial", "c", (2, 3, 4, 4), (2, 3), impls, 0.1)
    rows = bench_measure.measure(case, repeats=2, warmup=1, min_samples=8)
    assert rows[1].fwd_ms is not None
    assert rows[2].fwd_ms is None
    assert rows[2].note == "failed: RuntimeError: compiler says no"


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    real = bench.measure
    calls = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "measure", interrupted)


def test_bench_ctrl_c_writes_the_rows_measured_so_far_beside_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _interrupt_at(monkeypatch, 2)
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--suite", "spatial", "--format", "json", "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert captured.err.startswith("spatialdrop bench: interrupted after ")
    partial = tmp_path / "bench.partial.json"
    assert f"wrote the 3 rows measured so far to {partial}" in captured.err
    assert not out.exists()
    report = json.loads(partial.read_text())
    assert {r["case"] for r in report["rows"]} == {"2-D maps"}
    assert report["partial"] is True
    assert report["interrupted"].endswith("1 of 4 cases measured")
    assert report["command"] == " ".join(
        ["spatialdrop", *BENCH, "--suite", "spatial", "--format", "json", "--out", str(out)]
    )


@pytest.mark.parametrize("fmt", ["csv", "json", "markdown", "table"])
def test_bench_ctrl_c_never_replaces_a_complete_result(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"full.{fmt}"
    argv = [*BENCH, "--suite", "spatial", "--format", fmt, "--out", str(out)]
    assert main(argv) == 0
    complete = out.read_bytes()
    capsys.readouterr()
    _interrupt_at(monkeypatch, 3)
    assert main([*argv, "--force"]) == 130
    err = capsys.readouterr().err
    assert out.read_bytes() == complete  # the complete result stays
    partial = tmp_path / f"full.partial.{fmt}"
    assert f"to {partial} ({out} left as it was)" in err
    text = partial.read_text()
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert {r["partial"] for r in rows} == {"True"}
        assert {r["partial"] for r in csv.DictReader(io.StringIO(complete.decode()))} == {"False"}
        assert {r["case"] for r in rows} == {"2-D maps", "2-D maps, many channels"}
    elif fmt == "json":
        assert json.loads(text)["partial"] is True
        assert json.loads(complete)["partial"] is False
    else:
        first = text.splitlines()[0]
        assert "PARTIAL RESULTS (interrupted after " in first
        assert "2 of 4 cases measured" in first
        assert "PARTIAL" not in complete.decode()


def test_bench_ctrl_c_before_any_row_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "measure", interrupted)
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--suite", "spatial", "--out", str(out)]) == 130
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either
    assert "Traceback" not in capsys.readouterr().err


def test_bench_repeats_default_is_what_the_help_says(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    found = re.search(r"timed repeats per row \(default: (\d+); (\d+) with --quick\)", text)
    assert found is not None
    used: list[int] = []

    def record(case: Any, repeats: int, *args: Any, **kwargs: Any) -> list[Any]:
        used.append(repeats)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "measure", record)
    main(["bench", "--suite", "spatial", "--no-progress", "--no-compile"])
    main(["bench", "--suite", "spatial", "--no-progress", "--no-compile", "--quick"])
    assert used == [int(found.group(1)), int(found.group(2))]


@pytest.mark.skipif(sys.platform != "linux", reason="getrusage's fault counts: Linux")
def test_measure_counts_the_calls_that_got_fresh_pages() -> None:
    # an op that touches every page of a new 40 MB anonymous mapping each call (fresh pages,
    # whatever state the allocator is in) has no clean call; the reference, on 16 kB (below any
    # mmap threshold of glibc's: 4 pages of its output, under the 16 counted as fresh), has some
    def fresh(x: torch.Tensor) -> torch.Tensor:
        with mmap.mmap(-1, 40 << 20) as pages:
            view = torch.frombuffer(pages, dtype=torch.uint8)
            view[::4096] = 1
            del view
        return x * 2.0

    impl = bench_cases.Impl("test", "fresh", fresh, drops=False)
    case = bench_cases.Case("dropblock", "fresh pages", (64, 64), (1,), [impl], 0.1)
    ref, row = bench_measure.measure(case, repeats=6, warmup=1)
    assert row.calls == ref.calls == 6
    assert row.clean_calls == 0
    assert row.fwd_bwd_clean_ms is None
    assert row.fwd_bwd_faults is not None
    assert row.fwd_bwd_faults > 9000  # 40 MB in 4 kB pages, every call
    assert ref.clean_calls is not None
    assert ref.clean_calls >= 3
    assert ref.fwd_bwd_clean_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_the_bench_prints_no_verdicts_and_points_to_the_goals_script(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*BENCH, "--suite", "spatial", "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert "MISSED" not in out
    assert " met" not in out
    assert "--quick smoke run" in " ".join(out.split())
    last = out.strip().splitlines()[-1]
    assert "python benchmarks/goals.py NAME.json" in last.replace("`", "")


def _report(path: Path, rows: list[Any], **fields: Any) -> Path:
    report = {"command": "spatialdrop bench", "partial": False, "smoke_run": False, "rows": rows}
    path.write_text(json.dumps({**report, **fields}))
    return path


def _goals_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GOALS_SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_the_goals_script_exits_1_on_a_missed_goal_and_0_when_all_are_met(tmp_path: Path) -> None:
    Row = bench_measure.Row
    case = "3-D, block 5, a mask per channel"
    ref = Row("speed", "dropblock", case, "s", 0.1, "torch", "x * 2.0", 1.0, 1.0, 2.0, 1.0)
    ours = Row("speed", "dropblock", case, "s", 0.1, "spatialdrop", "drop_block(x, p, 5)", 3.0, 3.0)
    good = {**dataclasses.asdict(ours), "fwd_bwd_ms": 2.4, "fwd_bwd_ratio": 1.2, "vs_torchvision": 25.0}
    bad = {**good, "vs_torchvision": 19.0}
    met = _goals_script(str(_report(tmp_path / "met.json", [dataclasses.asdict(ref), good])))
    assert met.returncode == 0, met.stderr
    assert "DropBlock 3-D per channel s: torchvision's fwd+bwd time / ours: 25 (goal >= 20) met" in met.stdout
    assert "2 of 2 goals met" in met.stdout
    missed = _goals_script(str(_report(tmp_path / "missed.json", [dataclasses.asdict(ref), bad])))
    assert missed.returncode == 1, missed.stderr
    assert "torchvision's fwd+bwd time / ours: 19 (goal >= 20) MISSED" in missed.stdout
    assert missed.stderr == ""


def test_the_goals_script_checks_no_goal_on_a_quick_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--suite", "spatial", "--out", str(out)]) == 0
    done = _goals_script(str(out))
    assert done.returncode == 0, done.stderr
    assert "goals are set for the full-size shapes, so they are not checked" in " ".join(done.stdout.split())
    assert "MISSED" not in done.stdout
    assert " met" not in done.stdout


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot read it"),
        ("| case | shape |\n|---|---|\n", "not JSON"),
        ('{"command": "spatialdrop bench"}', "not a report of spatialdrop bench"),
        ('{"rows": [1, 2]}', "not a report of spatialdrop bench"),
        ('{"rows": [{"case": 3, "call": "x"}]}', "a row does not read as the bench's"),
    ],
)
def test_the_goals_script_exits_2_on_a_bad_file(tmp_path: Path, content: str | None, why: str) -> None:
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    done = _goals_script(str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith(f"goals.py: {path}: {why}")


def test_the_goals_script_agrees_with_the_bench_on_the_reference() -> None:
    assert goals.REFERENCE == bench_cases.REFERENCE
    assert set(goals.FIELDS) <= {f.name for f in bench_measure.Row.__dataclass_fields__.values()}


def test_a_second_interrupted_run_keeps_the_first_partial_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _interrupt_at(monkeypatch, 2)
    out = tmp_path / "bench.json"
    argv = [*BENCH, "--suite", "spatial", "--out", str(out)]
    assert main(argv) == 130
    first = (tmp_path / "bench.partial.json").read_bytes()
    capsys.readouterr()
    _interrupt_at(monkeypatch, 2)
    assert main(argv) == 130
    second = tmp_path / "bench.partial-2.json"
    assert f"to {second}" in capsys.readouterr().err
    assert (tmp_path / "bench.partial.json").read_bytes() == first  # the older partial stays
    assert json.loads(second.read_text())["partial"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.partial-2.json", "bench.partial.json"]
