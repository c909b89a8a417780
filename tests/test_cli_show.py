from __future__ import annotations

import math
import re
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
    first_row = [ax for ax in fig.axes if ax.get_label() == "masks"]
    assert len(first_row) == len(show.mask_layers(0.1, 3))
    assert [t.get_text() for t in first_row[0].get_yticklabels()] == [f"sample {i}" for i in range(1, 5)]
    for ax in first_row:
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"ch {j}" for j in range(1, 5)]
    assert any("black = dropped" in t.get_text() for t in fig.texts)


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


def _figure(monkeypatch: pytest.MonkeyPatch, argv: list[str], out: Path) -> Any:
    import matplotlib.pyplot as plt

    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    assert main(["show", *argv, "--no-progress", "--out", str(out)]) == 0
    (fig,) = figures
    return fig


@pytest.mark.parametrize(
    ("suffix", "magic"),
    [
        (".png", PNG_MAGIC),
        (".PNG", PNG_MAGIC),
        (".pdf", b"%PDF-"),
        (".jpg", b"\xff\xd8\xff"),
        (".jpeg", b"\xff\xd8\xff"),
    ],
)
def test_the_out_suffix_chooses_the_format(suffix: str, magic: bytes, tmp_path: Path) -> None:
    out = tmp_path / f"fig{suffix}"
    argv = ["show", "--size", "8", "--block-size", "3", "--draws", "20", "--panels", "masks", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.read_bytes().startswith(magic)


def test_svg_output_is_svg(tmp_path: Path) -> None:
    out = tmp_path / "fig.svg"
    argv = ["show", "--size", "8", "--block-size", "3", "--panels", "masks", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<?xml")
    assert "<svg" in text


@pytest.mark.parametrize("name", ["fig.gif", "fig.txt", "fig.png.bak"])
def test_an_unknown_image_suffix_is_refused_before_any_work(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(show, "mask_layers", lambda *a: pytest.fail("drew before checking --out"))
    monkeypatch.setattr(show, "run_show", lambda **k: pytest.fail("drew before checking --out"))
    assert main(["show", "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"spatialdrop: error: spatialdrop show --out: {tmp_path / name}: cannot write a ")
    assert ".png, .pdf, .svg, .jpg or .jpeg" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("size", "block", "panels"),
    [(28, 7, "all"), (28, 100, "all"), (1, 7, "all"), (5, 7, "all"), (3, 2, "rates"), (60, 13, "masks")],
)
def test_no_title_is_cut_or_overlaps_and_a_refusal_stays_in_its_panel(
    size: int, block: int, panels: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--size", str(size), "--block-size", str(block), "--draws", "40", "--panels", panels]
    fig = _figure(monkeypatch, argv, tmp_path / "f.png")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    panels_ = [ax for ax in fig.axes if ax.get_label() in ("masks", "slices", "rates")]
    texts = [ax.title for ax in panels_ if ax.get_title()] + [t for t in fig.texts if t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    boxes += [(f"panel {ax.get_title()}", ax.get_window_extent(renderer)) for ax in panels_]
    for text, box in boxes:
        inside = page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
        assert inside, f"cut at the figure's edge: {text!r}"
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            # touching is fine (a title sits on its panel's edge), overlapping by a pixel is not
            apart = (
                box_a.x1 <= box_b.x0 + 1
                or box_b.x1 <= box_a.x0 + 1
                or box_a.y1 <= box_b.y0 + 1
                or box_b.y1 <= box_a.y0 + 1
            )
            assert apart, f"{a!r} overlaps {b!r}"
    # the rate row: a panel whose layer refuses the settings says why, wrapped, inside its frame
    rates = [ax for ax in panels_ if ax.get_label() == "rates"]
    refusals = [t for ax in rates for t in ax.texts if "refuses these settings" in t.get_text()]
    for text in refusals:  # ours, and a peer's (torchvision refuses even blocks)
        assert "drop_block:" not in text.get_text()
        frame = text.axes.get_window_extent(renderer)
        box = text.get_window_extent(renderer)
        assert frame.x0 < box.x0
        assert box.x1 < frame.x1
        assert frame.y0 < box.y0
        assert box.y1 < frame.y1
    if rates:
        # ours with uniform seeding draws blocks larger than the map: an image, not a note; the
        # paper's placement (seeding='valid') needs the block inside the map, and says so, wrapped
        assert rates[0].images
        assert not rates[0].texts
        valid = [t.get_text() for t in rates[1].texts]
        assert len(valid) == (1 if block > size else 0)
        for text in valid:
            assert text.startswith("refuses these settings:")
            assert "seeding='valid'" in " ".join(text.split())
            assert "\n" in text


def test_drop_path_counts_the_samples_it_dropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fig = _figure(monkeypatch, ["--size", "8", "--block-size", "3", "--panels", "masks"], tmp_path / "m.png")
    titles = [" ".join(ax.get_title().split()) for ax in fig.axes if ax.get_label() == "masks"]
    path = next(t for t in titles if t.startswith("DropPath"))
    found = re.search(r"this draw: (\d) of 4 samples dropped", path)
    assert found is not None, path
    spatial = next(t for t in titles if t.startswith("SpatialDropout2d"))
    assert re.search(r"this draw: \d+ of 16 channels dropped", spatial), spatial
    elementwise = next(t for t in titles if t.startswith("nn.Dropout"))
    assert re.search(r"this draw: 0\.\d{3} dropped", elementwise), elementwise


def test_drawn_counts_whole_units() -> None:
    dropped = torch.zeros(4, 4, 3, 3)
    dropped[1] = 1.0  # sample 2 dropped whole
    dropped[2, 3] = 1.0  # one channel of sample 3
    assert show._drawn(dropped, "samples") == "this draw: 1 of 4 samples dropped"
    assert show._drawn(dropped, "channels") == "this draw: 5 of 16 channels dropped"
    assert show._drawn(dropped, "") == f"this draw: {5 / 16:.3f} dropped"


def test_the_settings_check_builds_no_map(monkeypatch: pytest.MonkeyPatch) -> None:
    # a --size 100000 map is 40 GB: checking the settings must not allocate it
    sizes: list[int] = []
    real = torch.ones

    def counted(*shape: Any, **kwargs: Any) -> torch.Tensor:
        dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        sizes.append(math.prod(dims))
        return real([1] * len(dims), **kwargs).expand(*dims)  # never allocates what it counts

    monkeypatch.setattr(torch, "ones", counted)
    show.check_settings(100_000, 7, 0.1)
    assert max(sizes) == 1


def test_rate_maps_of_large_maps_are_drawn_in_small_chunks() -> None:
    assert show._chunk(28) == show.CHUNK  # the default map: the chunk as before
    assert show._chunk(512) * 512 * 512 <= show.CHUNK_ELEMENTS
    assert show._chunk(10**5) == 1
