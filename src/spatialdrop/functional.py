"""Functional forms of spatialdrop's layers, beside the modules (like ``torch.nn.functional``)."""

from __future__ import annotations

from .drop_block import drop_block
from .spatial_dropout import spatial_dropout

__all__ = [
    "drop_block",
    "spatial_dropout",
]
