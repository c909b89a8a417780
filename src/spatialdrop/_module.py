"""The base class shared by every dropout module of spatialdrop."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.fx
from torch import Tensor
from torch.nn.modules.dropout import _DropoutNd

from ._keyed import KEYINGS, context_key, guard_key, input_version
from ._validation import as_batched, check_bool, check_channel_dim, check_int, check_p
from .keyed import MaskKey

__all__ = ["StructuredDropout"]


def structured_forward(module: StructuredDropout, input: Tensor) -> Tensor:
    """Run ``module.dropout(input)``: the one call that :meth:`StructuredDropout.forward` makes.

    Wrapped with :func:`torch.fx.wrap`, so ``torch.fx.symbolic_trace`` records a layer as one
    ``call_function`` node that takes the layer itself (a ``get_attr`` of the submodule) and the
    input: the traced graph reads ``training`` and ``p`` when it runs, so it follows later
    ``.train()``/``.eval()`` switches and rate changes exactly as the eager layer does.
    """
    return module.dropout(input)


torch.fx.wrap("structured_forward")


class StructuredDropout(_DropoutNd):
    """Base of spatialdrop's dropout modules: torch's ``p``/``inplace`` contract plus a layout.

    Subclassing :class:`torch.nn.modules.dropout._DropoutNd` makes MC-dropout tools and
    ``isinstance`` checks that look for dropout layers find ours.

    A subclass sets the class attributes

    - ``spatial_dims``: the number of spatial dims (``None`` for a rank-free class);
    - ``allow_p_one``: whether ``p = 1`` is allowed;
    - ``has_channel_dim``: whether it takes a ``channel_dim`` (default ``True``);
    - ``keying``: how it draws keyed masks (see :func:`spatialdrop.keyed_masks`):
      ``"per_sample"`` (default) or ``"per_call"`` (one draw shared by the batch), or ``None``
      for a layer that cannot be keyed;

    passes its own options to ``super().__init__``'s keywords as needed, and implements
    :meth:`dropout` (not ``forward``) as one call into its function, passing
    ``self.training`` and ``key=self.mask_key(...)``.

    Keyed masks: ``keyed_seed`` and ``keyed_layer`` are ``None`` until
    :func:`~spatialdrop.keyed_masks` sets them; :meth:`mask_key` then returns the key of the
    current :func:`~spatialdrop.mask_context` in training mode.
    """

    spatial_dims: ClassVar[int | None] = None
    allow_p_one: ClassVar[bool] = True
    has_channel_dim: ClassVar[bool] = True
    keying: ClassVar[str | None] = "per_sample"
    p: float
    inplace: bool
    channel_dim: int  # set only when has_channel_dim
    keyed_seed: int | None = None
    keyed_layer: int | None = None

    def __init__(self, p: float = 0.5, inplace: bool = False, *, channel_dim: int = 1) -> None:
        name = type(self).__name__
        p = check_p(name, p, allow_one=self.allow_p_one)
        check_bool(name, "inplace", inplace)
        super().__init__(p, inplace)
        if not self.has_channel_dim:
            return  # DropPath, FilterDropout: no channel axis to check, keep or show
        check_int(name, "channel_dim", channel_dim)
        if self.spatial_dims is not None:
            check_channel_dim(name, channel_dim, self.spatial_dims + 2)
        elif channel_dim == 0:
            check_channel_dim(name, channel_dim, 3)
        self.channel_dim = int(channel_dim)

    def forward(self, input: Tensor) -> Tensor:
        """Apply the layer: one call of :meth:`dropout`, traceable by ``torch.fx``.

        A keyed layer's eager output is wrapped by :func:`~spatialdrop._keyed.guard_key`: a
        checkpoint recompute under another key than the forward's raises in backward.
        """
        if self.keyed_seed is None:
            return structured_forward(self, input)
        version = input_version(input)
        out = structured_forward(self, input)
        if not isinstance(out, Tensor):
            return out
        return guard_key(type(self).__name__, out, input, version)

    def __prepare_scriptable__(self) -> StructuredDropout:
        """Refuse ``torch.jit.script`` with a clear message (it calls this before compiling).

        TorchScript, which torch deprecates, cannot compile the layers' Python (keyword-only
        options, keyed masks, custom ops): the model is exported with ``torch.export.export`` or
        compiled with ``torch.compile`` instead.
        """
        raise TypeError(
            f"torch.jit.script: {type(self).__name__} (spatialdrop) does not support TorchScript, which "
            "torch deprecates: export the model with torch.export.export (ONNX: torch.onnx.export(..., "
            "dynamo=True)) or compile it with torch.compile"
        )

    def dropout(self, input: Tensor) -> Tensor:
        """The layer's computation; subclasses implement it (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement dropout(input)")

    def batched(self, input: Tensor) -> tuple[Tensor, bool]:
        """Return ``input`` with a batch axis (added for unbatched input) and whether one was added."""
        return as_batched(type(self).__name__, input, self.spatial_dims)

    def mask_key(self, batch_size: int | None, device: torch.device) -> MaskKey | None:
        """The key for this call's masks: ``None`` unless keyed and training.

        Args:
            batch_size: the batch size of the (batched) input; ignored by a ``"per_call"``
                layer, whose key depends only on ``(seed, step, layer)``.
            device: the input's device.

        Raises:
            RuntimeError: if the layer is keyed and training but no
                :func:`~spatialdrop.mask_context` is active.
            ValueError: if the context's ``sample_ids`` do not have ``batch_size`` ids.
        """
        if self.keyed_seed is None or self.keyed_layer is None or not self.training:
            return None
        if self.keying not in KEYINGS:
            raise RuntimeError(f"{type(self).__name__}: keyed_seed is set but the class declares no keying")
        n = None if self.keying == "per_call" else batch_size
        return context_key(type(self).__name__, self.keyed_seed, self.keyed_layer, n, device)

    def extra_repr(self) -> str:
        parts = [f"p={self.p}", f"inplace={self.inplace}"]
        if self.has_channel_dim and self.channel_dim != 1:
            parts.append(f"channel_dim={self.channel_dim}")
        parts.extend(f"{k}={v!r}" for k, v in self.extra_options().items())
        return ", ".join(parts)

    def extra_options(self) -> dict[str, Any]:
        """Options shown by ``repr`` beyond ``p``, ``inplace`` and ``channel_dim``."""
        return {}
