from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spatialdrop
from spatialdrop import _bench, _demo, _optional
from spatialdrop.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000, f"{path} is only {len(data)} bytes"
    assert data[:8] == PNG_MAGIC


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
        (["demo", "-p", "1.5"], "argument -p: must be a probability in [0, 1), got '1.5'"),
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
    assert main(["show", "--out", str(out)]) == 1
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


# --- demo -----------------------------------------------------------------------------------------

TINY_DEMO = ["--quick", "--epochs", "2", "--seeds", "2", "--mc-samples", "2", "--jobs", "1", "--no-progress"]


def test_demo_writes_table_json_and_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert main(["demo", *TINY_DEMO, "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("regulariser"))
    for column in ("test acc", "test NLL", "ECE", "acc occluded", "acc noisy", "MC AUROC"):
        assert column in header
    for layer in ("no dropout", "nn.Dropout", "SpatialDropout2d", "DropBlock2d + DropSchedule"):
        assert any(line.startswith(layer) for line in out.splitlines()), layer
    assert "±" in out
    assert "--quick is a smoke run" in out

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"command", "settings", "data", "environment", "metrics", "table", "variants"}
    assert results["command"].startswith("spatialdrop demo --quick")
    assert results["settings"]["epochs"] == 2
    assert results["settings"]["seeds"] == 2
    assert results["settings"]["quick"] is True
    assert set(results["variants"]) == {"none", "dropout", "spatial", "dropblock"}
    for variant in results["variants"].values():
        assert set(variant["metrics"]) >= set(_demo.METRICS)
        for m in variant["metrics"].values():
            assert len(m["per_seed"]) == 2
            assert set(m) == {"mean", "std", "per_seed"}
        acc = variant["metrics"]["accuracy"]
        assert 0.0 <= acc["mean"] <= 1.0
        assert acc["mean"] == pytest.approx(sum(acc["per_seed"]) / 2)
        assert len(variant["curves"]) == 2
        assert variant["curves"][0]["epoch"] == [1, 2]
    assert results["table"]["header"][0] == "regulariser"
    assert_png(tmp_path / "figure.png")


def test_demo_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    argv = ["demo", *TINY_DEMO, "--epochs", "1", "--seeds", "1", "--seed", "3"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    for name in a["variants"]:
        assert a["variants"][name]["metrics"] == b["variants"][name]["metrics"]
        assert a["variants"][name]["curves"] == b["variants"][name]["curves"]


def test_demo_volumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--data", "volumes", *TINY_DEMO, "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SpatialDropout3d" in out
    assert "DropBlock3d + DropSchedule" in out
    assert "synthetic" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["data"] == "volumes"
    assert_png(tmp_path / "figure.png")


def test_volumes_are_balanced_deterministic_and_distinct() -> None:
    x, y = _demo.make_volumes(50, 12, torch.Generator().manual_seed(0), noise=0.0)
    x2, y2 = _demo.make_volumes(50, 12, torch.Generator().manual_seed(0), noise=0.0)
    assert x.shape == (50, 1, 12, 12, 12)
    assert torch.equal(x, x2)
    assert torch.equal(y, y2)
    assert torch.bincount(y).tolist() == [10] * len(_demo.VOLUME_CLASSES)
    # noise-free solids: every volume has some solid voxels, and none fills the box
    filled = (x > 0).flatten(1).float().mean(dim=1)
    assert bool((filled > 0.02).all())
    assert bool((filled < 0.9).all())


def test_auroc_matches_the_pairwise_definition() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    positive = torch.rand(200, generator=g) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert _demo.auroc(scores, positive) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert _demo.auroc(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([False, False, True])) == 1.0
    assert _demo.auroc(torch.tensor([0.9, 0.2, 0.1]), torch.tensor([False, False, True])) == 0.0
    assert math.isnan(_demo.auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))


def test_expected_calibration_error() -> None:
    # confident and right: 0; four predictions at confidence 0.9 of which two right: |0.5 - 0.9|
    right = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert _demo.expected_calibration_error(right, torch.tensor([0, 1])) == pytest.approx(0.0)
    probs = torch.tensor([[0.9, 0.1]] * 4)
    labels = torch.tensor([0, 0, 1, 1])
    assert _demo.expected_calibration_error(probs, labels) == pytest.approx(0.4)
    # two bins, equal weight: |1 - 0.95| and |0 - 0.55|
    probs = torch.tensor([[0.95, 0.05], [0.45, 0.55]])
    assert _demo.expected_calibration_error(probs, torch.tensor([0, 0])) == pytest.approx(
        0.5 * 0.05 + 0.5 * 0.55
    )


# --- bench ----------------------------------------------------------------------------------------

BENCH = ["bench", "--quick", "--repeats", "2", "--no-progress", "--threads", "1"]


def test_bench_json_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--suite", "spatial", "--format", "json", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report) == {"command", "environment", "rows", "goals"}
    assert report["goals"] == []  # --quick shapes are not the issues' shapes
    assert report["environment"]["torch_threads"] == 1
    assert report["environment"]["torch"] == torch.__version__
    rows = report["rows"]
    assert {r["case"] for r in rows} == {c.name for c in _bench.spatial_cases(True, 0.1)}
    assert set(rows[0]) == {f.name for f in _bench.Row.__dataclass_fields__.values()}
    for r in rows:
        assert r["fwd_ms"] > 0
        assert r["fwd_bwd_ms"] > 0
        if r["call"] == _bench.REFERENCE:
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
        assert float(r["saved_fraction"]) < 0.25  # issue 3: at most a quarter of the input
    # calibration: our default seeding drops p at the corners and the centre too
    uniform = [
        r
        for r in rows
        if r["kind"] == "calibration" and r["call"].startswith("drop_block") and "valid" not in r["call"]
    ]
    assert len(uniform) == len(_bench.CALIBRATION)
    for r in uniform:
        p = float(r["p"])
        for key in ("drop_mean", "drop_corner", "drop_centre"):
            assert float(r[key]) == pytest.approx(p, abs=0.06), (r["case"], key)
    assert uniform[0]["fp16_ok"] == "True"
    # peers: measured when installed, else listed with a note and no numbers
    tv = [r for r in rows if r["library"] == "torchvision"]
    assert len(tv) == 2 + len(_bench.CALIBRATION)
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
    assert main([*BENCH, "--suite", "keyed", "--format", "json", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    keyed = [r for r in rows if r["call"] == "spatial_dropout(x, p, key=key)"]
    assert len(keyed) == 2
    for r in keyed:
        assert 0.05 < r["drop_mean"] < 0.15
    draws = [r for r in rows if r["call"].startswith("keyed_uniform")]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] is None for r in draws)


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_bench_text_formats_have_the_columns(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BENCH, "--suite", "spatial", "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert "torch threads 1" in out
    for title in (
        "fwd ms",
        "fwd / x * 2.0",
        "fwd+bwd ms",
        "saved for bwd",
        "drop mean",
        "drop corner",
        "drop centre",
    ):
        assert title in out
    assert "F.dropout1d(x.permute(0, 2, 1), p).permute(0, 2, 1)" in out
    if fmt == "markdown":
        assert "| case | shape | library | call |" in out


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt is Linux only")
def test_bench_steady_malloc_is_reported_and_optional(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [*BENCH, "--suite", "spatial", "--format", "json", "--out", str(out)]
    assert main(argv) == 0
    env = json.loads(out.read_text())["environment"]
    if _bench.steady_malloc(False):  # glibc: tuned during the run, defaults restored after it
        assert env["malloc"].startswith("glibc, mmap off")
    assert main([*argv, "--default-malloc"]) == 0
    assert json.loads(out.read_text())["environment"]["malloc"] == "default"


def test_bench_goals_are_checked_on_the_medians() -> None:
    # Row(kind, suite, case, shape, p, library, call, fwd_ms, fwd_ratio, fwd_bwd_ms, fwd_bwd_ratio)
    rows = [
        _bench.Row("speed", "spatial", "2-D maps", "s", 0.1, "torch", "x * 2.0", 1.0, 1.0, 2.0, 1.0),
        _bench.Row(
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
        _bench.Row(
            "speed", "spatial", "2-D maps", "s", 0.1, "torch", "F.dropout2d(x, p)", 1.1, 1.1, 2.2, 1.1
        ),
        _bench.Row(
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
        ),
    ]
    checked = {g.what.split(": ", 1)[-1] + f" [{g.issue}]": g.met for g in _bench.goals(rows)}
    assert checked == {
        "torch time / ours, forward [2]": True,  # 1.1 / 1.1
        "torch time / ours, fwd+bwd [2]": False,  # 2.2 / 2.6 = 0.85
        "ours / x * 2.0, forward [2]": True,  # 1.1
        "ours / x * 2.0, fwd+bwd [2]": False,  # 1.3
        "fwd+bwd / x * 2.0 [3]": True,  # 2.5 <= 4
        "speed-up over torchvision [3]": False,  # 19 < 20
        "saved for backward / input bytes [3]": True,
    }


def test_bench_drop_rates_see_the_corners() -> None:
    def corners_only(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[..., 0, 0] = y[..., 0, -1] = y[..., -1, 0] = y[..., -1, -1] = 0
        return y

    mean, corner, centre = _bench.drop_rates(corners_only, (2, 3, 5, 5), (2, 3), min_samples=1)
    assert (mean, corner, centre) == (pytest.approx(4 / 25), 1.0, 0.0)


# --- show -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("panels", ["all", "masks", "rates"])
def test_show_writes_a_png(panels: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "masks.png"
    argv = ["show", "--size", "12", "--block-size", "3", "-p", "0.2", "--draws", "300", "--panels", panels]
    assert main([*argv, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)


def test_show_block_larger_than_the_map(tmp_path: Path) -> None:
    # ours handles it (uniform seeding); the 'valid' placement refuses, which the panel reports
    out = tmp_path / "big.png"
    assert main(["show", "--size", "5", "--block-size", "7", "--draws", "100", "--out", str(out)]) == 0
    assert_png(out)


def test_rate_map_of_our_dropblock_is_flat() -> None:
    from spatialdrop.functional import drop_block

    torch.manual_seed(0)
    rate = __import__("spatialdrop._show", fromlist=["rate_map"]).rate_map(
        lambda x: drop_block(x, 0.2, 3), size=9, draws=4000
    )
    # every position dropped with probability 0.2: 4000 draws give sd 0.0063 per position
    assert float(rate.mean()) == pytest.approx(0.2, abs=0.01)
    assert float((rate - 0.2).abs().max()) < 0.04
