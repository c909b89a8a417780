"""``spatialdrop show``: draw the masks of the layers, and the per-position drop rate of DropBlock.

Two kinds of panels, in one PNG:

- ``masks``: one sample mask of each layer on a ``size × size`` map (4 samples × 4 channels per
  layer, dropped elements dark), and a 3-D DropBlock mask shown as slices of a volume;
- ``rates``: the fraction of draws in which each position of the map was dropped, over many
  independent maps, for our DropBlock (uniform seeding, the default, and the paper's ``valid``
  seeding) and for torchvision's and timm's when they are installed. A calibrated layer is flat
  at ``p``; the peers drop less at the borders than in the centre.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import spatialdrop
from spatialdrop.functional import drop_block, spatial_dropout

from ._io import SettingsError, write_atomic
from ._optional import progress, require

__all__ = ["mask_layers", "rate_layers", "rate_map", "run_show"]

CMD = "show"
SAMPLES, CHANNELS = 4, 4
CHUNK = 1024
CAPTION = {
    "masks": "Masks: black = dropped, grey = kept, one tile per (sample, channel).",
    "rates": "Rates: colour = fraction of draws in which the position was dropped "
    "(one colour scale for every panel).",
}


def check_settings(size: int, block_size: int, p: float) -> None:
    """Refuse, before any drawing, the settings that DropBlock refuses (one line, exit code 2).

    DropBlock checks its arguments in eval mode too, so this draws nothing.
    """
    try:
        drop_block(torch.ones(1, 1, size, size), p, block_size, training=False)
    except (ValueError, TypeError) as err:
        raise SettingsError(f"spatialdrop show: {err}") from None


def mask_layers(p: float, block_size: int) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    """The 2-D layers whose sample masks are drawn: ``(title, input -> output)``."""
    b = block_size
    return [
        (f"nn.Dropout({p})\nelementwise", nn.Dropout(p)),
        (f"SpatialDropout2d({p})\nwhole channels", lambda x: spatial_dropout(x, p)),
        (f"DropBlock2d({p}, {b})\na mask per channel", lambda x: drop_block(x, p, b)),
        (
            f"DropBlock2d({p}, {b},\nshared_channels=True)",
            lambda x: drop_block(x, p, b, shared_channels=True),
        ),
        (f"DropPath({p})\nwhole samples", spatialdrop.DropPath(p)),
    ]


def rate_layers(p: float, block_size: int) -> list[tuple[str, Callable[[Tensor], Tensor] | str]]:
    """The DropBlocks whose drop-rate maps are drawn; a string instead of a callable is a note."""
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
    try:
        from torchvision.ops import drop_block2d

        layers.append((f"torchvision.ops.drop_block2d(x, {p}, {b})", lambda x: drop_block2d(x, p, b)))
    except ImportError:
        layers.append(("torchvision.ops.drop_block2d", "torchvision not installed"))
    try:
        try:
            from timm.layers import drop_block_2d
        except ImportError:  # older timm
            from timm.models.layers import drop_block_2d
        layers.append((f"timm drop_block_2d(x, {p}, {b})", lambda x: drop_block_2d(x, p, b)))
    except ImportError:
        layers.append(("timm drop_block_2d", "timm not installed"))
    return layers


def rate_map(
    fn: Callable[[Tensor], Tensor],
    size: int,
    draws: int,
    chunk: int = CHUNK,
    tick: Callable[[int], None] | None = None,
) -> Tensor:
    """Per-position fraction of ``draws`` independent ``size × size`` maps that ``fn`` zeroes.

    Every map is its own sample (input shape ``(n, 1, size, size)``), so layers that share a
    mask across channels or rescale by the batch are counted the same way as the others.
    ``tick(n)`` is called after each chunk of ``n`` maps.
    """
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
) -> int:
    """Draw the chosen panels into the PNG ``out`` (exactly that path); return the exit code.

    ``out`` must have been checked by the caller (:func:`.check_file`).
    """
    started = time.perf_counter()
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
    n_rows = (2 if show_masks else 0) + (1 if show_rates else 0)
    width = max(len(masks), len(rates) + 0.3, slices if show_masks else 0)
    heights = ([1.3, 0.85] if show_masks else []) + ([1.4] if show_rates else [])
    fig = plt.figure(figsize=(2.6 * width, 2.6 * sum(heights) + 0.3), layout="constrained")
    subfigs = fig.subfigures(n_rows, 1, squeeze=False, height_ratios=heights)[:, 0]
    row = 0
    # kept grey, dropped black, the gaps between tiles (NaN) white
    cmap = matplotlib.colors.ListedColormap(["#dcdcdc", "#000000"]).with_extremes(bad="white")
    if show_masks:
        sub = subfigs[row]
        axes = sub.subplots(1, len(masks), squeeze=False)[0]
        x = torch.ones(SAMPLES, CHANNELS, size, size)
        for ax, (title, fn) in zip(axes, masks):
            with torch.no_grad():
                dropped = (fn(x) == 0).float()
            ax.imshow(_mosaic(dropped).numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{title}\n{float(dropped.mean()):.3f} dropped in this draw", fontsize=9)
            centres = [i * (size + 2) + (size - 1) / 2 for i in range(SAMPLES)]
            ax.set_xticks(centres[:CHANNELS], [f"ch {j + 1}" for j in range(CHANNELS)], fontsize=8)
            ax.set_yticks(centres, [f"sample {i + 1}" for i in range(SAMPLES)] if ax is axes[0] else [])
            ax.tick_params(length=0, labelsize=8)
        sub.suptitle(
            f"one draw of each layer on {size}×{size} maps, p = {p}: {SAMPLES} samples (rows) × "
            f"{CHANNELS} channels (columns); dropped = black, kept = grey",
            fontsize=10,
        )
        row += 1
        sub = subfigs[row]
        axes = sub.subplots(1, slices, squeeze=False)[0]
        volume = torch.ones(1, 1, side3, side3, side3)
        with torch.no_grad():
            dropped3 = (drop_block(volume, p, block_size) == 0).float()[0, 0]
        picks = torch.linspace(0, side3 - 1, slices).round().long().tolist()
        for ax, d in zip(axes, picks):
            ax.imshow(dropped3[d].numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"depth slice {d}", fontsize=9)
            ax.set_xlabel("width", fontsize=8)
            ax.set_ylabel("height" if ax is axes[0] else "", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        sub.suptitle(
            f"DropBlock3d({p}, {block_size}) on one {side3}³ volume, shown as slices along depth "
            f"({float(dropped3.mean()):.3f} of this volume dropped)",
            fontsize=10,
        )
        row += 1
    if show_rates:
        sub = subfigs[row]
        axes = sub.subplots(1, len(rates), squeeze=False)[0]
        maps: list[tuple[Any, str, Tensor | str]] = []
        runnable = sum(1 for _, layer in rates if not isinstance(layer, str))
        with progress(
            CMD, total=runnable * draws, desc="drop-rate maps", enabled=show_progress, unit="map"
        ) as bar:
            for ax, (title, layer) in zip(axes, rates):
                if isinstance(layer, str):
                    maps.append((ax, title, layer))
                    continue
                bar.set_postfix_str(title.split("\n")[0])
                try:
                    maps.append((ax, title, rate_map(layer, size, draws, tick=bar.update)))
                except Exception as err:  # a peer that refuses this map/block size
                    maps.append((ax, title, f"failed: {type(err).__name__}: {err}"[:120]))
        top = max([2 * p] + [float(m.max()) for _, _, m in maps if isinstance(m, Tensor)])
        image = None
        for ax, title, m in maps:
            ax.set_xticks([])
            ax.set_yticks([])
            if isinstance(m, str):
                ax.text(0.5, 0.5, m, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
                ax.set_title(title, fontsize=9)
                continue
            image = ax.imshow(m.numpy(), cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
            ax.set_title(f"{title}\n{_stats(m)}", fontsize=8.5)
        if image is not None:
            sub.colorbar(image, ax=list(axes), shrink=0.85, label="drop rate")
        sub.suptitle(
            f"per-position drop rate over {draws} draws of a {size}×{size} map, block {block_size}, "
            f"p asked = {p} (a calibrated layer is flat at p)",
            fontsize=10,
        )
    fig.supxlabel("\n".join(CAPTION[k] for k in ("masks", "rates") if panels in (k, "all")), fontsize=9)
    # format="png": write exactly ``out`` (matplotlib would append ".png" to a name without suffix)
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return 0
