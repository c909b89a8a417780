"""The data sets of ``spatialdrop demo``: real handwritten digits, and synthetic 3-D solids.

``digits`` is scikit-learn's ``load_digits`` (1797 handwritten 8×8 digits, shipped with
scikit-learn, no download) upsampled bilinearly to 16×16. ``volumes`` is synthetic: 12³ volumes of
five procedurally generated solids (sphere, cube, cylinder, torus, cone) with random rotation,
size, position and intensity, plus Gaussian noise, generated from the seed. Both come with two
corrupted copies of the test inputs (an occluded patch; Gaussian noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._optional import require

__all__ = ["DATASETS", "VOLUME_CLASSES", "DemoData", "load_data", "make_volumes"]

DATASETS = ("digits", "volumes")
VOLUME_CLASSES = ("sphere", "cube", "cylinder", "torus", "cone")


@dataclass
class DemoData:
    """Train and test tensors, plus the corrupted copies of the test inputs."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_occluded: Tensor
    x_noisy: Tensor
    classes: list[str]
    description: str
    spatial_dims: int = field(init=False)

    def __post_init__(self) -> None:
        self.spatial_dims = self.x_train.dim() - 2


def _split(x: Tensor, y: Tensor, train_size: int, g: torch.Generator) -> tuple[Tensor, ...]:
    """A class-stratified random split with ``train_size`` training examples."""
    classes = int(y.max()) + 1
    order = torch.randperm(len(y), generator=g)
    per_class = [order[y[order] == c] for c in range(classes)]
    quota = [train_size // classes + (1 if c < train_size % classes else 0) for c in range(classes)]
    train_idx = torch.cat([idx[:q] for idx, q in zip(per_class, quota)])
    test_idx = torch.cat([idx[q:] for idx, q in zip(per_class, quota)])
    train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _corrupt(x: Tensor, noise_std: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """An occluded copy (one zeroed square/cube of a third of the side per input) and a noisy copy."""
    size = x.shape[-1]
    side = max(1, size // 3)
    dims = x.dim() - 2
    occluded = x.clone()
    corners = torch.randint(0, size - side + 1, (x.shape[0], dims), generator=g)
    for i, corner in enumerate(corners.tolist()):
        index: list[Any] = [i, slice(None), *(slice(c, c + side) for c in corner)]
        occluded[tuple(index)] = 0.0
    noisy = x + noise_std * torch.randn(x.shape, generator=g)
    return occluded, noisy


def load_digits_data(seed: int, train_size: int, noise_std: float) -> DemoData:
    """scikit-learn's digits, upsampled to 16×16, scaled to [0, 1], split by ``seed``."""
    datasets = require("sklearn.datasets", "scikit-learn", "demo")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = _split(x, y, train_size, g)
    occluded, noisy = _corrupt(x_test, noise_std, g)
    return DemoData(
        x_train,
        y_train,
        x_test,
        y_test,
        occluded,
        noisy,
        classes=[str(d) for d in range(10)],
        description=(
            "scikit-learn load_digits (1797 real 8x8 handwritten digits, shipped with scikit-learn), "
            f"bilinearly upsampled to 16x16; {len(y_train)} training and {len(y_test)} test images"
        ),
    )


def _rotations(n: int, g: torch.Generator) -> Tensor:
    """``n`` uniformly random 3-D rotation matrices (from random unit quaternions)."""
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def make_volumes(n: int, size: int, g: torch.Generator, noise: float = 0.15) -> tuple[Tensor, Tensor]:
    """``n`` synthetic volumes ``(n, 1, size, size, size)`` of the solids in ``VOLUME_CLASSES``.

    Each solid gets a random rotation, size (half-extent 0.6 to 0.9 of the box), offset (up to
    0.15 of the box) and intensity (0.6 to 1.0), and Gaussian noise of std ``noise`` is added.
    Classes are balanced and shuffled.

    Returns:
        The volumes (float32) and their labels (indices into ``VOLUME_CLASSES``).
    """
    k = len(VOLUME_CLASSES)
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=g)]
    axis = torch.linspace(-1.0, 1.0, size, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)
    scale = 0.6 + 0.3 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    offset = 0.15 * (2 * torch.rand(n, 1, 3, generator=g, dtype=torch.float64) - 1)
    # body coordinates: rotate the offset grid into the solid's frame, in units of its size
    q = ((grid - offset) @ _rotations(n, g)) / scale
    a, b, c = q.unbind(-1)
    radial = torch.sqrt(a * a + b * b)
    inside = torch.stack(
        [
            q.norm(dim=-1) <= 1.0,  # sphere
            q.abs().amax(dim=-1) <= 0.72,  # cube
            (radial <= 0.6) & (c.abs() <= 0.9),  # cylinder
            (radial - 0.62) ** 2 + c * c <= 0.3**2,  # torus
            (c.abs() <= 0.9) & (radial <= 0.75 * (0.9 - c) / 1.8),  # cone
        ],
        dim=0,
    )
    solid = inside[labels, torch.arange(n)].to(torch.float32)
    intensity = 0.6 + 0.4 * torch.rand(n, 1, generator=g)
    x = solid * intensity + noise * torch.randn(solid.shape, generator=g)
    return x.reshape(n, 1, size, size, size), labels


def load_volume_data(
    seed: int, train_size: int, noise_std: float, size: int = 12, test_size: int = 600
) -> DemoData:
    """Synthetic 3-D shape volumes (see :func:`make_volumes`), generated from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = make_volumes(train_size, size, g)
    x_test, y_test = make_volumes(test_size, size, g)
    occluded, noisy = _corrupt(x_test, noise_std, g)
    return DemoData(
        x_train,
        y_train,
        x_test,
        y_test,
        occluded,
        noisy,
        classes=list(VOLUME_CLASSES),
        description=(
            f"synthetic {size}^3 volumes of {', '.join(VOLUME_CLASSES)} with random rotation, size, "
            f"offset and intensity plus Gaussian noise (generated, not real data); "
            f"{len(y_train)} training and {len(y_test)} test volumes"
        ),
    )


@lru_cache(maxsize=2)
def load_data(data: str, seed: int, train_size: int, noise_std: float) -> DemoData:
    """The data set ``data`` (``digits`` or ``volumes``), built deterministically from the arguments.

    ``seed`` decides the split (digits) or the generated volumes; ``noise_std`` is the std of the
    noisy test copy.
    """
    if data == "digits":
        return load_digits_data(seed, train_size, noise_std)
    return load_volume_data(seed, train_size, noise_std)
