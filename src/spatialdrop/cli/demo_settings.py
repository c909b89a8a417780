"""The demo's settings: what decides a run's numbers, the defaults per data set and ``--quick``.

Apart from :mod:`.demo_train` so that the command line can read the defaults (for its help) and
check the options without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["DEFAULTS", "QUICK", "VARIANTS", "DemoSettings", "make_settings"]

VARIANTS = ("none", "dropout", "spatial", "dropblock")


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
