"""Version-dependent torch APIs in one place, each imported lazily.

Importing spatialdrop must not import anything of torch that ``import torch`` does not already
load (a private torch module imported at package load can print warnings, for instance torch's
"Failed to initialize NumPy" when numpy is absent): every private or version-dependent torch
API is reached through a function here, which imports it on first use.

The declared torch floor is the one CI tests; the fallbacks below keep older releases working
where the API moved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "captures_dynamic_output_shapes",
    "compile_cached",
    "dispatch_mode_active",
    "in_vmap",
    "inductor_layout_optimization",
    "is_compiling",
    "is_exporting",
    "new_unbacked_size",
]


def compile_cached(maxsize: int) -> Callable[[F], F]:
    """A decorator: ``fn`` behind an LRU cache of ``maxsize`` calls, uncached under ``torch.compile``.

    Dynamo traces the function itself either way (it ignores the cache), and warns when it meets
    a cached call: the one compile-aware cache of host-side constants.
    """

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            return fn(*args) if is_compiling() else cached(*args)

        return wrapper  # type: ignore[return-value]

    return wrap


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


def is_exporting() -> bool:
    """Whether ``torch.export`` (strict or not, ONNX's dynamo exporter included) is tracing."""
    return bool(torch.compiler.is_exporting())


def captures_dynamic_output_shapes() -> bool:
    """Whether dynamo traces ops whose output shape depends on data (``nonzero``) into the graph.

    ``torch._dynamo.config.capture_dynamic_output_shape_ops``: off by default, then such an op is
    a graph break. Read while tracing, dynamo guards on it (a change recompiles).
    """
    import torch._dynamo.config as dynamo_config

    return bool(dynamo_config.capture_dynamic_output_shape_ops)


def in_vmap() -> bool:
    """Whether the call runs under ``torch.func.vmap`` (at any level of nested transforms)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def new_unbacked_size(op: Any, max: int | None = None) -> torch.SymInt:
    """A fresh data-dependent size in ``[0, max]``, for the fake kernel of a custom op (``op``).

    ``torch.library.get_ctx().new_dynamic_size()`` refuses unless dynamo captures ops with
    data-dependent output shapes (``capture_dynamic_output_shape_ops``, off by default, or
    ``fullgraph=True``): without either, such an op is a graph break. The size below is the same
    unbacked symbol (``torch._library.fake_impl.allocate_size``, what ``new_dynamic_size``
    returns) made without that check, as torch's own ``device_mesh`` ops do. Only a fake kernel
    that runs under a shape environment can make one; elsewhere (a fake mode without one) this
    raises torch's ``DynamicOutputShapeException``, as ``new_dynamic_size`` would.
    """
    from torch._library.fake_impl import allocate_size
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    shape_env = torch.library.get_ctx()._shape_env
    if shape_env is None:
        raise DynamicOutputShapeException(op)
    return allocate_size(shape_env, 0, max)


def inductor_layout_optimization() -> bool:
    """Whether inductor may turn a graph's convolutions to channels-last (``layout_optimization``).

    On by default. With an unbacked batch size on a CPU build with mkldnn, inductor's layout
    optimisation predicts a channels-last convolution output that the kernel does not give (an
    assertion on size/stride at the first call, torch 2.13-2.14; plain ``index_select`` then a
    convolution fails the same way).
    """
    import torch._inductor.config as inductor_config

    return bool(inductor_config.layout_optimization)
