"""Training and evaluating the demo's models: settings, the small CNN, the metrics, the runs.

A small CNN (three conv blocks with BatchNorm) is trained once per regulariser and seed on a small
training set, long enough to overfit:

- ``none``: no dropout;
- ``dropout``: elementwise :class:`torch.nn.Dropout` after each conv block;
- ``spatial``: :class:`~spatialdrop.SpatialDropout2d` (``3d`` for volumes) at the same places;
- ``dropblock``: :class:`~spatialdrop.DropBlock2d` (``3d``) at the same places, its ``p`` ramped
  up from 0 by a :class:`~spatialdrop.DropSchedule` over the first half of training.

Every variant sees the same data split, the same seeds and the same number of steps.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spatialdrop

from ._optional import progress
from .demo_data import load_data
from .demo_settings import DEFAULTS, QUICK, VARIANTS, DemoSettings, make_settings

__all__ = [
    "DEFAULTS",
    "METRICS",
    "QUICK",
    "VARIANTS",
    "DemoSettings",
    "auroc",
    "expected_calibration_error",
    "make_settings",
    "run_all",
    "train_run",
]

CMD = "demo"

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


# --- model --------------------------------------------------------------------------------------


def regulariser(variant: str, dims: int, settings: DemoSettings) -> Callable[[], nn.Module] | None:
    """A factory for the dropout layer of ``variant`` (``None`` for no dropout)."""
    p = settings.p
    if variant == "none":
        return None
    if variant == "dropout":
        return lambda: nn.Dropout(p)
    if variant == "spatial":
        spatial = {2: spatialdrop.SpatialDropout2d, 3: spatialdrop.SpatialDropout3d}[dims]
        return lambda: spatial(p)
    if variant == "dropblock":
        block = {2: spatialdrop.DropBlock2d, 3: spatialdrop.DropBlock3d}[dims]
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
    settings: DemoSettings,
    variant: str,
    run: int,
    tick: Callable[[], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one model; ``run`` indexes the seed.

    ``on_start`` is called when the data and the model are ready, just before the first epoch, and
    ``tick`` once per epoch.
    """
    torch.set_num_threads(settings.threads)
    started, started_cpu = time.perf_counter(), time.process_time()
    data = load_data(settings.data, settings.seed, settings.train_size, settings.noise_std)
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
        ramp = max(1, round(settings.ramp_fraction * total_steps))
        schedule = spatialdrop.DropSchedule(model, settings.p, ramp)
    order_gen = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = {"epoch": [], "train_loss": [], "test_accuracy": [], "test_nll": []}
    step = 0
    if on_start is not None:
        on_start()
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
        mc = spatialdrop.mc_predict(model, data.x_test, samples=settings.mc_samples, softmax=True)
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


_QUEUE: Any = None


def _init_worker(queue: Any) -> None:
    """In a training process: report epochs to ``queue``; leave Ctrl-C to the parent."""
    global _QUEUE
    _QUEUE = queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker(args: tuple[DemoSettings, str, int]) -> dict[str, Any]:
    settings, variant, run = args
    return train_run(settings, variant, run, tick=lambda: _QUEUE.put(1), on_start=lambda: _QUEUE.put(0))


def run_all(settings: DemoSettings, show_progress: bool) -> list[dict[str, Any]]:
    """Every (variant, seed) training of ``settings``, in ``settings.jobs`` processes.

    The progress bar counts epochs. Its clock starts when the first training starts, not when the
    command does: otherwise the seconds spent starting the processes and loading the data would
    count as the first epoch's, and the first estimate of the time left would be hours.
    """
    tasks = [(v, r) for r in range(settings.seeds) for v in settings.variants]
    bar = progress(
        CMD,
        total=len(tasks) * settings.epochs,
        desc=f"demo {settings.data}: {len(tasks)} trainings",
        enabled=show_progress,
        unit="epoch",
    )

    def report(epochs: int) -> None:
        # 0: a training is about to start its first epoch
        if epochs == 0 and bar.n == 0:
            bar.reset()
        elif epochs:
            bar.update(epochs)

    with bar:
        if settings.jobs <= 1:
            return [
                train_run(settings, v, r, tick=lambda: report(1), on_start=lambda: report(0))
                for v, r in tasks
            ]
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        # the workers ignore Ctrl-C; the parent gets it, and leaving the block terminates them
        with ctx.Pool(min(settings.jobs, len(tasks)), _init_worker, (queue,)) as pool:
            pending = pool.map_async(_worker, [(settings, v, r) for v, r in tasks])
            while not pending.ready() or not queue.empty():
                while not queue.empty():
                    report(queue.get())
                pending.wait(0.2)
            return pending.get()
