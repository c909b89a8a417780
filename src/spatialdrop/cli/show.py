"""``spatialdrop show``: draw the masks of the layers, and the per-position drop rate of DropBlock.

Two kinds of panels, in one image (PNG, PDF, SVG or JPEG, from the suffix of ``--out``):

- ``masks``: one sample mask of each layer on a ``size × size`` map (4 samples × 4 channels per
  layer, dropped elements dark), and a 3-D DropBlock mask shown as slices of a volume;
- ``rates``: the fraction of draws in which each position of the map was dropped, over many
  independent maps, for our DropBlock (uniform seeding, the default, and the paper's ``valid``
  seeding) and for torchvision's and timm's when they are installed. A calibrated layer is flat
  at ``p``; the peers drop less at the borders than in the centre.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import spatialdrop
from spatialdrop.functional import drop_block, spatial_dropout

from ._io import SettingsError, output_format, write_atomic
from ._optional import peer, progress, require
from ._options import IMAGE_FORMATS

__all__ = [
    "IMAGE_FORMATS",
    "MaskLayer",
    "check_settings",
    "mask_layers",
    "rate_layers",
    "rate_map",
    "run_show",
]

CMD = "show"
SAMPLES, CHANNELS = 4, 4
CHUNK = 1024
CHUNK_ELEMENTS = 1 << 24
CAPTION = {
    "masks": "Masks: black = dropped, grey = kept, one tile per (sample, channel).",
    "rates": "Rates: colour = fraction of draws in which the position was dropped "
    "(one colour scale for every panel).",
}


def check_settings(size: int, block_size: int, p: float) -> None:
    """Refuse, before any drawing, the settings that DropBlock refuses (one line, exit code 2).

    DropBlock checks its arguments in eval mode too, so this draws nothing; the map it checks is
    one element broadcast to ``size × size`` (no memory for the map itself).
    """
    try:
        drop_block(torch.ones(1, 1, 1, 1).expand(1, 1, size, size), p, block_size, training=False)
    except (ValueError, TypeError) as err:
        raise SettingsError(f"spatialdrop show: {err}") from None


def _chunk(size: int) -> int:
    """Maps drawn at once for a rate map: :data:`CHUNK`, fewer for large maps (16 M elements)."""
    return max(1, min(CHUNK, CHUNK_ELEMENTS // (size * size)))


class MaskLayer(NamedTuple):
    """A layer whose sample mask is drawn; ``unit`` is what it drops whole (``""``: elements)."""

    title: str
    fn: Callable[[Tensor], Tensor]
    unit: str = ""


def mask_layers(p: float, block_size: int) -> list[MaskLayer]:
    """The 2-D layers whose sample masks are drawn."""
    b = block_size
    return [
        MaskLayer(f"nn.Dropout({p})\nelementwise", nn.Dropout(p)),
        MaskLayer(f"SpatialDropout2d({p})\nwhole channels", lambda x: spatial_dropout(x, p), "channels"),
        MaskLayer(f"DropBlock2d({p}, {b})\na mask per channel", lambda x: drop_block(x, p, b)),
        MaskLayer(
            f"DropBlock2d({p}, {b},\nshared_channels=True)",
            lambda x: drop_block(x, p, b, shared_channels=True),
        ),
        MaskLayer(f"DropPath({p})\nwhole samples", spatialdrop.DropPath(p), "samples"),
    ]


def _drawn(dropped: Tensor, unit: str) -> str:
    """What one draw dropped: a fraction of the elements, or how many of the few channels/samples.

    A layer that drops whole samples draws only ``SAMPLES`` coins: "2 of 4 samples" says what
    happened; "0.500 dropped" read like a broken rate.
    """
    if unit == "samples":
        hit = int(dropped.flatten(1).all(dim=1).sum())
        return f"this draw: {hit} of {dropped.shape[0]} samples dropped"
    if unit == "channels":
        hit = int(dropped.flatten(2).all(dim=2).sum())
        return f"this draw: {hit} of {dropped.shape[0] * dropped.shape[1]} channels dropped"
    return f"this draw: {float(dropped.mean()):.3f} dropped"


def rate_layers(p: float, block_size: int) -> list[tuple[str, Callable[[Tensor], Tensor] | str]]:
    """The DropBlocks whose drop-rate maps are drawn; a string instead of a callable is a note.

    A peer that is not installed, or installed but fails to import, gets a note saying so.
    """
    b = block_size
    layers: list[tuple[str, Callable[[Tensor], Tensor] | str]] = [
        (
            f"spatialdrop DropBlock2d({p}, {b})\n(seeding='uniform', the default)",
            lambda x: drop_block(x, p, b),
        ),
        (
            f"spatialdrop DropBlock2d({p}, {b},\nseeding='valid') (the paper's placement)",
            lambda x: drop_block(x, p, b, seeding="valid"),
        ),
    ]
    tv = peer("torchvision", "torchvision.ops.drop_block2d")
    if isinstance(tv, str):
        layers.append(("torchvision.ops.drop_block2d", tv))
    else:
        layers.append((f"torchvision.ops.drop_block2d(x, {p}, {b})", lambda x: tv(x, p, b)))
    timm = peer("timm", "timm.layers.drop_block_2d", "timm.models.layers.drop_block_2d")
    if isinstance(timm, str):
        layers.append(("timm drop_block_2d", timm))
    else:
        layers.append((f"timm drop_block_2d(x, {p}, {b})", lambda x: timm(x, p, b)))
    return layers


def rate_map(
    fn: Callable[[Tensor], Tensor],
    size: int,
    draws: int,
    chunk: int | None = None,
    tick: Callable[[int], None] | None = None,
) -> Tensor:
    """Per-position fraction of ``draws`` independent ``size × size`` maps that ``fn`` zeroes.

    Every map is its own sample (input shape ``(n, 1, size, size)``), so layers that share a
    mask across channels or rescale by the batch are counted the same way as the others.
    ``tick(n)`` is called after each chunk of ``n`` maps (``chunk`` of them, by default
    :data:`CHUNK` or as many as make 16 M elements).
    """
    chunk = chunk or _chunk(size)
    count = torch.zeros(size, size, dtype=torch.float64)
    done = 0
    with torch.no_grad():
        while done < draws:
            n = min(chunk, draws - done)
            out = fn(torch.ones(n, 1, size, size))
            count += (out == 0).sum(dim=(0, 1), dtype=torch.float64)
            done += n
            if tick is not None:
                tick(n)
    return count / draws


def _gap(size: int) -> int:
    """Pixels between the tiles of a mosaic: thin beside small maps, so that they stay visible."""
    return 2 if size >= 8 else 1


def _mosaic(dropped: Tensor, gap: int = 2) -> Tensor:
    """Tile ``(samples, channels, H, W)`` maps into one image with ``gap``-pixel NaN separators."""
    s, c, h, w = dropped.shape
    img = torch.full((s * h + (s - 1) * gap, c * w + (c - 1) * gap), float("nan"))
    for i in range(s):
        for j in range(c):
            img[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = dropped[i, j]
    return img


def _stats(rate: Tensor) -> str:
    corners = torch.stack([rate[0, 0], rate[0, -1], rate[-1, 0], rate[-1, -1]]).mean()
    h, w = rate.shape
    centre = rate[(h - 1) // 2 : h // 2 + 1, (w - 1) // 2 : w // 2 + 1].mean()
    return f"mean {float(rate.mean()):.3f}, corner {float(corners):.3f}, centre {float(centre):.3f}"


PANEL_IN = 2.6  # width of one panel's slot, inches
GAP_IN = 0.3  # between two panels of a row
PAD_IN = 0.1  # between the texts and panels of a row
CHAR_EM = 0.62  # a character's mean width in DejaVu Sans, in ems (generous: wrapped text must fit)


def _fit(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped (line by line) to what fits ``width_in`` inches at ``fontsize`` points."""
    chars = max(8, int(width_in * 72 / (CHAR_EM * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def _text_in(text: str, fontsize: float) -> float:
    """Height in inches of ``text`` (its lines) at ``fontsize`` points, with line spacing."""
    return (text.count("\n") + 1) * fontsize * 1.25 / 72 if text else 0.0


def _refusal(err: Exception) -> str:
    """Why a layer refused the settings, without the function name that prefixes our messages."""
    text = " ".join(str(err).split())
    for prefix in ("drop_block: ", "drop_block2d: "):
        text = text.removeprefix(prefix)
    return f"refuses these settings: {text}" if text else f"refuses these settings ({type(err).__name__})"


class _Row:
    """One row of square panels, laid out in inches from the top: heading, titles, panels, below.

    The heading and the titles are wrapped to the figure's and a panel's width, and the row is as
    tall as they and its panels need: titles never overlap the heading, each other, or the next
    row, at any map or block size.
    """

    def __init__(
        self,
        fig_w: float,
        heading: str,
        titles: list[str],
        title_size: float,
        *,
        left: float,
        right: float,
        below: float,
        name: str,
    ) -> None:
        self.fig_w, self.title_size, self.left, self.below, self.name = fig_w, title_size, left, below, name
        self.slot = (fig_w - left - right) / max(len(titles), 1)
        self.side = min(self.slot - GAP_IN, 2.4)
        self.heading = _fit(heading, 0.95 * fig_w, 10)
        self.titles = [_fit(t, self.slot - GAP_IN / 2, title_size) for t in titles]
        self.titles_in = max((_text_in(t, title_size) for t in self.titles), default=0.0)
        self.height = PAD_IN + _text_in(self.heading, 10) + 2 * PAD_IN + self.titles_in + self.side + below

    def place(self, fig: Any, top: float) -> list[Any]:
        """Add the heading, and the panels' axes (labelled with the row's name), below ``top``."""
        fig_h = fig.get_size_inches()[1]
        y = top - PAD_IN
        fig.text(0.5, y / fig_h, self.heading, ha="center", va="top", fontsize=10)
        y -= _text_in(self.heading, 10) + 2 * PAD_IN + self.titles_in + self.side
        axes = []
        for i, title in enumerate(self.titles):
            x = self.left + i * self.slot + (self.slot - self.side) / 2
            box = (x / self.fig_w, y / fig_h, self.side / self.fig_w, self.side / fig_h)
            ax = fig.add_axes(box, label=self.name)
            ax.set_title(title, fontsize=self.title_size, pad=3)
            axes.append(ax)
        return axes


def _lay_out(plt: Any, fig_w: float, rows: list[_Row], caption: str) -> tuple[Any, list[list[Any]]]:
    """A figure ``fig_w`` inches wide holding ``rows`` one below the other, and the caption."""
    caption = _fit(caption, 0.95 * fig_w, 9)
    fig_h = sum(row.height for row in rows) + _text_in(caption, 9) + 2 * PAD_IN
    fig = plt.figure(figsize=(fig_w, fig_h))
    top, placed = fig_h, []
    for row in rows:
        placed.append(row.place(fig, top))
        top -= row.height
    fig.text(0.5, PAD_IN / fig_h, caption, ha="center", va="bottom", fontsize=9)
    return fig, placed


def run_show(
    *,
    out: Path,
    size: int = 28,
    block_size: int = 7,
    p: float = 0.1,
    draws: int = 20000,
    panels: str = "all",
    seed: int = 0,
    show_progress: bool = True,
    fmt: str | None = None,
) -> int:
    """Draw the chosen panels into ``out`` (exactly that path); return the exit code.

    The format is ``fmt``, or the one the suffix of ``out`` names (:func:`.output_format`).
    ``out`` must have been checked by the caller (:func:`.check_file`). A panel whose layer
    refuses the settings (or a peer that is missing) says why inside its own frame.
    """
    started = time.perf_counter()
    fmt = output_format(out, fmt, IMAGE_FORMATS, "png", "spatialdrop show --out")
    matplotlib = require("matplotlib", "matplotlib", CMD)
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "matplotlib", CMD)

    torch.manual_seed(seed)
    show_masks = panels in ("all", "masks")
    show_rates = panels in ("all", "rates")
    masks = mask_layers(p, block_size) if show_masks else []
    rates = rate_layers(p, block_size) if show_rates else []
    side3 = min(size, 20)
    slices = min(side3, 6)
    fig_w = PANEL_IN * max(len(masks), len(rates) + 0.4, slices if show_masks else 0)
    rows: list[_Row] = []
    if show_masks:
        x = torch.ones(SAMPLES, CHANNELS, size, size)
        mosaics, titles = [], []
        for layer in masks:
            with torch.no_grad():
                dropped = (layer.fn(x) == 0).float()
            mosaics.append(_mosaic(dropped, _gap(size)))
            titles.append(f"{layer.title}\n{_drawn(dropped, layer.unit)}")
        heading = (
            f"one draw of each layer on {size}×{size} maps, p = {p}: {SAMPLES} samples (rows) × "
            f"{CHANNELS} channels (columns); dropped = black, kept = grey"
        )
        rows.append(_Row(fig_w, heading, titles, 9, left=0.75, right=0.1, below=0.3, name="masks"))
        volume = torch.ones(1, 1, side3, side3, side3)
        with torch.no_grad():
            dropped3 = (drop_block(volume, p, block_size) == 0).float()[0, 0]
        picks = torch.linspace(0, side3 - 1, slices).round().long().tolist()
        heading = (
            f"DropBlock3d({p}, {block_size}) on one {side3}³ volume, shown as slices along depth "
            f"({float(dropped3.mean()):.3f} of this volume dropped)"
        )
        titles = [f"depth slice {d}" for d in picks]
        rows.append(_Row(fig_w, heading, titles, 9, left=0.4, right=0.1, below=0.3, name="slices"))
    maps: list[Tensor | str] = []
    if show_rates:
        titles = []
        runnable = sum(1 for _, rate_fn in rates if not isinstance(rate_fn, str))
        with progress(
            CMD, total=runnable * draws, desc="drop-rate maps", enabled=show_progress, unit="map"
        ) as bar:
            for title, rate_fn in rates:
                if isinstance(rate_fn, str):
                    maps.append(rate_fn)
                    titles.append(title)
                    continue
                bar.set_postfix_str(title.split("\n")[0])
                try:
                    rate = rate_map(rate_fn, size, draws, tick=bar.update)
                except Exception as err:  # a layer that refuses this map/block size: say why, in its panel
                    maps.append(_refusal(err))
                    titles.append(title)
                    continue
                maps.append(rate)
                titles.append(f"{title}\n{_stats(rate)}")
        heading = (
            f"per-position drop rate over {draws} draws of a {size}×{size} map, block {block_size}, "
            f"p asked = {p} (a calibrated layer is flat at p)"
        )
        rows.append(_Row(fig_w, heading, titles, 8.5, left=0.1, right=1.0, below=0.15, name="rates"))

    caption = "\n".join(CAPTION[k] for k in ("masks", "rates") if panels in (k, "all"))
    fig, placed = _lay_out(plt, fig_w, rows, caption)
    # kept grey, dropped black, the gaps between tiles (NaN) white
    cmap = matplotlib.colors.ListedColormap(["#dcdcdc", "#000000"]).with_extremes(bad="white")
    if show_masks:
        axes = placed.pop(0)
        centres = [i * (size + _gap(size)) + (size - 1) / 2 for i in range(max(SAMPLES, CHANNELS))]
        for ax, mosaic in zip(axes, mosaics):
            ax.imshow(mosaic.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks(centres[:CHANNELS], [f"ch {j + 1}" for j in range(CHANNELS)], fontsize=8)
            ax.set_yticks(
                centres[:SAMPLES], [f"sample {i + 1}" for i in range(SAMPLES)] if ax is axes[0] else []
            )
            ax.tick_params(length=0, labelsize=8)
        axes = placed.pop(0)
        for ax, d in zip(axes, picks):
            ax.imshow(dropped3[d].numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xlabel("width", fontsize=8, labelpad=2)
            ax.set_ylabel("height" if ax is axes[0] else "", fontsize=8, labelpad=2)
            ax.set_xticks([])
            ax.set_yticks([])
    if show_rates:
        axes = placed.pop(0)
        row = rows[-1]
        peak = max([2 * p] + [float(r.max()) for r in maps if isinstance(r, Tensor)])
        image = None
        for ax, shown in zip(axes, maps):
            ax.set_xticks([])
            ax.set_yticks([])
            if isinstance(shown, str):
                # why there is no map (a peer missing, or the settings refused), inside this panel
                note = _fit(shown, 0.85 * row.side, 8)
                ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            image = ax.imshow(shown.numpy(), cmap="magma", vmin=0.0, vmax=peak, interpolation="nearest")
        if image is not None:
            box = axes[-1].get_position()
            cax = fig.add_axes((box.x1 + 0.25 / fig_w, box.y0, 0.15 / fig_w, box.height), label="colorbar")
            fig.colorbar(image, cax=cax, label="drop rate")
    # an explicit format: write exactly ``out`` (matplotlib would append ".png" to a name without suffix)
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))
    plt.close(fig)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return 0
