"""``spatialdrop demo``: does structured dropout regularise a small conv net? Measure it.

A small CNN (three conv blocks with BatchNorm) is trained once per regulariser and seed on a small
training set, long enough to overfit:

- ``none``: no dropout;
- ``dropout``: elementwise :class:`torch.nn.Dropout` after each conv block;
- ``spatial``: :class:`~spatialdrop.SpatialDropout2d` (``3d`` for volumes) at the same places;
- ``dropblock``: :class:`~spatialdrop.DropBlock2d` (``3d``) at the same places, its ``p`` ramped
  up from 0 by a :class:`~spatialdrop.DropSchedule` over the first half of training.

Every variant sees the same data split, the same seeds and the same number of steps. Reported per
variant, as mean ± std over seeds: test accuracy, test NLL, expected calibration error (15 bins),
accuracy on corrupted test inputs (an occluded patch; Gaussian noise) and the AUROC with which the
MC-dropout predictive entropy (:func:`~spatialdrop.mc_predict`) separates wrong from right
predictions. For ``none`` there is no dropout layer, so its "MC" entropy is the entropy of one
deterministic softmax: the baseline an uncertainty method has to beat.

Data: ``digits`` is scikit-learn's ``load_digits`` (1797 handwritten 8×8 digits, shipped with
scikit-learn, no download) upsampled bilinearly to 16×16. ``volumes`` is synthetic: 12³ volumes of
five procedurally generated solids (sphere, cube, cylinder, torus, cone) with random rotation,
size, position and intensity, plus Gaussian noise, generated from the seed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._optional import progress, require

__all__ = [
    "DATASETS",
    "METRICS",
    "VARIANTS",
    "DemoData",
    "DemoSettings",
    "auroc",
    "expected_calibration_error",
    "make_settings",
    "make_volumes",
    "run_demo",
]

CMD = "demo"
DATASETS = ("digits", "volumes")
VARIANTS = ("none", "dropout", "spatial", "dropblock")
VOLUME_CLASSES = ("sphere", "cube", "cylinder", "torus", "cone")

# name in results.json -> column title; all "higher is better" except those in LOWER_IS_BETTER.
METRICS = {
    "accuracy": "test acc",
    "nll": "test NLL",
    "ece": "ECE",
    "accuracy_occluded": "acc occluded",
    "accuracy_noisy": "acc noisy",
    "mc_auroc": "MC AUROC",
}
LOWER_IS_BETTER = ("nll", "ece")
ECE_BINS = 15


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides a demo run's numbers (stored in results.json)."""

    data: str = "digits"
    seed: int = 0
    seeds: int = 5
    epochs: int = 150
    train_size: int = 200
    p: float = 0.1
    block_size: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"
    mc_samples: int = 30
    eval_every: int = 10
    ramp_fraction: float = 0.5
    noise_std: float = 0.2
    threads: int = 1
    jobs: int = 1
    variants: tuple[str, ...] = VARIANTS
    quick: bool = False


DEFAULTS = {
    "digits": DemoSettings(),
    "volumes": DemoSettings(
        data="volumes", seeds=3, epochs=50, train_size=400, eval_every=5, noise_std=0.1, lr_schedule="cosine"
    ),
}
QUICK = {
    "digits": {"seeds": 2, "epochs": 25, "mc_samples": 8, "eval_every": 5},
    "volumes": {"seeds": 2, "epochs": 10, "train_size": 200, "mc_samples": 8, "eval_every": 2},
}


def make_settings(data: str, quick: bool, **overrides: Any) -> DemoSettings:
    """The default settings for ``data`` (the ``--quick`` ones if asked), with ``overrides`` applied.

    ``None`` values in ``overrides`` are ignored, so unset command-line options keep the defaults.
    """
    settings = DEFAULTS[data]
    if quick:
        quick_values: dict[str, Any] = QUICK[data]
        settings = replace(settings, quick=True, **quick_values)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "variants" in given:
        given["variants"] = tuple(given["variants"])
    return replace(settings, **given)


# --- data ---------------------------------------------------------------------------------------


@dataclass
class DemoData:
    """Train and test tensors, plus the corrupted copies of the test inputs."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_occluded: Tensor
    x_noisy: Tensor
    classes: list[str]
    description: str
    spatial_dims: int = field(init=False)

    def __post_init__(self) -> None:
        self.spatial_dims = self.x_train.dim() - 2


def _split(x: Tensor, y: Tensor, train_size: int, g: torch.Generator) -> tuple[Tensor, ...]:
    """A class-stratified random split with ``train_size`` training examples."""
    classes = int(y.max()) + 1
    order = torch.randperm(len(y), generator=g)
    per_class = [order[y[order] == c] for c in range(classes)]
    quota = [train_size // classes + (1 if c < train_size % classes else 0) for c in range(classes)]
    train_idx = torch.cat([idx[:q] for idx, q in zip(per_class, quota)])
    test_idx = torch.cat([idx[q:] for idx, q in zip(per_class, quota)])
    train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _corrupt(x: Tensor, noise_std: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """An occluded copy (one zeroed square/cube of a third of the side per input) and a noisy copy."""
    size = x.shape[-1]
    side = max(1, size // 3)
    dims = x.dim() - 2
    occluded = x.clone()
    corners = torch.randint(0, size - side + 1, (x.shape[0], dims), generator=g)
    for i, corner in enumerate(corners.tolist()):
        index: list[Any] = [i, slice(None), *(slice(c, c + side) for c in corner)]
        occluded[tuple(index)] = 0.0
    noisy = x + noise_std * torch.randn(x.shape, generator=g)
    return occluded, noisy


def load_digits_data(settings: DemoSettings) -> DemoData:
    """scikit-learn's digits, upsampled to 16×16, scaled to [0, 1], split by ``settings.seed``."""
    datasets = require("sklearn.datasets", "scikit-learn", CMD)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(settings.seed)
    x_train, y_train, x_test, y_test = _split(x, y, settings.train_size, g)
    occluded, noisy = _corrupt(x_test, settings.noise_std, g)
    return DemoData(
        x_train,
        y_train,
        x_test,
        y_test,
        occluded,
        noisy,
        classes=[str(d) for d in range(10)],
        description=(
            "scikit-learn load_digits (1797 real 8x8 handwritten digits, shipped with scikit-learn), "
            f"bilinearly upsampled to 16x16; {len(y_train)} training and {len(y_test)} test images"
        ),
    )


def _rotations(n: int, g: torch.Generator) -> Tensor:
    """``n`` uniformly random 3-D rotation matrices (from random unit quaternions)."""
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def make_volumes(n: int, size: int, g: torch.Generator, noise: float = 0.15) -> tuple[Tensor, Tensor]:
    """``n`` synthetic volumes ``(n, 1, size, size, size)`` of the solids in ``VOLUME_CLASSES``.

    Each solid gets a random rotation, size (half-extent 0.6 to 0.9 of the box), offset (up to
    0.15 of the box) and intensity (0.6 to 1.0), and Gaussian noise of std ``noise`` is added.
    Classes are balanced and shuffled.

    Returns:
        The volumes (float32) and their labels (indices into ``VOLUME_CLASSES``).
    """
    k = len(VOLUME_CLASSES)
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=g)]
    axis = torch.linspace(-1.0, 1.0, size, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)
    scale = 0.6 + 0.3 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    offset = 0.15 * (2 * torch.rand(n, 1, 3, generator=g, dtype=torch.float64) - 1)
    # body coordinates: rotate the offset grid into the solid's frame, in units of its size
    q = ((grid - offset) @ _rotations(n, g)) / scale
    a, b, c = q.unbind(-1)
    radial = torch.sqrt(a * a + b * b)
    inside = torch.stack(
        [
            q.norm(dim=-1) <= 1.0,  # sphere
            q.abs().amax(dim=-1) <= 0.72,  # cube
            (radial <= 0.6) & (c.abs() <= 0.9),  # cylinder
            (radial - 0.62) ** 2 + c * c <= 0.3**2,  # torus
            (c.abs() <= 0.9) & (radial <= 0.75 * (0.9 - c) / 1.8),  # cone
        ],
        dim=0,
    )
    solid = inside[labels, torch.arange(n)].to(torch.float32)
    intensity = 0.6 + 0.4 * torch.rand(n, 1, generator=g)
    x = solid * intensity + noise * torch.randn(solid.shape, generator=g)
    return x.reshape(n, 1, size, size, size), labels


def load_volume_data(settings: DemoSettings, size: int = 12, test_size: int = 600) -> DemoData:
    """Synthetic 3-D shape volumes (see :func:`make_volumes`), generated from ``settings.seed``."""
    g = torch.Generator().manual_seed(settings.seed)
    x_train, y_train = make_volumes(settings.train_size, size, g)
    x_test, y_test = make_volumes(test_size, size, g)
    occluded, noisy = _corrupt(x_test, settings.noise_std, g)
    return DemoData(
        x_train,
        y_train,
        x_test,
        y_test,
        occluded,
        noisy,
        classes=list(VOLUME_CLASSES),
        description=(
            f"synthetic {size}^3 volumes of {', '.join(VOLUME_CLASSES)} with random rotation, size, "
            f"offset and intensity plus Gaussian noise (generated, not real data); "
            f"{len(y_train)} training and {len(y_test)} test volumes"
        ),
    )


def load_data(settings: DemoSettings) -> DemoData:
    """The data set of ``settings.data``, built deterministically from the settings."""
    return _load_data(settings.data, settings.seed, settings.train_size, settings.noise_std)


@lru_cache(maxsize=2)
def _load_data(data: str, seed: int, train_size: int, noise_std: float) -> DemoData:
    settings = DemoSettings(data=data, seed=seed, train_size=train_size, noise_std=noise_std)
    if data == "digits":
        return load_digits_data(settings)
    return load_volume_data(settings)


# --- model --------------------------------------------------------------------------------------


def regulariser(variant: str, dims: int, settings: DemoSettings) -> Callable[[], nn.Module] | None:
    """A factory for the dropout layer of ``variant`` (``None`` for no dropout)."""
    p = settings.p
    if variant == "none":
        return None
    if variant == "dropout":
        return lambda: nn.Dropout(p)
    if variant == "spatial":
        from .spatial_dropout import SpatialDropout2d, SpatialDropout3d

        spatial = {2: SpatialDropout2d, 3: SpatialDropout3d}[dims]
        return lambda: spatial(p)
    if variant == "dropblock":
        from .drop_block import DropBlock2d, DropBlock3d

        block = {2: DropBlock2d, 3: DropBlock3d}[dims]
        return lambda: block(p, block_size=settings.block_size)
    raise ValueError(f"unknown variant {variant!r}")


def build_model(
    dims: int, classes: int, drop: Callable[[], nn.Module] | None, widths: Sequence[int]
) -> nn.Sequential:
    """Conv-BN-ReLU blocks (max-pooled between them), a dropout layer after each, global pooling."""
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
    layers: list[nn.Module] = []
    c_in = 1
    for i, width in enumerate(widths):
        if i > 0:
            layers.append(pool(2))
        layers += [conv(c_in, width, 3, padding=1, bias=False), norm(width), nn.ReLU()]
        if drop is not None:
            layers.append(drop())
        c_in = width
    pool_all = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    layers += [pool_all(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


WIDTHS = {2: (16, 32, 64), 3: (8, 16, 32)}


# --- metrics ------------------------------------------------------------------------------------


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins (Guo et al., 2017).

    The weighted mean over bins of ``|accuracy - mean confidence|``, weights the bins' shares of
    the examples; confidence is the top class probability.
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(torch.float64)
    which = torch.clamp((confidence.to(torch.float64) * bins).ceil().long() - 1, 0, bins - 1)
    conf_sum = torch.bincount(which, weights=confidence.to(torch.float64), minlength=bins)
    correct_sum = torch.bincount(which, weights=correct, minlength=bins)
    return float((conf_sum - correct_sum).abs().sum() / len(labels))


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive``.

    The Mann-Whitney U statistic divided by ``n_pos * n_neg`` (ties count one half, through average
    ranks): the probability that a random positive scores higher than a random negative. ``nan``
    when either class is empty.
    """
    positive = positive.to(torch.bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    s = scores.to(torch.float64)
    order = torch.argsort(s)
    sorted_s = s[order]
    # average rank (1-based) of each group of tied scores
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(s)
    ranks[order] = avg_rank[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(512)]).float()


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


# --- one training run ---------------------------------------------------------------------------


def train_run(
    settings: DemoSettings, variant: str, run: int, tick: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Train and evaluate one model; ``run`` indexes the seed. ``tick`` is called once per epoch."""
    from .tools import mc_predict

    torch.set_num_threads(settings.threads)
    started, started_cpu = time.perf_counter(), time.process_time()
    data = load_data(settings)
    dims = data.spatial_dims
    seed = settings.seed + 1000 * run
    torch.manual_seed(seed)
    model = build_model(dims, len(data.classes), regulariser(variant, dims, settings), WIDTHS[dims])
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    lr_at: Callable[[int], float] = lambda s: 1.0  # noqa: E731
    if settings.lr_schedule == "cosine":
        lr_at = lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total_steps))  # noqa: E731
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    schedule = None
    if variant == "dropblock":
        from .schedule import DropSchedule

        ramp = max(1, round(settings.ramp_fraction * total_steps))
        schedule = DropSchedule(model, settings.p, ramp)
    order_gen = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = {"epoch": [], "train_loss": [], "test_accuracy": [], "test_nll": []}
    step = 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=order_gen)
        loss_sum = 0.0
        for start in range(0, n, settings.batch_size):
            if schedule is not None:
                schedule.step(step)
            idx = perm[start : start + settings.batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched_lr.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        if epoch % settings.eval_every == 0 or epoch == settings.epochs or epoch == 1:
            logits = _predict(model, data.x_test)
            curves["epoch"].append(epoch)
            curves["train_loss"].append(loss_sum / n)
            curves["test_accuracy"].append(_accuracy(logits, data.y_test))
            curves["test_nll"].append(float(F.cross_entropy(logits, data.y_test)))
        if tick is not None:
            tick()
    if schedule is not None:
        schedule.step(total_steps)
    trained, trained_cpu = time.perf_counter(), time.process_time()
    logits = _predict(model, data.x_test)
    probs = logits.softmax(dim=1)
    if variant == "none":
        # no dropout layer to sample: the entropy of the one deterministic softmax
        mc_probs = probs
        entropy = -torch.special.xlogy(probs, probs).sum(dim=1)
    else:
        mc = mc_predict(model, data.x_test, samples=settings.mc_samples, softmax=True)
        assert mc.entropy is not None
        mc_probs, entropy = mc.mean, mc.entropy
    mc_wrong = mc_probs.argmax(dim=1) != data.y_test
    metrics = {
        "accuracy": _accuracy(logits, data.y_test),
        "nll": float(F.cross_entropy(logits, data.y_test)),
        "ece": expected_calibration_error(probs, data.y_test),
        "accuracy_occluded": _accuracy(_predict(model, data.x_occluded), data.y_test),
        "accuracy_noisy": _accuracy(_predict(model, data.x_noisy), data.y_test),
        "mc_auroc": auroc(entropy, mc_wrong),
        "mc_accuracy": float((~mc_wrong).float().mean()),
        "final_train_loss": curves["train_loss"][-1],
    }
    model.eval()
    seconds = {
        "train": trained - started,
        "evaluate": time.perf_counter() - trained,
        "train_cpu": trained_cpu - started_cpu,
        "evaluate_cpu": time.process_time() - trained_cpu,
    }
    return {
        "variant": variant,
        "run": run,
        "seed": seed,
        "metrics": metrics,
        "curves": curves,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def _worker(args: tuple[DemoSettings, str, int, Any]) -> dict[str, Any]:
    settings, variant, run, queue = args
    return train_run(settings, variant, run, tick=lambda: queue.put(1))


# --- the whole comparison -----------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var)


def _run_all(settings: DemoSettings, show_progress: bool) -> list[dict[str, Any]]:
    tasks = [(v, r) for r in range(settings.seeds) for v in settings.variants]
    bar = progress(
        CMD,
        total=len(tasks) * settings.epochs,
        desc=f"demo {settings.data}: {len(tasks)} trainings",
        enabled=show_progress,
        unit="epoch",
    )
    with bar:
        if settings.jobs <= 1:
            return [train_run(settings, v, r, tick=lambda: bar.update(1)) for v, r in tasks]
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            queue = manager.Queue()
            with ctx.Pool(min(settings.jobs, len(tasks))) as pool:
                pending = pool.map_async(_worker, [(settings, v, r, queue) for v, r in tasks])
                while not pending.ready() or not queue.empty():
                    while not queue.empty():
                        bar.update(queue.get())
                    pending.wait(0.2)
                return pending.get()


def summarise(settings: DemoSettings, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-variant metrics (per seed, mean, std) and learning curves from the runs."""
    out: dict[str, dict[str, Any]] = {}
    for variant in settings.variants:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["run"])
        metrics = {}
        for name in mine[0]["metrics"]:
            values = [r["metrics"][name] for r in mine]
            mean, std = _mean_std(values)
            metrics[name] = {"mean": mean, "std": std, "per_seed": values}
        out[variant] = {
            "layer": LAYER_NAMES[variant].format(d=3 if settings.data == "volumes" else 2),
            "seeds": [r["seed"] for r in mine],
            "metrics": metrics,
            "curves": [r["curves"] for r in mine],
            "seconds": [r["seconds"] for r in mine],
        }
    return out


LAYER_NAMES = {
    "none": "no dropout",
    "dropout": "nn.Dropout",
    "spatial": "SpatialDropout{d}d",
    "dropblock": "DropBlock{d}d + DropSchedule",
}


def _fmt(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def table_rows(summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table; the best mean of each column is marked with ``*``."""
    header = ["regulariser", *METRICS.values()]
    best: dict[str, str] = {}
    for name in METRICS:
        means = {v: s["metrics"][name]["mean"] for v, s in summary.items()}
        means = {v: m for v, m in means.items() if not math.isnan(m)}
        if means:
            pick = min if name in LOWER_IS_BETTER else max
            best[name] = pick(means, key=lambda v: means[v])
    rows = []
    for variant, s in summary.items():
        row = [s["layer"]]
        for name in METRICS:
            m = s["metrics"][name]
            row.append(_fmt(m["mean"], m["std"]) + ("*" if best.get(name) == variant else " "))
        rows.append(row)
    return header, rows


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A plain aligned text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c.strip() for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# --- figure -------------------------------------------------------------------------------------

COLORS = {"none": "#555555", "dropout": "#1f77b4", "spatial": "#2ca02c", "dropblock": "#d62728"}


def plot(summary: dict[str, dict[str, Any]], settings: DemoSettings, path: Path, title: str) -> None:
    """Learning curves (top) and the per-metric comparison with every seed shown (bottom)."""
    matplotlib = require("matplotlib", "matplotlib", CMD)
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "matplotlib", CMD)

    fig = plt.figure(figsize=(15, 7.5))
    grid = fig.add_gridspec(2, len(METRICS), height_ratios=[1.25, 1], hspace=0.45, wspace=0.5)
    half = len(METRICS) // 2
    ax_acc = fig.add_subplot(grid[0, :half])
    ax_loss = fig.add_subplot(grid[0, half:])
    for variant, s in summary.items():
        color = COLORS[variant]
        for key, ax in (("test_accuracy", ax_acc), ("train_loss", ax_loss)):
            ys = torch.tensor([c[key] for c in s["curves"]], dtype=torch.float64)
            epochs = s["curves"][0]["epoch"]
            mean = ys.mean(dim=0)
            ax.plot(epochs, mean.tolist(), color=color, label=s["layer"], lw=1.6)
            if len(ys) > 1:
                std = ys.std(dim=0)
                low, high = (mean - std).tolist(), (mean + std).tolist()
                ax.fill_between(epochs, low, high, color=color, alpha=0.15, lw=0)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (mean ± std over seeds)")
    # zoom on the last three quarters of training, where the variants differ
    late = [
        a for s in summary.values() for c in s["curves"] for a in c["test_accuracy"][len(c["epoch"]) // 4 :]
    ]
    ax_acc.set_ylim(max(0.0, min(late) - 0.02), 1.0)
    ax_acc.legend(loc="lower right", fontsize=9)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss (with dropout active)")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)

    names = list(summary)
    for i, (metric, label) in enumerate(METRICS.items()):
        ax = fig.add_subplot(grid[1, i])
        for j, variant in enumerate(names):
            m = summary[variant]["metrics"][metric]
            values = [v for v in m["per_seed"] if not math.isnan(v)]
            color = COLORS[variant]
            ax.scatter([j] * len(values), values, color=color, s=12, alpha=0.5, lw=0)
            if values:
                ax.errorbar(j, m["mean"], yerr=m["std"], fmt="o", color=color, ms=6, capsize=4, lw=1.5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
        ax.set_title(f"{label} {arrow}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- entry point --------------------------------------------------------------------------------


def run_demo(settings: DemoSettings, out: Path, *, show_progress: bool = True, command: str = "") -> int:
    """Run the comparison, print the table, write ``results.json`` and ``figure.png`` into ``out``."""
    # check the optional dependencies before the long part
    require("matplotlib", "matplotlib", CMD)
    if settings.data == "digits":
        require("sklearn.datasets", "scikit-learn", CMD)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    try:
        runs = _run_all(settings, show_progress)
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - start
    data = load_data(settings)
    summary = summarise(settings, runs)
    header, rows = table_rows(summary)
    dims = data.spatial_dims
    title = (
        f"spatialdrop demo --data {settings.data}: {len(data.y_train)} training examples, "
        f"{settings.epochs} epochs, p = {settings.p}, DropBlock block {settings.block_size}, "
        f"{settings.seeds} seeds"
    )
    results = {
        "command": command,
        "settings": asdict(settings),
        "data": data.description,
        "model": f"{len(WIDTHS[dims])} conv{dims}d-BatchNorm-ReLU blocks, widths {list(WIDTHS[dims])}, "
        "the regulariser after each block, global average pooling, linear head; Adam",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads_per_job": settings.threads,
            "jobs": settings.jobs,
        },
        "runtime_s": round(elapsed, 1),
        "metrics": METRICS,
        "table": {"header": header, "rows": [[c.strip() for c in r] for r in rows]},
        "variants": summary,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    plot(summary, settings, out / "figure.png", title)
    print(title)
    print(f"data: {data.description}")
    print()
    print(format_table(header, rows))
    print()
    print(
        "mean ± std over seeds; * best mean per column (lower is better for NLL and ECE). "
        "'MC AUROC': how well the MC-dropout predictive entropy separates wrong from right "
        "predictions (for 'no dropout' it is the plain softmax entropy)."
    )
    if settings.quick:
        print(
            "--quick is a smoke run: too few epochs and seeds for the regularisers to pay off; "
            "run without --quick for the comparison."
        )
    print(f"wrote {out / 'results.json'} and {out / 'figure.png'} in {elapsed:.0f} s")
    sys.stdout.flush()
    return 0
