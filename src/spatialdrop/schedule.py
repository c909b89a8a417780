"""DropSchedule: ramp the drop rate of a model's dropout layers from an explicit global step."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from torch import nn

from ._module import StructuredDropout
from ._validation import Shown, check_choice, check_int, check_p, fail

__all__ = ["DropSchedule"]

Scale = Union[Mapping[str, float], Callable[[str, nn.Module], float]]

_STATE_KEYS = ("curve", "last_step", "start_p", "target_p", "total_steps")


class DropSchedule:
    r"""Drive the ``p`` of a model's dropout layers along a ramp, from an explicit global step.

    ``sched.step(global_step)`` sets, on every driven module, ``p = factor * p(global_step)``
    where the base rate :math:`p(t)` goes from ``start_p`` at step 0 to ``target_p`` at
    ``total_steps`` and stays there:

    - ``curve="linear"``: :math:`p(t) = p_0 + (p_1 - p_0)\, \min(t / T, 1)`, the DropBlock
      paper's schedule (keep probability lowered linearly from 1, Ghiasi et al. 2018);
    - ``curve="cosine"``: :math:`p(t) = p_0 + (p_1 - p_0)\, \frac{1 - \cos(\pi \min(t/T, 1))}{2}`.

    The step is given, never counted, so the rate depends only on the global step: the same on
    every DDP rank, after gradient accumulation, and after a resume. :meth:`state_dict` holds the
    last step and the ramp, so ``load_state_dict`` puts the modules back at the rate they had.
    Constructing the schedule applies step 0.

    Args:
        model: the model whose dropout layers are driven.
        target_p: base rate at and after ``total_steps``, in ``[0, 1]``.
        total_steps: length of the ramp in steps, ``>= 0`` (0: ``target_p`` from the start).
        start_p: base rate at step 0, in ``[0, 1]``. Default: 0.
        curve: ``"linear"`` or ``"cosine"``. Default: ``"linear"``.
        modules: the modules to drive, as module objects or names in ``model.named_modules()``;
            each needs a float attribute ``p`` (torch's dropout layers qualify). Default: every
            spatialdrop layer in ``model`` (every :class:`StructuredDropout`: spatial dropout,
            DropBlock, DropPath, filter dropout, ...).
        scale: per-module factors on the base rate, e.g. smaller rates in early stages. Either
            a mapping from module name (as in ``model.named_modules()``) to factor, where missing
            names get 1 and unknown names are an error, or a callable ``(name, module) ->
            factor`` called once per module here. Factors are real numbers ``>= 0`` and must keep
            every module's rate valid along the whole ramp. Default: 1 for every module.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropPath, DropSchedule, SpatialDropout2d
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), SpatialDropout2d(0.0), DropPath(0.0))
        >>> sched = DropSchedule(net, target_p=0.2, total_steps=100, scale={"2": 0.5})
        >>> for step in range(150):  # one call per optimizer step, before the forward pass
        ...     _ = sched.step(step)
        >>> net[1].p, net[2].p
        (0.2, 0.1)
        >>> sched.p_at(50), DropSchedule(net, 0.2, 100, curve="cosine").p_at(25)
        (0.1, 0.029289321881345243)
        >>> sched.state_dict()
        {'curve': 'linear', 'last_step': 149, 'start_p': 0.0, 'target_p': 0.2, 'total_steps': 100}
    """

    def __init__(
        self,
        model: nn.Module,
        target_p: float,
        total_steps: int,
        *,
        start_p: float = 0.0,
        curve: str = "linear",
        modules: Iterable[nn.Module | str] | None = None,
        scale: Scale | None = None,
    ) -> None:
        fn = "DropSchedule"
        if not isinstance(model, nn.Module):
            fail(fn, "model", "an nn.Module", Shown(type(model).__name__), kind=TypeError)
        self.target_p = check_p(fn, target_p, arg="target_p")
        self.start_p = check_p(fn, start_p, arg="start_p")
        self.total_steps = check_int(fn, "total_steps", total_steps, minimum=0)
        self.curve = check_choice(fn, "curve", curve, ("linear", "cosine"))
        self.modules: list[tuple[str, nn.Module]] = _resolve(fn, model, modules)
        self.factors: list[float] = _factors(fn, self.modules, scale)
        self._check_range(fn)
        self.last_step: int | None = None
        self.step(0)

    def p_at(self, global_step: int) -> float:
        """The base rate at ``global_step`` (before the per-module factors); changes nothing."""
        t = check_int("DropSchedule.p_at", "global_step", global_step, minimum=0)
        return self._base(t)

    def step(self, global_step: int) -> float:
        """Set every driven module's ``p`` for ``global_step`` (>= 0) and return the base rate."""
        t = check_int("DropSchedule.step", "global_step", global_step, minimum=0)
        base = self._base(t)
        for (_, m), factor in zip(self.modules, self.factors):
            setattr(m, "p", factor * base)  # noqa: B010 (nn.Module types attributes as Tensor | Module)
        self.last_step = t
        return base

    def state_dict(self) -> dict[str, Any]:
        """The ramp and the last step, for checkpoints."""
        return {
            "curve": self.curve,
            "last_step": self.last_step,
            "start_p": self.start_p,
            "target_p": self.target_p,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the ramp and the last step, and set the modules' rates for that step."""
        fn = "DropSchedule.load_state_dict"
        if not isinstance(state_dict, Mapping) or set(state_dict) != set(_STATE_KEYS):
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            fail(fn, "state_dict", f"a mapping with the keys {list(_STATE_KEYS)}", Shown(str(keys)))
        target_p = check_p(fn, state_dict["target_p"], arg="target_p")
        start_p = check_p(fn, state_dict["start_p"], arg="start_p")
        total_steps = check_int(fn, "total_steps", state_dict["total_steps"], minimum=0)
        curve = check_choice(fn, "curve", state_dict["curve"], ("linear", "cosine"))
        last = state_dict["last_step"]
        if last is not None:
            last = check_int(fn, "last_step", last, minimum=0)
        saved = (self.target_p, self.start_p)
        self.target_p, self.start_p = target_p, start_p
        try:
            self._check_range(fn)
        except ValueError:
            self.target_p, self.start_p = saved
            raise
        self.total_steps, self.curve = total_steps, curve
        self.last_step = None
        if last is not None:
            self.step(last)

    def _base(self, t: int) -> float:
        frac = 1.0 if t >= self.total_steps else t / self.total_steps
        w = frac if self.curve == "linear" else (1.0 - math.cos(math.pi * frac)) / 2.0
        if w == 1.0:
            return self.target_p
        lo, hi = sorted((self.start_p, self.target_p))
        return min(max(self.start_p + (self.target_p - self.start_p) * w, lo), hi)

    def _check_range(self, fn: str) -> None:
        top = max(self.start_p, self.target_p)
        for (name, m), factor in zip(self.modules, self.factors):
            p = factor * top
            one_ok = getattr(m, "allow_p_one", True)
            if p > 1.0 or (p == 1.0 and not one_ok):
                allowed = "[0, 1]" if one_ok else "[0, 1)"
                fail(
                    fn,
                    "scale",
                    f"factors that keep every rate in {allowed} ({name or 'model'}: {type(m).__name__})",
                    Shown(f"factor {factor} * p {top} = {p}"),
                )

    def __repr__(self) -> str:
        return (
            f"DropSchedule(start_p={self.start_p}, target_p={self.target_p}, "
            f"total_steps={self.total_steps}, curve={self.curve!r}, modules={len(self.modules)}, "
            f"last_step={self.last_step})"
        )


def _resolve(
    fn: str, model: nn.Module, modules: Iterable[nn.Module | str] | None
) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if modules is None:
        found: list[tuple[str, nn.Module]] = [(n, m) for n, m in named if isinstance(m, StructuredDropout)]
        if not found:
            types = sorted({type(m).__name__ for _, m in named})
            fail(fn, "model", "a model with spatialdrop layers (or pass modules=)", Shown(f"one of {types}"))
        return found
    if isinstance(modules, (str, nn.Module)) or not isinstance(modules, Iterable):
        fail(fn, "modules", "None or an iterable of modules or module names", modules, kind=TypeError)
    names = {id(m): n for n, m in reversed(named)}  # first name of a shared module
    out: list[tuple[str, nn.Module]] = []
    for item in modules:
        if isinstance(item, str):
            try:
                m = model.get_submodule(item)
            except AttributeError:
                fail(fn, "modules", "names of submodules of model", item)
            out.append((item, m))
        elif isinstance(item, nn.Module):
            if id(item) not in names:
                fail(fn, "modules", "submodules of model", Shown(f"{type(item).__name__} not in model"))
            out.append((names[id(item)], item))
        else:
            fail(fn, "modules", "modules or module names", item, kind=TypeError)
    if not out:
        fail(fn, "modules", "a non-empty iterable", Shown("an empty one"))
    for name, m in out:
        p = getattr(m, "p", None)
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            fail(
                fn,
                "modules",
                "modules with a float attribute p",
                Shown(f"{name}: {type(m).__name__}"),
                kind=TypeError,
            )
    return out


def _factors(fn: str, modules: list[tuple[str, nn.Module]], scale: Scale | None) -> list[float]:
    if scale is None:
        return [1.0] * len(modules)
    if isinstance(scale, Mapping):
        known = {n for n, _ in modules}
        unknown = sorted(set(scale) - known)
        if unknown:
            fail(
                fn,
                "scale",
                f"a mapping over the driven modules' names {sorted(known)}",
                Shown(f"unknown names {unknown}"),
            )
        raw = [scale.get(n, 1.0) for n, _ in modules]
    elif callable(scale):
        raw = [scale(n, m) for n, m in modules]
    else:
        fail(
            fn,
            "scale",
            "None, a mapping name -> factor or a callable (name, module) -> factor",
            Shown(type(scale).__name__),
            kind=TypeError,
        )
    out: list[float] = []
    for (name, _), f in zip(modules, raw):
        if isinstance(f, bool) or not isinstance(f, numbers.Real):
            fail(fn, "scale", "real factors", Shown(f"{f!r} for {name!r}"), kind=TypeError)
        try:
            finite = math.isfinite(f)
        except OverflowError:  # an int past the float range, like 10**400
            finite = False
        if not finite or f < 0:
            fail(fn, "scale", "factors >= 0", Shown(f"{f!r} for {name!r}"))
        out.append(float(f))
    return out
