"""Functional forms of spatialdrop's layers, beside the modules (like ``torch.nn.functional``)."""

from __future__ import annotations

from .alpha import alpha_spatial_dropout
from .drop_block import drop_block
from .drop_path import drop_path
from .gaussian import gaussian_spatial_dropout
from .spatial_dropout import spatial_dropout

__all__ = [
    "alpha_spatial_dropout",
    "drop_block",
    "drop_path",
    "gaussian_spatial_dropout",
    "spatial_dropout",
]
