"""Version-dependent torch APIs in one place, each imported lazily.

Importing spatialdrop must not import anything of torch that ``import torch`` does not already
load (a private torch module imported at package load can print warnings, for instance torch's
"Failed to initialize NumPy" when numpy is absent): every private or version-dependent torch
API is reached through a function here, which imports it on first use.

The declared torch floor is the one CI tests; the fallbacks below keep older releases working
where the API moved.
"""

from __future__ import annotations

import torch

__all__ = ["dispatch_mode_active", "is_compiling"]


def is_compiling() -> bool:
    """Whether torch.compile / torch.export is tracing the current call (dynamo or export)."""
    if hasattr(torch.compiler, "is_compiling"):
        return bool(torch.compiler.is_compiling())
    from torch._dynamo import is_compiling as dynamo_is_compiling  # torch < 2.3

    return bool(dynamo_is_compiling())


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (fake tensors, tracing, ...) is active."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None
