"""Functional forms of spatialdrop's layers, beside the modules (like ``torch.nn.functional``)."""

from __future__ import annotations

from .alpha import alpha_spatial_dropout
from .drop_block import drop_block
from .drop_path import drop_path
from .gaussian import gaussian_spatial_dropout
from .residual_drop_path import drop_path_residual
from .spatial_dropout import spatial_dropout

__all__ = [
    "alpha_spatial_dropout",
    "drop_block",
    "drop_path",
    "drop_path_residual",
    "gaussian_spatial_dropout",
    "spatial_dropout",
]
