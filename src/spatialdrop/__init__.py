"""spatialdrop: structured (spatial) dropout for PyTorch.

Channel-wise dropout for inputs of any spatial rank and layout, calibrated DropBlock, DropPath
and their relatives. Functions live in :mod:`spatialdrop.functional`, modules here.
"""

from __future__ import annotations

from . import functional
from .drop_block import DropBlock, DropBlock1d, DropBlock2d, DropBlock3d
from .spatial_dropout import SpatialDropout, SpatialDropout1d, SpatialDropout2d, SpatialDropout3d

__version__ = "0.1.0"

__all__ = [
    "DropBlock",
    "DropBlock1d",
    "DropBlock2d",
    "DropBlock3d",
    "SpatialDropout",
    "SpatialDropout1d",
    "SpatialDropout2d",
    "SpatialDropout3d",
    "__version__",
    "functional",
]
