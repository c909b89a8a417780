"""DTensor in, DTensor out: every layer on every placement, on 1, 2 and 4 ranks (gloo, CPU).

The contract (README, "Beyond one machine"):

- keyed, with the global batch's ``sample_ids``: ``layer(distribute_tensor(x, mesh,
  placements)).full_tensor()`` equals ``layer(x)`` bit for bit, and so does the input's gradient,
  for ``Shard`` of every dim, ``Replicate`` and 2-D meshes, uneven and empty shards included;
- the output is a DTensor with the input's placements;
- unkeyed, with every rank seeded differently: replicas agree, the assembled output is a valid
  draw, and shards draw independent parts of one mask (binomial tests of the joint rates);
- ``Partial`` input is refused with a ValueError naming the function and the placement;
- no warning at all (DTensor's random ops would warn "may not have complete support" on a CPU mesh).

One spawn per world size runs every case (:data:`CASES`); the tests read its results. The ops come
from the contract table: every activation op whose family is in :data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spatialdrop as sd
from conftest import assert_binomial
from distributed import run_world
from optable import ACTIVATION_OPS, OPS_BY_NAME, OpInfo, check_output, nonzero_input

#: The families of the contract table whose ops take DTensors here: all of them.
FAMILIES = ("channel", "gaussian", "alpha", "sample", "block", "residual")
#: Families whose unkeyed DTensor call broadcasts its noise table, so that it is the unsharded call
#: under rank 0's generator bit for bit; the others (DropBlock: an agreed key, ``call_key``) are
#: held to agreement between ranks and a valid draw.
TABLE_FAMILIES = ("channel", "gaussian", "alpha", "sample", "residual")
DT_OPS = [op for op in ACTIVATION_OPS if op.family in FAMILIES and op.spatial_dims in (None, 2)]
WORLDS = (1, 2, 4)
P = 0.5
KEY_SEED, KEY_STEP = 11, 3
ID_OFFSET = 100  # the global ids of the batch's samples: 100, 101, ...
RANK0_SEED = 77  # unkeyed: rank 0's seed; rank r is seeded RANK0_SEED + 1000 r
BLOCK_P = 0.3  # DropBlock's rate in the per-position test


@dataclasses.dataclass(frozen=True)
class Sample:
    """A global input: its shape, channel axis and whether a module sees it unbatched."""

    name: str
    shape: tuple[int, ...]
    channel_dim: int = 1
    unbatched: bool = False


def samples(op: OpInfo) -> list[Sample]:
    """Odd sizes everywhere, so that shards are uneven; a batch of 1 leaves empty shards."""
    if op.family in ("sample", "residual"):
        return [Sample("nchw", (5, 6, 3, 7)), Sample("tokens", (5, 7)), Sample("batch1", (1, 6, 3, 7))]
    out = [Sample("nchw", (5, 6, 3, 7)), Sample("batch1", (1, 6, 3, 7))]
    if op.has_channel_dim:
        out.append(Sample("nhwc", (5, 3, 7, 6), channel_dim=-1))
    if op.unbatched:
        out.append(Sample("unbatched", (6, 3, 7), unbatched=True))
    return out


def meshes(world: int) -> list[tuple[int, ...]]:
    return [(world,), (2, 2)] if world == 4 else [(world,)]


def placements(mesh: tuple[int, ...], ndim: int) -> list[tuple[str, ...]]:
    """``"S<d>"``: Shard(d); ``"R"``: Replicate."""
    if len(mesh) == 1:
        return [(f"S{d}",) for d in range(ndim)] + [("R",)]
    last = f"S{ndim - 1}"
    return [("S0", "S1"), ("R", last), ("S1", "S1"), (last, "S0")]


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    mode: str
    sample: Sample
    mesh: tuple[int, ...]
    placements: tuple[str, ...]

    @property
    def id(self) -> str:
        mesh = "x".join(map(str, self.mesh))
        return f"{self.op}-{self.mode}-{self.sample.name}-mesh{mesh}-{','.join(self.placements)}"


def cases(world: int, op: OpInfo | None = None) -> list[Case]:
    out = []
    for o in DT_OPS if op is None else [op]:
        for mode in o.modes:
            for s in samples(o):
                for mesh in meshes(world):
                    for pl in placements(mesh, len(s.shape)):
                        if s.name == "batch1" and pl not in (("S0",), ("S0", "S1")):
                            continue  # a batch of 1: only the empty shards are new
                        out.append(Case(o.name, mode.name, s, mesh, pl))
    return out


# --- the worker ------------------------------------------------------------------------------


def _placements(names: tuple[str, ...]) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if n == "R" else Shard(int(n[1:])) for n in names]


def _build(op: OpInfo, case: Case, key: sd.MaskKey | None) -> nn.Module:
    mode = next(m for m in op.modes if m.name == case.mode)
    cd = case.sample.channel_dim
    if op.kind == "function":
        return op.build(P, mode, channel_dim=cd, key=key)
    return op.build(P, mode, channel_dim=cd, keyed_seed=KEY_SEED if key is not None else None)


def _key(sample: Sample) -> sd.MaskKey:
    n = 1 if sample.unbatched else sample.shape[0]
    return sd.MaskKey(KEY_SEED, KEY_STEP, 5, torch.arange(ID_OFFSET, ID_OFFSET + n))


def _forward_backward(op: OpInfo, module: nn.Module, x: torch.Tensor, w: torch.Tensor, key: Any) -> Any:
    y = op.run(module, x, key=key if op.is_module else None)
    (y * w).sum().backward()
    return y


def _run_case(case: Case, mesh: Any, keyed: bool, rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, distribute_tensor

    op = OPS_BY_NAME[case.op]
    x = nonzero_input(case.sample.shape, seed=1)
    w = nonzero_input(case.sample.shape, seed=2)
    pl = _placements(case.placements)
    key = _key(case.sample) if keyed else None
    module = _build(op, case, key)
    dx = distribute_tensor(x, mesh, pl, src_data_rank=None).requires_grad_(True)
    dw = distribute_tensor(w, mesh, pl, src_data_rank=None)
    torch.manual_seed(RANK0_SEED + 1000 * rank)  # every rank its own stream
    y = _forward_backward(op, module, dx, dw, key)
    out: dict[str, Any] = {
        "dtensor": isinstance(y, DTensor),
        "placements": tuple(map(str, getattr(y, "placements", ()))),
        "want": tuple(map(str, pl)),
    }
    full, grad = y.full_tensor().detach(), dx.grad.full_tensor()
    if rank == 0:  # the unsharded call: keyed, the same key; unkeyed, rank 0's generator
        torch.manual_seed(RANK0_SEED)
        xr = x.clone().requires_grad_(True)
        ref = _forward_backward(op, module, xr, w, key)
        out.update(ref=ref.detach(), ref_grad=xr.grad, x=x)
    out.update(y=full, grad=grad)  # every rank's assembled output: replicas must agree
    return out


def _partial_case(op: OpInfo, mesh: Any) -> list[str]:
    """The messages of the errors for a Partial input, in training and in eval mode.

    A module is called as it is in a model; eval mode refuses it too (arguments are validated
    before the eval-mode shortcut, so a bad input fails on the first call).
    """
    from torch.distributed.tensor import DTensor, Partial

    x = DTensor.from_local(nonzero_input((2, 4, 3, 3), seed=3), mesh, [Partial()], run_check=False)
    out = []
    for training in (True, False):
        module = op.build(P, op.modes[0], training=training)
        try:
            module(x)
        except ValueError as e:
            out.append(str(e))
        else:
            out.append("no error")
    return out


def _edges(mesh: Any, rank: int) -> dict[str, Any]:
    """Eval mode, p = 0 and p = 1, inplace, an explicit generator, on a DTensor sharded on channels."""
    from torch.distributed.tensor import Shard, distribute_tensor

    f = sd.functional.spatial_dropout
    x = nonzero_input((5, 6, 3, 3), seed=7)
    dx = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None)
    key = sd.MaskKey(1, 2, 3, torch.arange(5))
    out: dict[str, Any] = {
        "eval": f(dx, P, training=False) is dx,
        "p0": f(dx, 0.0) is dx,
    }
    ones = f(dx, 1.0)
    out["p1"] = (ones.full_tensor(), tuple(map(str, ones.placements)))
    h = (dx * 1.0).requires_grad_(False)
    f(h, P, inplace=True, key=key)  # a non-leaf written in place
    out["inplace"] = (h.full_tensor(), f(x, P, key=key) if rank == 0 else None)
    from spatialdrop._dtensor import from_local_like

    wrapped = from_local_like(dx.to_local() * 3.0, dx)  # for ops with kernels of their own
    out["from_local_like"] = (wrapped.full_tensor(), tuple(map(str, wrapped.placements)), x * 3.0)
    g = torch.Generator().manual_seed(5 + rank)  # rank 0's generator decides
    out["generator"] = f(dx, P, generator=g).full_tensor()
    if rank == 0:
        out["generator_ref"] = f(x, P, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # tables travel as bytes
        low = x.to(dtype)
        g = torch.Generator().manual_seed(9 + rank)
        gauss = sd.functional.gaussian_spatial_dropout
        d = distribute_tensor(low, mesh, [Shard(0)], src_data_rank=None)
        got = (f(d, P, generator=g).full_tensor(), gauss(d, P, generator=g).full_tensor())
        g = torch.Generator().manual_seed(9)
        out[f"dtype-{dtype}"] = (got, (f(low, P, generator=g), gauss(low, P, generator=g)))
    return out


def _stats(mesh: Any, world: int) -> dict[str, Any]:
    """Unkeyed masks on shards, many draws: the assembled keep masks, for the binomial tests."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out: dict[str, Any] = {}
    draws = 4
    channels = distribute_tensor(torch.ones(250, 2 * world, 1), mesh, [Shard(1)], src_data_rank=None)
    out["channel"] = torch.stack(
        [sd.functional.spatial_dropout(channels, P).full_tensor()[:, :, 0] != 0 for _ in range(draws)]
    )
    batch = distribute_tensor(torch.ones(250 * world, 3), mesh, [Shard(0)], src_data_rank=None)
    out["sample"] = torch.stack(
        [sd.functional.drop_path(batch, P).full_tensor()[:, 0] != 0 for _ in range(draws)]
    )
    # DropBlock sharded over the width: blocks cross the shard borders (seeds of the halo)
    maps = distribute_tensor(torch.ones(300, 2, 5, 4 * world), mesh, [Shard(3)], src_data_rank=None)
    out["block"] = torch.stack(
        [sd.functional.drop_block(maps, BLOCK_P, 3).full_tensor() == 0 for _ in range(2)]
    )
    return out


def _checkpointed(mesh: Any) -> dict[str, Any]:
    """Unkeyed layers under activation checkpointing (``preserve_rng_state=True``, the default).

    The recompute in backward must draw the forward's mask: the agreed bits come from the torch
    generator that checkpointing restores, and the broadcast runs again on every rank.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.utils.checkpoint import checkpoint

    out: dict[str, Any] = {}
    x = nonzero_input((6, 4, 3, 3), seed=5)
    w = nonzero_input((6, 4, 3, 3), seed=6)
    layers = {"spatial": sd.SpatialDropout2d(P), "path": sd.DropPath(P)}
    for name, layer in layers.items():
        for pl in (Shard(0), Shard(1), Replicate()):
            dx = distribute_tensor(x, mesh, [pl], src_data_rank=None).requires_grad_(True)
            y = checkpoint(layer, dx * 1.0, use_reentrant=False)
            (y * distribute_tensor(w, mesh, [pl], src_data_rank=None)).sum().backward()
            out[f"{name}-{pl}"] = (y.full_tensor().detach(), dx.grad.full_tensor())
    out["x"], out["w"] = x, w
    return out


def _compiled(mesh: Any, rank: int) -> dict[str, Any]:
    """Layers under ``torch.compile`` (default mode) on DTensors: the sharded draw runs eagerly
    (a graph break: dynamo cannot trace a shard's place in the mesh), the rest compiled.

    Keyed: output and gradient against the unsharded eager call. Unkeyed: against the same
    DTensor call made eagerly with the same generator state on every rank. Warnings are recorded,
    not raised as elsewhere: dynamo's own probes of a tensor's ``.grad`` warn in C++ and silence
    that with a filter of their own, which an ``"error"`` filter overrides.
    """
    out, caught = _compiled_run(rank, lambda: _compiled_cases(mesh, rank))
    out["warnings"] = caught
    return out


def _compiled_run(rank: int, run: Any) -> tuple[Any, list[str]]:
    """``run()`` with this rank's own inductor cache, as on separate hosts, and the warnings it
    gave (all recorded, not raised: see :func:`_compiled`).

    With one cache shared by the ranks of one host, torch 2.13 hands a rank the kernel compiled
    for another rank's local shape when shards are uneven (6 samples on 4 ranks: a rank of 1
    sample ran a kernel for 2 and crashed).
    """
    import os
    import shutil
    import tempfile

    cache = tempfile.mkdtemp(prefix=f"spatialdrop-inductor-rank{rank}-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    # torch's own import of inductor warns (a torch.jit deprecation): not a warning of ours
    return result, [str(c.message) for c in caught if not issubclass(c.category, DeprecationWarning)]


def _compiled_cases(mesh: Any, rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x = nonzero_input((6, 4, 5, 5), seed=7)
    w = nonzero_input((6, 4, 5, 5), seed=8)
    ids = torch.arange(ID_OFFSET, ID_OFFSET + 6)
    layers: dict[str, nn.Module] = {
        "SpatialDropout2d": sd.SpatialDropout2d(P),
        "GaussianSpatialDropout2d": sd.GaussianSpatialDropout2d(P),
        "AlphaSpatialDropout2d": sd.AlphaSpatialDropout2d(P),
        "DropBlock2d": sd.DropBlock2d(0.3, 3),
        "DropPath": sd.DropPath(P),
        "ResidualDropPath": sd.ResidualDropPath(nn.ReLU(), P),
    }

    def step(layer: nn.Module, t: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.detach().requires_grad_(True)
        with sd.mask_context(step=KEY_STEP, sample_ids=ids):
            y = layer(t)
            (y * wt).sum().backward()
        assert t.grad is not None
        if hasattr(y, "full_tensor"):
            return y.full_tensor().detach(), t.grad.full_tensor()
        return y.detach(), t.grad

    out: dict[str, Any] = {}
    for name, layer in layers.items():
        compiled = torch.compile(layer)
        for keyed in (True, False):
            sd.keyed_masks(layer, KEY_SEED if keyed else None)
            for pl in (Shard(0), Shard(2), Replicate()) if keyed else (Shard(1),):
                dx = distribute_tensor(x, mesh, [pl], src_data_rank=None)
                dw = distribute_tensor(w, mesh, [pl], src_data_rank=None)
                torch.manual_seed(RANK0_SEED + 1000 * rank)
                got = step(compiled, dx, dw)
                torch.manual_seed(RANK0_SEED + 1000 * rank)
                want = step(layer, x, w) if keyed else step(layer, dx, dw)
                out[f"{name}-{keyed}-{pl}"] = (got, want)
    out["x"] = x
    return out


def _call_keys(mesh: Any, rank: int) -> dict[str, Any]:
    """``call_key``, for ops whose noise is too large to broadcast (DropBlock): agreed keys."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from spatialdrop._dtensor import call_key

    x = distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)], src_data_rank=None)
    state = torch.get_rng_state()
    first = call_key("t", x, None, None, 6)
    second = call_key("t", x, None, None, 6)
    torch.set_rng_state(state)  # what checkpointing's preserve_rng_state does for a recompute
    again = call_key("t", x, None, None, 6)
    given = sd.MaskKey(1, 2, 3, torch.arange(6))
    keys = [(int(k.step), k.sample_ids, k.seed, k.layer) for k in (first, second, again)]
    return {"keys": keys, "given": call_key("t", x, given, None, 6) is given}


def _filter_cases(mesh: Any, rank: int) -> dict[str, Any]:
    """Filter dropout on a conv whose weight (and bias) are DTensors, keyed and unkeyed.

    DTensor's convolution takes a Replicate weight only (torch 2.13), so the other placements
    check the parametrized weight that the conv would read: a pre-hook records ``conv.weight``
    and ``conv.bias`` inside the call, then stops it.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    class Stop(Exception):
        pass

    def conv_with(placement: Any, keyed: bool) -> tuple[nn.Module, list[Any]]:
        with torch.random.fork_rng(devices=[]):  # the ranks' own streams go on afterwards
            torch.manual_seed(1234)  # the same weights on every rank and for the reference
            conv = sd.filter_dropout(nn.Conv2d(3, 8, 3), P)
        if keyed:
            sd.keyed_masks(conv, KEY_SEED)
        if placement is not None:
            plist = conv.parametrizations
            bias_pl = [placement] if placement == Shard(0) else [Replicate()]
            w, b = plist.weight.original.detach(), plist.bias.original.detach()
            plist.weight.original = nn.Parameter(distribute_tensor(w, mesh, [placement], src_data_rank=None))
            plist.bias.original = nn.Parameter(distribute_tensor(b, mesh, bias_pl, src_data_rank=None))
        seen: list[Any] = []

        def record(m: nn.Module, args: Any) -> None:
            seen.extend([m.weight, m.bias])
            raise Stop

        conv.register_forward_pre_hook(record)
        return conv, seen

    def weights(placement: Any, keyed: bool) -> list[torch.Tensor]:
        conv, seen = conv_with(placement, keyed)
        ctx = sd.mask_context(step=KEY_STEP, sample_ids=torch.arange(2))
        with ctx, pytest.raises(Stop):
            conv(torch.zeros(2, 3, 5, 5))
        return [t.full_tensor() if placement is not None else t for t in seen]

    out: dict[str, Any] = {}
    for name, placement in (("S0", Shard(0)), ("S1", Shard(1)), ("R", Replicate())):
        out[f"keyed-{name}"] = (weights(placement, True), weights(None, True) if rank == 0 else None)
        out[f"unkeyed-{name}"] = weights(placement, False)
    # a real forward: Replicate weights, batch-sharded input, keyed
    conv, _ = conv_with(Replicate(), True)
    conv._forward_pre_hooks.popitem()  # the recorder
    ref_conv, _ = conv_with(None, True)
    ref_conv._forward_pre_hooks.popitem()
    x = nonzero_input((5, 3, 6, 6), seed=4)
    with sd.mask_context(step=KEY_STEP, sample_ids=torch.arange(5)):
        y = conv(distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None))
        out["forward"] = (y.full_tensor().detach(), tuple(map(str, y.placements)), ref_conv(x).detach())

    def compiled() -> dict[str, Any]:
        # under torch.compile (default mode): keyed, output and weight gradient against the eager
        # unsharded conv; unkeyed, the output of one call (inductor's own random stream)
        res: dict[str, Any] = {}
        for keyed in (True, False):
            conv, _ = conv_with(Replicate(), keyed)
            conv._forward_pre_hooks.popitem()
            fast = torch.compile(conv)
            dx = distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None)
            torch.manual_seed(RANK0_SEED + 1000 * rank)  # unkeyed: each rank its own stream
            with sd.mask_context(step=KEY_STEP, sample_ids=torch.arange(5)):
                y = fast(dx)
            y.full_tensor().sum().backward()
            grad = conv.parametrizations.weight.original.grad.full_tensor()
            res[f"compiled-{keyed}"] = (y.full_tensor().detach(), grad)
        ref, _ = conv_with(None, True)
        ref._forward_pre_hooks.popitem()
        with sd.mask_context(step=KEY_STEP, sample_ids=torch.arange(5)):
            y = ref(x)
        y.sum().backward()
        res["eager-ref"] = (y.detach(), ref.parametrizations.weight.original.grad)
        return res

    res, out["compiled-warnings"] = _compiled_run(rank, compiled)
    out.update(res)
    return out


def _worker(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(1000 + rank)  # ranks seeded differently, as in real jobs
    mesh_objs = {shape: init_device_mesh("cpu", shape) for shape in meshes(world)}
    results: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DTensor's random ops would warn on a CPU mesh
        for case in cases(world):
            for keyed in (True, False):
                try:
                    results[f"{case.id}-{keyed}"] = _run_case(case, mesh_objs[case.mesh], keyed, rank)
                except Exception:
                    results[f"{case.id}-{keyed}"] = {"error": traceback.format_exc()}
        flat = mesh_objs[(world,)]
        for op in DT_OPS:
            results[f"partial-{op.name}"] = _partial_case(op, flat)
        for what, run in (
            ("stats", lambda: _stats(flat, world)),
            ("filter", lambda: _filter_cases(flat, rank)),
            ("checkpoint", lambda: _checkpointed(flat)),
            ("call_key", lambda: _call_keys(flat, rank)),
            ("edges", lambda: _edges(flat, rank)),
            ("compiled", lambda: _compiled(flat, rank)),
        ):
            try:
                results[what] = run()
            except Exception:
                results[what] = {"error": traceback.format_exc()}
    return results


# --- the tests -------------------------------------------------------------------------------

_RESULTS: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    def get(world: int) -> list[dict[str, Any]]:
        if world not in _RESULTS:
            out = tmp_path_factory.mktemp(f"dtensor{world}")
            _RESULTS[world] = run_world(_worker, world, Path(out), timeout_s=600.0)
        return _RESULTS[world]

    return get


def _world_params() -> list[Any]:
    # world 2 in the default run; 1 and 4 in the slow subset (a spawn of 4 processes costs a minute)
    return [pytest.param(w, marks=[pytest.mark.slow] if w != 2 else [], id=f"world{w}") for w in WORLDS]


def _result(res: list[dict[str, Any]], key: str, rank: int = 0) -> dict[str, Any]:
    r = res[rank][key]
    assert "error" not in r, f"{key} on rank {rank}:\n{r['error']}"
    return r


@pytest.mark.parametrize("world", _world_params())
@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in DT_OPS])
def test_keyed_any_sharding_gives_the_unsharded_bits(results: Any, world: int, op: OpInfo) -> None:
    res = results(world)
    checked = 0
    for case in cases(world, op):
        r = _result(res, f"{case.id}-True")
        assert r["dtensor"], case.id
        assert r["placements"] == r["want"], case.id
        assert torch.equal(r["y"], r["ref"]), f"{case.id}: output differs from the unsharded one"
        assert torch.equal(r["grad"], r["ref_grad"]), f"{case.id}: gradient differs"
        checked += 1
    assert checked >= 9  # every placement of every sample (9 for a one-mode op)


@pytest.mark.parametrize("world", _world_params())
@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in DT_OPS])
def test_unkeyed_is_the_unsharded_call_with_the_first_ranks_generator(
    results: Any, world: int, op: OpInfo
) -> None:
    res = results(world)
    for case in cases(world, op):
        mine = [_result(res, f"{case.id}-False", rank) for rank in range(world)]
        assert mine[0]["dtensor"], case.id
        assert mine[0]["placements"] == mine[0]["want"], case.id
        for rank in range(1, world):  # every rank was seeded differently: replicas still agree
            assert torch.equal(mine[rank]["y"], mine[0]["y"]), f"{case.id}: rank {rank} disagrees with rank 0"
        if op.family in TABLE_FAMILIES:
            assert torch.equal(mine[0]["y"], mine[0]["ref"]), f"{case.id}: not rank 0's unsharded draw"
            assert torch.equal(mine[0]["grad"], mine[0]["ref_grad"]), f"{case.id}: gradient differs"
        mode = next(m for m in op.modes if m.name == case.mode)
        check_output(  # and a valid draw (not a trivial all-keep)
            op,
            mode,
            P,
            mine[0]["x"],
            mine[0]["y"],
            channel_dim=case.sample.channel_dim,
            unbatched=case.sample.unbatched,
            what=case.id,
        )


@pytest.mark.parametrize("world", [p for p in _world_params() if p.values[0] > 1])
def test_unkeyed_shards_draw_independent_parts_of_one_mask(results: Any, world: int) -> None:
    stats = _result(results(world), "stats")
    for rank in range(1, world):
        assert torch.equal(_result(results(world), "stats", rank)["channel"], stats["channel"])
    # spatial dropout, Shard(1): each rank holds 2 channels of every sample
    keep = stats["channel"]  # (draws, N, C)
    n = keep[..., 0].numel()
    for c in range(keep.shape[-1]):
        assert_binomial(int((~keep[..., c]).sum()), n, P, f"channel {c} dropped")
    for c in range(2, keep.shape[-1]):  # channel 0 (rank 0) against the other ranks' channels
        both = int((~keep[..., 0] & ~keep[..., c]).sum())
        assert_binomial(both, n, P * P, f"channels 0 and {c} dropped together")
    # across calls: the second draw is independent of the first
    assert_binomial(int((~keep[0] & ~keep[1]).sum()), keep[0].numel(), P * P, "dropped in draws 0 and 1")
    # DropPath, Shard(0): each rank holds 250 samples; sample i of rank 0 against sample i of rank r
    keep = stats["sample"]  # (draws, 250 * world)
    assert_binomial(int((~keep).sum()), keep.numel(), P, "samples dropped")
    parts = keep.view(keep.shape[0], world, -1)
    for r in range(1, world):
        both = int((~parts[:, 0] & ~parts[:, r]).sum())
        assert_binomial(both, parts[:, 0].numel(), P * P, f"sample i of ranks 0 and {r} dropped together")


@pytest.mark.parametrize("world", _world_params())
def test_unkeyed_checkpoint_recomputes_the_forward_mask(results: Any, world: int) -> None:
    r = _result(results(world), "checkpoint")
    x, w = r["x"], r["w"]
    cases = [k for k in r if k not in ("x", "w")]
    assert len(cases) == 6
    for case in cases:
        y, grad = r[case]
        kept = y != 0
        assert torch.equal(y, torch.where(kept, x * 2, 0.0)), case  # p = 0.5: kept values doubled
        assert torch.equal(grad, torch.where(kept, w * 2, 0.0)), f"{case}: backward used another mask"
        assert 0 < int(kept.sum()) < kept.numel(), case


@pytest.mark.parametrize("world", _world_params())
def test_call_key_agrees_across_ranks_and_follows_the_generator(results: Any, world: int) -> None:
    res = results(world)
    keys = [_result(res, "call_key", rank)["keys"] for rank in range(world)]
    for rank in range(1, world):  # ranks seeded differently agree
        for a, b in zip(keys[rank], keys[0]):
            assert a[0] == b[0], f"rank {rank}"
            assert torch.equal(a[1], b[1]), f"rank {rank}"
    first, second, again = keys[0]
    assert first[0] != second[0]  # a new key per call
    assert not torch.equal(first[1], second[1])
    assert first[0] == again[0]  # the restored generator gives the same key again
    assert torch.equal(first[1], again[1])
    assert first[1].tolist() == [(first[1][0] >> 32 << 32) + i for i in range(6)]  # positions 0..5
    assert _result(res, "call_key")["given"]  # a user's key is used as it is


@pytest.mark.parametrize("world", _world_params())
def test_compiled_layers_on_dtensors(results: Any, world: int) -> None:
    """``torch.compile`` around a layer given DTensors: keyed, the unsharded eager bits (output
    and gradient) for batch, spatial and replicated placements; unkeyed, the eager DTensor call's."""
    for rank in range(world):
        r = dict(_result(results(world), "compiled", rank))
        assert r.pop("warnings") == [], "a compiled DTensor call warned"
        x = r.pop("x")
        assert len(r) == 6 * 4
        for case, ((y, g), (y_ref, g_ref)) in r.items():
            if case.startswith("ResidualDropPath"):  # x + relu(x) * factor, fused by inductor
                torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6, msg=case)
                torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6, msg=case)
                continue
            assert torch.equal(y, y_ref), f"rank {rank}, {case}: output differs"
            assert torch.equal(g, g_ref), f"rank {rank}, {case}: gradient differs"
            assert not torch.equal(y, x), f"{case}: the layer did nothing"


@pytest.mark.parametrize("world", _world_params())
def test_partial_input_is_refused(results: Any, world: int) -> None:
    res = results(world)
    for op in DT_OPS:
        fn = op.name if op.kind == "function" else op.function.__name__  # type: ignore[union-attr]
        for msg in res[0][f"partial-{op.name}"]:  # training, then eval mode
            assert msg.startswith(f"{fn}: input must be "), (op.name, msg)
            assert "Partial(sum)" in msg, (op.name, msg)
            assert "partial sum" in msg, (op.name, msg)


@pytest.mark.parametrize("world", _world_params())
def test_edge_cases_on_a_dtensor(results: Any, world: int) -> None:
    r = _result(results(world), "edges")
    assert r["eval"]  # eval mode and p = 0: the input itself
    assert r["p0"]
    zeros, placements = r["p1"]
    assert placements == ("S(1)",)
    assert not zeros.any()
    got, want = r["inplace"]
    assert torch.equal(got, want)
    full, placements, want = r["from_local_like"]
    assert placements == ("S(1)",)
    assert torch.equal(full, want)
    ranks = [_result(results(world), "edges", rank)["generator"] for rank in range(world)]
    for rank in range(world):  # an explicit generator: rank 0's draws, on every rank
        assert torch.equal(ranks[rank], r["generator_ref"]), f"rank {rank}"
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        got, want = r[f"dtype-{dtype}"]
        for g, w in zip(got, want):
            assert g.dtype == dtype
            assert torch.equal(g, w), dtype


@pytest.mark.parametrize("world", _world_params())
def test_filter_dropout_with_dtensor_weights(results: Any, world: int) -> None:
    res = results(world)
    r = _result(res, "filter")
    for name in ("S0", "S1", "R"):
        got, want = r[f"keyed-{name}"]
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"keyed, weight {name}"
        weight = [_result(res, "filter", rank)[f"unkeyed-{name}"][0] for rank in range(world)]
        for rank in range(1, world):
            assert torch.equal(weight[rank], weight[0]), f"unkeyed, weight {name}: rank {rank} disagrees"
        torch.manual_seed(1234)
        plain = nn.Conv2d(3, 8, 3).weight.detach()
        dropped = (weight[0] == 0).flatten(1).all(1)
        assert torch.equal(weight[0][~dropped], plain[~dropped] * 2), f"unkeyed, weight {name}"
    y, placements, ref = r["forward"]
    assert placements == ("S(0)",)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)  # conv on a shard of the batch


@pytest.mark.parametrize("world", _world_params())
def test_filter_dropout_with_dtensor_weights_compiled(results: Any, world: int) -> None:
    """A filter-dropout conv with Replicate DTensor weights under ``torch.compile``, on a
    batch-sharded input: keyed, the eager unsharded conv's output and weight gradient; unkeyed,
    one mask for the whole batch on every rank (the ranks' draws agree), neither none nor all."""
    for rank in range(world):
        r = _result(results(world), "filter", rank)
        assert r["compiled-warnings"] == [], "a compiled call warned"
        y_ref, g_ref = r["eager-ref"]
        y, g = r["compiled-True"]
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: output")
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: weight grad")
        dropped = y_ref.flatten(2).eq(0).all(2)  # (sample, filter): a dropped filter's channel is 0
        assert torch.equal(y.flatten(2).eq(0).all(2), dropped), f"rank {rank}: keyed mask"
        assert 0 < int(dropped[0].sum()) < dropped.shape[1]
        y_u, _ = r["compiled-False"]
        zero = y_u.flatten(2).eq(0).all(2)  # the samples of every rank's shard
        assert (zero == zero[0]).all(), f"rank {rank}: unkeyed, the samples' filters differ"
        assert 0 < int(zero[0].sum()) < zero.shape[1], f"rank {rank}: unkeyed, {zero[0].tolist()}"


def test_the_table_covers_every_family() -> None:
    families = {op.family for op in ACTIVATION_OPS}
    assert families == set(FAMILIES)
    names = {op.name for op in DT_OPS}
    assert {
        "spatial_dropout",
        "SpatialDropout2d",
        "DropPath",
        "drop_path",
        "drop_block",
        "DropBlock2d",
    } <= names


@pytest.mark.parametrize("world", [p for p in _world_params() if p.values[0] > 1])
def test_unkeyed_drop_block_rate_is_p_at_every_position_shard_borders_included(
    results: Any, world: int
) -> None:
    res = results(world)
    dropped = _result(res, "stats")["block"]  # (draws, N, C, H, W), W sharded over the ranks
    for rank in range(1, world):
        assert torch.equal(_result(res, "stats", rank)["block"], dropped)
    trials = dropped[..., 0, 0].numel()
    counts = dropped.sum(dim=(0, 1, 2))  # per position (H, W)
    width = dropped.shape[-1]
    borders = {w for r in range(1, world) for w in (4 * r - 1, 4 * r)}
    assert borders
    for h in range(counts.shape[0]):
        for w in range(width):
            where = "at a shard border" if w in borders else "inside a shard"
            assert_binomial(int(counts[h, w]), trials, BLOCK_P, f"position ({h}, {w}) {where}")
    # blocks cross the borders: two neighbours across a border are both dropped as often as two
    # neighbours inside a shard. Both kept: no seed among the 3 x 4 places covering either (each is
    # covered by 3 x 3, kept with 1 - p), so P(both dropped) = 1 - 2 (1 - p) + (1 - p) ** (12 / 9).
    both_p = 1 - 2 * (1 - BLOCK_P) + (1 - BLOCK_P) ** (12 / 9)
    for w in range(width - 1):
        both = int((dropped[..., 1:4, w] & dropped[..., 1:4, w + 1]).sum())  # rows away from the edges
        where = "across a shard border" if w in borders and w + 1 in borders else "inside a shard"
        assert_binomial(both, dropped[..., 1:4, w].numel(), both_p, f"columns {w}, {w + 1} {where}")


# --- collectives on empty shards (issue 29): every rank joins the same ones ------------------------

#: A dim of size 1 split over the ranks: one rank holds it whole, the others hold empty shards
SIZE_ONE = [Sample("c1", (3, 1, 5, 4)), Sample("h1", (3, 4, 1, 5)), Sample("w1", (3, 4, 5, 1))]
COLLECTIVE_TIMEOUT_S = 240.0


def _collective_cases(world: int) -> list[Case]:
    """Every layer and mode with the size-1 dim of each :data:`SIZE_ONE` input sharded. Unkeyed, each
    layer makes an agreed key or noise table (a broadcast), and DropBlock's realized scale sums its
    dropped counts (an all-reduce); keyed (DropBlock only: the others have no collective then), the
    realized scale's all-reduce alone."""
    return [
        Case(o.name, mode.name, s, (world,), (f"S{s.shape.index(1)}",))
        for o in DT_OPS
        for mode in o.modes
        for s in SIZE_ONE
    ]


def _collective_worker(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(1000 + rank)
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    for case in _collective_cases(world):
        op = OPS_BY_NAME[case.op]
        try:  # what the unsharded call refuses (a block larger than a size-1 map with seeding="valid")
            op.run(_build(op, case, None), nonzero_input(case.sample.shape), seed=0)
        except ValueError:
            continue
        for keyed in (True, False) if op.family == "block" else (False,):
            try:
                results[f"{case.id}-{keyed}"] = _run_case(case, mesh, keyed, rank)
            except Exception:
                results[f"{case.id}-{keyed}"] = {"error": traceback.format_exc()}
    return results


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)], ids=["world2", "world4"])
def test_layers_with_a_collective_do_not_hang_on_empty_shards(tmp_path: Path, world: int) -> None:
    """A rank whose shard is empty joins the same collectives as the rank holding the whole dim
    (``DropBlock(scale="realized")`` deadlocked on a dim of size 1); the results are the unsharded ones."""
    res = run_world(_collective_worker, world, tmp_path, timeout_s=COLLECTIVE_TIMEOUT_S)
    assert all(set(r) == set(res[0]) for r in res)
    realized = [name for name in res[0] if "realized" in name and name.endswith("-False")]
    assert len(realized) >= 3 * 2 * len(SIZE_ONE)  # drop_block, DropBlock, DropBlock2d; two modes each
    for name in res[0]:
        for rank in range(world):
            assert "error" not in res[rank][name], (name, rank, res[rank][name].get("error"))
            assert res[rank][name]["dtensor"], name
            assert torch.equal(res[rank][name]["y"], res[0][name]["y"]), (name, "replicas disagree")
        if name.endswith("-True"):  # keyed: the unsharded call's bits
            r0 = res[0][name]
            assert torch.equal(r0["y"], r0["ref"]), (name, "output")
            assert torch.equal(r0["grad"], r0["ref_grad"]), (name, "gradient")
