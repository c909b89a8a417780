"""The public API: a name that disappears or appears unannounced fails here."""

from __future__ import annotations

import spatialdrop
import spatialdrop.functional

PUBLIC = [
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

FUNCTIONAL = [
    "alpha_spatial_dropout",
    "drop_block",
    "drop_path",
    "drop_path_residual",
    "gaussian_spatial_dropout",
    "spatial_dropout",
]


def test_public_names_are_exported_sorted_and_importable() -> None:
    assert spatialdrop.__all__ == PUBLIC
    assert sorted(spatialdrop.__all__) == spatialdrop.__all__
    for name in PUBLIC:
        assert getattr(spatialdrop, name) is not None, name


def test_functional_names() -> None:
    assert spatialdrop.functional.__all__ == FUNCTIONAL
    for name in FUNCTIONAL:
        assert callable(getattr(spatialdrop.functional, name)), name


def test_every_dropout_module_is_a_torch_dropout() -> None:
    from torch.nn.modules.dropout import _DropoutNd

    classes = [
        getattr(spatialdrop, n)
        for n in PUBLIC
        if n[0].isupper() and isinstance(getattr(spatialdrop, n), type)
    ]
    droppers = [c for c in classes if c.__name__.endswith(("Dropout", "1d", "2d", "3d", "Block", "Path"))]
    assert len(droppers) == 19
    for cls in droppers:
        assert issubclass(cls, _DropoutNd), cls.__name__


def test_version_in_one_place() -> None:
    from importlib.metadata import version

    assert spatialdrop.__version__ == version("spatialdrop")
