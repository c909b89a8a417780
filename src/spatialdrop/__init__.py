"""spatialdrop: structured (spatial) dropout for PyTorch.

Channel-wise dropout for inputs of any spatial rank and layout, calibrated DropBlock, DropPath
and their relatives. Functions live in :mod:`spatialdrop.functional`, modules here.
"""

from __future__ import annotations

from . import functional
from .alpha import AlphaSpatialDropout, AlphaSpatialDropout1d, AlphaSpatialDropout2d, AlphaSpatialDropout3d
from .convert import convert_dropout
from .drop_block import DropBlock, DropBlock1d, DropBlock2d, DropBlock3d
from .drop_path import DropPath, drop_path_rates
from .filter_dropout import FilterDropout, filter_dropout, remove_filter_dropout
from .gaussian import (
    GaussianSpatialDropout,
    GaussianSpatialDropout1d,
    GaussianSpatialDropout2d,
    GaussianSpatialDropout3d,
)
from .keyed import MaskKey, keyed_masks, keyed_normal, keyed_uniform, mask_context
from .residual_drop_path import ResidualDropPath, batch_coupled_modules
from .schedule import DropSchedule
from .skip_compute import skip_dropped_compute
from .spatial_dropout import SpatialDropout, SpatialDropout1d, SpatialDropout2d, SpatialDropout3d
from .tools import MCPrediction, add_dropout, mc_dropout, mc_predict

__version__ = "0.1.0"

__all__ = [
    "AlphaSpatialDropout",
    "AlphaSpatialDropout1d",
    "AlphaSpatialDropout2d",
    "AlphaSpatialDropout3d",
    "DropBlock",
    "DropBlock1d",
    "DropBlock2d",
    "DropBlock3d",
    "DropPath",
    "DropSchedule",
    "FilterDropout",
    "GaussianSpatialDropout",
    "GaussianSpatialDropout1d",
    "GaussianSpatialDropout2d",
    "GaussianSpatialDropout3d",
    "MCPrediction",
    "MaskKey",
    "ResidualDropPath",
    "SpatialDropout",
    "SpatialDropout1d",
    "SpatialDropout2d",
    "SpatialDropout3d",
    "__version__",
    "add_dropout",
    "batch_coupled_modules",
    "convert_dropout",
    "drop_path_rates",
    "filter_dropout",
    "functional",
    "keyed_masks",
    "keyed_normal",
    "keyed_uniform",
    "mask_context",
    "mc_dropout",
    "mc_predict",
    "remove_filter_dropout",
    "skip_dropped_compute",
]
