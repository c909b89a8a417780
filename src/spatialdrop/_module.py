"""The base class shared by every activation-dropping module of spatialdrop."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn.modules.dropout import _DropoutNd

from ._validation import as_batched, check_bool, check_channel_dim, check_int, check_p
from .keyed import MaskKey, context_key

__all__ = ["StructuredDropout"]


class StructuredDropout(_DropoutNd):
    """Base of spatialdrop's dropout modules: torch's ``p``/``inplace`` contract plus a layout.

    Subclassing :class:`torch.nn.modules.dropout._DropoutNd` makes MC-dropout tools and
    ``isinstance`` checks that look for dropout layers find ours.

    Subclasses set ``spatial_dims`` (``None`` for the rank-free class) and ``allow_p_one``, and
    implement ``forward`` as one call into their function on :meth:`batched` input.

    Keyed masks (see :func:`spatialdrop.keyed_masks`): ``keyed_seed`` and ``keyed_layer`` are
    ``None`` until ``keyed_masks`` sets them; a subclass passes ``key=self.mask_key(n, device)``
    to its function, which then draws from the key instead of torch's generator.
    """

    spatial_dims: ClassVar[int | None] = None
    allow_p_one: ClassVar[bool] = True
    p: float
    inplace: bool
    channel_dim: int
    keyed_seed: int | None = None
    keyed_layer: int | None = None

    def __init__(self, p: float = 0.5, inplace: bool = False, *, channel_dim: int = 1) -> None:
        name = type(self).__name__
        p = check_p(name, p, allow_one=self.allow_p_one)
        check_bool(name, "inplace", inplace)
        super().__init__(p, inplace)
        check_int(name, "channel_dim", channel_dim)
        if self.spatial_dims is not None:
            check_channel_dim(name, channel_dim, self.spatial_dims + 2)
        elif channel_dim == 0:
            check_channel_dim(name, channel_dim, 3)
        self.channel_dim = int(channel_dim)

    def batched(self, input: Tensor) -> tuple[Tensor, bool]:
        """Return ``input`` with a batch axis (added for unbatched input) and whether one was added."""
        return as_batched(type(self).__name__, input, self.spatial_dims)

    def mask_key(self, batch_size: int, device: torch.device) -> MaskKey | None:
        """The key for this call's masks: ``None`` unless keyed and training.

        Args:
            batch_size: the batch size of the (batched) input.
            device: the input's device.

        Raises:
            RuntimeError: if the layer is keyed and training but no
                :func:`~spatialdrop.mask_context` is active.
            ValueError: if the context's ``sample_ids`` do not have ``batch_size`` ids.
        """
        if self.keyed_seed is None or self.keyed_layer is None or not self.training:
            return None
        key = context_key(type(self).__name__, self.keyed_seed, self.keyed_layer, batch_size)
        if key.sample_ids.device != device:
            key = key._replace(sample_ids=key.sample_ids.to(device))
        return key

    def extra_repr(self) -> str:
        parts = [f"p={self.p}", f"inplace={self.inplace}"]
        if self.channel_dim != 1:
            parts.append(f"channel_dim={self.channel_dim}")
        parts.extend(f"{k}={v!r}" for k, v in self.extra_options().items())
        return ", ".join(parts)

    def extra_options(self) -> dict[str, Any]:
        """Options shown by ``repr`` beyond ``p``, ``inplace`` and ``channel_dim``."""
        return {}
