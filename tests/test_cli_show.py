from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from spatialdrop.cli import main, show

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000, f"{path} is only {len(data)} bytes"
    assert data[:8] == PNG_MAGIC


@pytest.mark.parametrize("panels", ["all", "masks", "rates"])
def test_show_writes_a_png(panels: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "masks.png"
    argv = [
        "show",
        "--size",
        "12",
        "--block-size",
        "3",
        "-p",
        "0.2",
        "--draws",
        "300",
        "--panels",
        panels,
        "--no-progress",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} in ")
    assert_png(out)


def test_show_block_larger_than_the_map(tmp_path: Path) -> None:
    # ours handles it (uniform seeding); the 'valid' placement refuses, which the panel reports
    out = tmp_path / "big.png"
    assert (
        main(
            ["show", "--size", "5", "--block-size", "7", "--draws", "100", "--no-progress", "--out", str(out)]
        )
        == 0
    )
    assert_png(out)


def test_rate_map_of_our_dropblock_is_flat() -> None:
    from spatialdrop.functional import drop_block

    torch.manual_seed(0)
    rate = show.rate_map(lambda x: drop_block(x, 0.2, 3), size=9, draws=4000)
    # every position dropped with probability 0.2: 4000 draws give sd 0.0063 per position
    assert float(rate.mean()) == pytest.approx(0.2, abs=0.01)
    assert float((rate - 0.2).abs().max()) < 0.04


def test_show_writes_exactly_the_path_it_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "noext"
    argv = ["show", "--size", "8", "--block-size", "3", "--draws", "50", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} in ")
    assert_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext"]


def test_show_progress_moves_with_the_draws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    updates: list[int] = []

    class Bar:
        def __init__(self, command: str, *, total: int, **kwargs: Any) -> None:
            self.total = total

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int = 1) -> None:
            updates.append(n)

        def set_postfix_str(self, text: str) -> None:
            pass

    monkeypatch.setattr(show, "progress", Bar)
    argv = ["show", "--size", "8", "--block-size", "3", "--draws", "2500", "--panels", "rates"]
    assert main([*argv, "--out", str(tmp_path / "r.png")]) == 0
    # at least our two DropBlocks, each in chunks: the bar moves during a layer, not only after it
    assert sum(updates) >= 2 * 2500
    assert len(updates) >= 2 * 3
    assert sum(updates) % 2500 == 0


def test_mask_panels_label_samples_and_channels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    argv = ["show", "--size", "8", "--block-size", "3", "--panels", "masks", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "m.png")]) == 0
    (fig,) = figures
    first_row = fig.subfigs[0].axes
    assert [t.get_text() for t in first_row[0].get_yticklabels()] == [f"sample {i}" for i in range(1, 5)]
    for ax in first_row:
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"ch {j}" for j in range(1, 5)]
    assert "black = dropped" in fig._supxlabel.get_text()


@pytest.mark.parametrize(("argv", "arg"), [(["--block-size", "100000000000"], "block_size")])
def test_show_refuses_settings_dropblock_refuses_before_drawing(
    argv: list[str],
    arg: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a block whose seed grid cannot be represented used to hang here; now: one line, exit 2
    def never(**_: Any) -> int:
        raise AssertionError("drawing started")

    monkeypatch.setattr(show, "run_show", never)
    out = tmp_path / "masks.png"
    assert main(["show", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"drop_block: {arg} must be" in err
    assert not out.exists()
