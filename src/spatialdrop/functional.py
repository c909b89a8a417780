"""Functional forms of spatialdrop's layers, beside the modules (like ``torch.nn.functional``)."""

from __future__ import annotations

from .spatial_dropout import spatial_dropout

__all__ = [
    "spatial_dropout",
]
