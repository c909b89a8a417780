from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from spatialdrop.cli import demo, demo_data, demo_plot, demo_train, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000, f"{path} is only {len(data)} bytes"
    assert data[:8] == PNG_MAGIC


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
        assert set(variant["metrics"]) >= set(demo_train.METRICS)
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


def test_demo_volumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.pyplot as plt

    figures: list[object] = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    argv = ["demo", "--data", "volumes", *TINY_DEMO, "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SpatialDropout3d" in out
    assert "DropBlock3d + DropSchedule" in out
    assert "synthetic" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["data"] == "volumes"
    assert_png(tmp_path / "figure.png")
    # the figure says what it is: synthetic data, and a smoke run
    (fig,) = figures
    title = fig._suptitle.get_text()  # type: ignore[attr-defined]
    assert title.startswith("spatialdrop demo --data volumes --quick: ")
    assert "synthetic data" in title.splitlines()[1]
    assert "smoke run" in title.splitlines()[1]
    assert title.splitlines()[1] in out


def test_volumes_are_balanced_deterministic_and_distinct() -> None:
    x, y = demo_data.make_volumes(50, 12, torch.Generator().manual_seed(0), noise=0.0)
    x2, y2 = demo_data.make_volumes(50, 12, torch.Generator().manual_seed(0), noise=0.0)
    assert x.shape == (50, 1, 12, 12, 12)
    assert torch.equal(x, x2)
    assert torch.equal(y, y2)
    assert torch.bincount(y).tolist() == [10] * len(demo_data.VOLUME_CLASSES)
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
    assert demo_train.auroc(scores, positive) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert demo_train.auroc(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([False, False, True])) == 1.0
    assert demo_train.auroc(torch.tensor([0.9, 0.2, 0.1]), torch.tensor([False, False, True])) == 0.0
    assert math.isnan(demo_train.auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))


def test_expected_calibration_error() -> None:
    # confident and right: 0; four predictions at confidence 0.9 of which two right: |0.5 - 0.9|
    right = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert demo_train.expected_calibration_error(right, torch.tensor([0, 1])) == pytest.approx(0.0)
    probs = torch.tensor([[0.9, 0.1]] * 4)
    labels = torch.tensor([0, 0, 1, 1])
    assert demo_train.expected_calibration_error(probs, labels) == pytest.approx(0.4)
    # two bins, equal weight: |1 - 0.95| and |0 - 0.55|
    probs = torch.tensor([[0.95, 0.05], [0.45, 0.55]])
    assert demo_train.expected_calibration_error(probs, torch.tensor([0, 0])) == pytest.approx(
        0.5 * 0.05 + 0.5 * 0.55
    )


def test_demo_prints_its_elapsed_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", *TINY_DEMO, "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {tmp_path / 'results.json'} and {tmp_path / 'figure.png'} in ")
    assert last.endswith(" s)")


def test_demo_refuses_to_overwrite_its_results_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", *TINY_DEMO, "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    before = (tmp_path / "results.json").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "already holds results.json, figure.png; pass --force" in err
    assert (tmp_path / "results.json").read_bytes() == before
    assert main([*argv, "--force", "--seed", "1"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["seed"] == 1


def test_demo_ctrl_c_writes_nothing_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = demo_train.train_run
    calls = []

    def interrupted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # the second training: one finished, one in progress
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(demo_train, "train_run", interrupted)
    out = tmp_path / "demo"
    assert main(["demo", *TINY_DEMO, "--epochs", "1", "--seeds", "1", "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()]  # one line
    assert captured.err.startswith("spatialdrop demo: interrupted after ")
    assert "nothing written" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists() or list(out.iterdir()) == []


def test_figure_labels_match_the_legend_and_show_all_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    epochs = [1, 2, 3]
    summary = {}
    for k, variant in enumerate(demo_train.VARIANTS):
        curves = [
            {"epoch": epochs, "test_accuracy": [0.05 + 0.1 * k, 0.8, 0.9], "train_loss": [2.0, 0.5, 0.01]}
        ] * 2
        metrics = {m: {"mean": 0.5, "std": 0.1, "per_seed": [0.4, 0.6]} for m in demo_train.METRICS}
        layer = demo.LAYER_NAMES[variant].format(d=2)
        summary[variant] = {"layer": layer, "curves": curves, "metrics": metrics}
    demo_plot.plot(summary, tmp_path / "f.png", "title")
    assert_png(tmp_path / "f.png")
    (fig,) = figures
    legend_ax, acc, loss, *metric_axes = fig.axes
    legend_labels = [t.get_text() for t in legend_ax.get_legend().get_texts()]
    assert legend_labels == [s["layer"] for s in summary.values()]
    assert not legend_ax.axison  # a row of its own
    low, high = acc.get_ylim()
    assert low <= 0.05  # the first epoch's accuracy is on the axis
    assert high >= 0.9
    assert acc.get_legend() is None  # the legend sits outside the panels
    assert loss.get_legend() is None
    for ax in metric_axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == legend_labels
    texts = [t.get_text() for t in fig.texts] + [fig._supxlabel.get_text()]
    assert any("large dot = mean over seeds" in t and "small dots" in t for t in texts)


def test_accuracy_axis_spreads_the_values_near_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    curves = [{"epoch": [1, 10, 20], "test_accuracy": [0.1, 0.95, 0.96], "train_loss": [2.0, 0.3, 0.1]}]
    metrics = {m: {"mean": 0.5, "std": 0.0, "per_seed": [0.5]} for m in demo_train.METRICS}
    summary = {"none": {"layer": "no dropout", "curves": curves, "metrics": metrics}}
    demo_plot.plot(summary, tmp_path / "f.png", "title")
    (fig,) = figures
    acc = fig.axes[1]
    assert acc.get_yscale() == "logit"
    low, high = acc.get_ylim()
    assert low <= 0.1
    assert high >= 0.96
    # 0.95 -> 0.96 takes over 3 % of the axis height (on a linear 0.1-0.96 axis: about 1 %)
    to_axes = acc.transAxes.inverted().transform
    y95, y96 = (to_axes(acc.transData.transform((10, v)))[1] for v in (0.95, 0.96))
    assert y96 - y95 > 0.03


def test_progress_clock_starts_with_the_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    class Bar:
        n = 0

        def __init__(self, *args: object, total: int, **kwargs: object) -> None:
            self.total = total

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int = 1) -> None:
            self.n += n
            events.append("epoch")

        def reset(self) -> None:
            events.append("reset")

    real_load = demo_train.load_data
    monkeypatch.setattr(demo_train, "progress", Bar)
    monkeypatch.setattr(demo_train, "load_data", lambda *a: events.append("load") or real_load(*a))
    settings = demo_train.make_settings("digits", True, epochs=2, seeds=1, mc_samples=2, jobs=1)
    demo_train.run_all(replace(settings, variants=("none", "dropout")), show_progress=True)
    # the data loading (and, in worker processes, their start-up) is not counted as an epoch's time
    assert events == ["load", "reset", "epoch", "epoch", "load", "epoch", "epoch"]


def test_one_seed_is_shown_as_n_1_not_a_zero_spread() -> None:
    metrics = {m: {"mean": 0.5, "std": 0.0, "per_seed": [0.5]} for m in demo_train.METRICS}
    summary = {"none": {"layer": "no dropout", "metrics": metrics}}
    _, rows = demo.table_rows(summary)
    assert rows[0][1:] == ["0.500 (n = 1)*"] * len(demo_train.METRICS)
    metrics = {m: {"mean": 0.5, "std": 0.1, "per_seed": [0.4, 0.6]} for m in demo_train.METRICS}
    _, rows = demo.table_rows({"none": {"layer": "no dropout", "metrics": metrics}})
    assert rows[0][1] == "0.500 ± 0.100*"


def test_a_failed_write_keeps_both_old_files_and_prints_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from matplotlib.figure import Figure

    argv = ["demo", *TINY_DEMO, "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]
    before = {"results.json": b"an older run's results", "figure.png": b"an older run's figure"}
    for name, content in before.items():
        (tmp_path / name).write_bytes(content)

    def full(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    assert main([*argv, "--force", "--seed", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "spatialdrop demo: failed: OSError: [Errno 28] No space left on device\n"
    assert "regulariser" in captured.out  # the table of the run is shown all the same
    after = {name: (tmp_path / name).read_bytes() for name in ("results.json", "figure.png")}
    assert after == before  # neither file replaced: the two stay in step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "results.json"]
