"""The one place DropBlock draws its seed grid: keyed (:mod:`.keyed_seeds`) or not (:mod:`.sampling`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..keyed import MaskKey
from .keyed_seeds import draw_keyed_seeds
from .sampling import draw_seeds

__all__ = ["draw_grid"]


def draw_grid(
    numel: int,
    gamma: float,
    generator: torch.Generator | None,
    device: torch.device,
    *,
    dense: bool,
    key: MaskKey | None = None,
    small: bool = False,
) -> Tensor:
    """The one place DropBlock draws its seed grid: keyed (:mod:`.keyed_seeds`) or not (:mod:`.sampling`).

    ``small``: sparse indices may come as int32 (see :func:`~.sampling.draw_seeds`).
    """
    if key is not None:
        return draw_keyed_seeds(numel, gamma, key, device, dense=dense)
    return draw_seeds(numel, gamma, generator, device, dense=dense, small=small)
