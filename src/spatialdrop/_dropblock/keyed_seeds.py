"""The keyed DropBlock seed rule: integer-only, so that a kernel reproduces it bit for bit.

A keyed DropBlock draws a flat Bernoulli(``gamma``) seed grid of ``numel`` places, split into one
*row* of ``R = numel // n`` places per sample (``n = len(key.sample_ids)``). Row ``i`` depends only
on ``key.seed``, ``key.step``, ``key.layer``, ``sid = key.sample_ids[i]`` and the place index
``t`` in ``[0, R)``. Only 32-bit integer words and integer comparisons decide a seed; the real
numbers involved (the thresholds below) are computed once on the host, so the CPU torch code
and a Triton kernel draw exactly the same seeds.

The rule. Let ``q = 1 - gamma`` and ``(k0, k1)`` the layer's Philox key
(:meth:`spatialdrop.MaskKey.philox_seed`). The rule's own Philox key is
``(w0, w1) = philox4x32_int(0x64726F70, 0, 0, 0, k0, k1)[:2]``, and word ``j`` of a row is word
``j % 4`` of Philox-4x32-10 with key ``(w0, w1)`` at counter ``(j // 4, sid mod 2**32,
(sid >> 32) mod 2**32, step mod 2**32)`` (``sid`` as 64-bit two's complement), the layout of
:func:`spatialdrop.keyed_uniform`.

- The chunk length is ``K = 2**clamp(floor(log2(4 / gamma)), 2, 10)`` (a power of two from 4 to
  1024, about four over ``gamma``; ``floor(log2(x))`` is ``e - 1`` for ``math.frexp(x) = (m, e)``).
  Chunk ``c`` of a row holds the places ``c K .. c K + K - 1`` (places ``>= R`` of the last
  chunk do not exist and are ignored).
- The gap thresholds are ``T[g] = round(2**32 * (1 - q**g))`` for ``g = 1 .. K`` (nearest
  integer), and the gap of a word ``w`` is ``gap(w) = 1 + #{g in 1..K : w >= T[g]}``: a
  Geometric(``gamma``) variable on ``{1, 2, ...}`` cut at ``K + 1``.
- Chunk ``c`` uses the words ``j = c K + d`` for ``d = 0, 1, ...``: its seeds are at the
  in-chunk positions ``x_d = gap(word[c K]) + ... + gap(word[c K + d]) - 1`` for every ``d``
  with ``x_d < K`` (so at most ``K`` words per chunk).

Because the gaps between the successes of a Bernoulli(``gamma``) sequence are i.i.d. geometric
and a geometric variable is memoryless (so the first success of a chunk is again a gap from its
start), this is exactly a Bernoulli(``gamma``) sequence at every place, independent between
places, up to the rounding of ``T`` to multiples of ``2**-32``. Work is one word per chunk
plus one per seed: the CPU sampler evaluates the first Philox call (4 words) of every chunk
and more only for the few chunks with more than three seeds; a kernel walks each chunk's
chain, one lane per chunk; the dense form takes all ``K`` words of every chunk and places the
seeds with a cumulative sum (static shapes).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .._compat import compile_cached, is_compiling
from .._philox import MASK32, philox4x32, philox4x32_int
from ..keyed import MaskKey, _layer_key, _step_word

__all__ = ["SeedRule", "chunk_length", "draw_keyed_seeds", "rule_key", "seed_rule", "threshold_table"]

DOMAIN = 0x64726F70  # "drop": separates the DropBlock stream from other uses of the layer key
_MAX_ROW = 1 << 34  # counters j // 4 must fit 32 bits
_MAX_LOG_K = 10


def chunk_length(gamma: float) -> int:
    """The chunk length ``K`` of the rule for ``gamma > 0``: a power of two in ``[4, 1024]``."""
    _, e = math.frexp(4.0 / gamma)
    return 1 << min(_MAX_LOG_K, max(2, e - 1))


class SeedRule:
    """The host-side constants of the rule for one ``gamma``: ``K`` and the thresholds ``T[1..K]``."""

    __slots__ = ("chunk", "gamma", "thresholds")

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma
        if gamma <= 0.0:
            self.chunk, self.thresholds = 4, [1 << 32] * 4
            return
        self.chunk = chunk_length(gamma)
        log_q, gaps = math.log1p(-gamma), range(1, self.chunk + 1)
        self.thresholds = [min(1 << 32, round(2.0**32 * -math.expm1(g * log_q))) for g in gaps]

    def table(self, device: torch.device) -> Tensor:
        """The thresholds ``T[1..K]`` as an int64 tensor on ``device``."""
        return torch.tensor(self.thresholds, dtype=torch.int64, device=device)


@compile_cached(512)
def seed_rule(gamma: float) -> SeedRule:
    """The (cached) :class:`SeedRule` of ``gamma``."""
    return SeedRule(gamma)


@functools.lru_cache(maxsize=256)
def _table_cached(gamma: float, device: torch.device) -> Tensor:
    return seed_rule(gamma).table(device)


def threshold_table(gamma: float, device: torch.device) -> Tensor:
    """The thresholds ``T[1..K]`` of ``gamma`` on ``device``, copied there once (cached in eager mode).

    A host-to-device copy synchronises with the device: caching keeps it to the first call.
    """
    if is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE):
        return SeedRule(gamma).table(device)  # a constant of the graph; never cache fake tensors
    return _table_cached(gamma, torch.device(device))


@compile_cached(4096)
def _derive(k0: int, k1: int) -> tuple[int, int]:
    w = philox4x32_int(DOMAIN, 0, 0, 0, k0, k1)
    return w[0], w[1]


def rule_key(key: MaskKey) -> tuple[int, int]:
    """The rule's Philox key ``(w0, w1)`` for a key's seed and layer."""
    return _derive(*_layer_key(key.seed, key.layer))


def _gaps_fast(words: Tensor, table: Tensor, log_q: float) -> Tensor:
    """``gap(w) = 1 + #{g : w >= T[g]}`` of int64 words from a float estimate, corrected exactly.

    The count ``#{g : T[g] <= w}`` is estimated as ``floor(log1p(-w / 2**32) / log(q))`` and
    then moved up or down one step at a time until ``T[c] <= w < T[c + 1]`` holds exactly, so
    the result is the gap whatever the rounding (``table`` is ``T[1..K]``; CPU, eager only).
    """
    k = table.numel()
    padded = torch.cat([table.new_full((1,), -1), table, table.new_full((1,), 1 << 40)])  # T[0], T[K + 1]
    est = torch.log1p(words.to(torch.float32).mul_(-(2.0**-32))).div_(log_q).floor_()
    c = est.clamp_(0, k).long()
    while True:
        up = padded.index_select(0, c.view(-1) + 1).view_as(c) <= words
        down = padded.index_select(0, c.view(-1)).view_as(c) > words
        if not bool(up.any()) and not bool(down.any()):
            return c.add_(1)
        c += up.long() - down.long()


def draw_keyed_seeds(numel: int, gamma: float, key: MaskKey, device: torch.device, *, dense: bool) -> Tensor:
    """Draw a keyed Bernoulli(``gamma``) seed grid of ``numel`` places, one row per sample.

    The rule is given in this module's docstring; the dense and the sparse forms give the same
    seeds bit for bit.

    Args:
        numel: the number of places, a multiple of ``len(key.sample_ids)`` (one row per sample).
        gamma: the seed probability of every place, in ``[0, 1)``.
        key: the :class:`~spatialdrop.MaskKey`.
        device: where to draw.
        dense: return a bool tensor ``(numel,)`` (static shapes: every word of every chunk is
            evaluated) instead of the sorted int64 flat indices of the seeds (work in
            proportion to the number of chunks and seeds, with data-dependent sizes).

    Returns:
        The seed grid, dense (bool) or sparse (sorted int64 indices).

    Examples:
        >>> import torch
        >>> from spatialdrop import MaskKey
        >>> key = MaskKey(seed=0, step=1, layer=2, sample_ids=torch.tensor([4, 7]))
        >>> seeds = draw_keyed_seeds(2000, 0.05, key, torch.device("cpu"), dense=False)
        >>> dense = draw_keyed_seeds(2000, 0.05, key, torch.device("cpu"), dense=True)
        >>> torch.equal(dense.nonzero().squeeze(1), seeds)
        True
    """
    n = key.sample_ids.numel()
    row = numel // n if n else 0
    if row > _MAX_ROW:
        raise ValueError(f"draw_keyed_seeds: a row must have at most 2**34 places, got {row}")
    if gamma <= 0.0 or row == 0:
        if dense:
            return torch.zeros(numel, dtype=torch.bool, device=device)
        return torch.empty(0, dtype=torch.long, device=device)
    k = seed_rule(gamma).chunk
    table = threshold_table(gamma, device)
    w0, w1 = rule_key(key)
    sid = key.sample_ids.to(device=device, dtype=torch.int64)
    step = _step_word(key.step, device)
    chunks = (row + k - 1) // k
    log_q = math.log1p(-gamma)
    if dense:
        s = sid.view(n, 1)
        ctr = torch.arange(chunks * k // 4, dtype=torch.int64, device=device).view(1, -1)
        words = torch.stack(philox4x32(ctr, s & MASK32, (s >> 32) & MASK32, step, w0, w1), dim=-1)
        gaps = torch.searchsorted(table, words.view(n, chunks, k).contiguous(), right=True).add_(1)
        pos = gaps.cumsum_(-1).sub_(1)
        # one column past the chunk takes every seed that falls outside it
        grid = torch.zeros((n, chunks, k + 1), dtype=torch.bool, device=device)
        grid.scatter_(-1, pos.clamp_(max=k), True)
        return grid[..., :k].reshape(n, chunks * k)[:, :row].reshape(-1)
    # sparse: the first four words of every chunk, then four more for the chunks still open
    # (the arrays below hold the open chunks only: chunk number, chunk index, flat index of its
    # first place, sample id and the in-chunk position of its last seed). Each round's flat
    # indices go to columns 4 r .. 4 r + 3 of the chunk's row of a table, so that reading the
    # table row by row gives the seeds in ascending order, without a sort.
    c = torch.arange(chunks, device=device).repeat(n)
    total = c.numel()
    idx = torch.arange(total, device=device)
    row_start = torch.arange(n, device=device).mul_(row).repeat_interleave(chunks)
    first = row_start + c * k
    sc = sid.repeat_interleave(chunks)
    last = torch.full_like(c, -1)
    rounds: list[tuple[Tensor, Tensor]] = []
    end = numel  # "no seed": past the end of every row
    d = 0
    while c.numel() and d < k:
        ctr = c.mul(k // 4).add_(d // 4).unsqueeze(1)
        s1 = sc.unsqueeze(1)
        words = torch.cat(philox4x32(ctr, s1 & MASK32, (s1 >> 32) & MASK32, step, w0, w1), dim=1)
        pos = _gaps_fast(words, table, log_q).cumsum_(1).add_(last.unsqueeze(1))
        flat = torch.where(pos < k, pos + first.unsqueeze(1), end)
        rounds.append((idx, flat))
        last = pos[:, -1]
        still = (last < k).nonzero().squeeze(1)
        c, idx, first, sc, last = (t.index_select(0, still) for t in (c, idx, first, sc, last))
        d += 4
    table_ = torch.full((total, 4 * len(rounds)), end, dtype=torch.int64, device=device)
    for r, (rows_, flat) in enumerate(rounds):
        table_[:, 4 * r : 4 * r + 4].index_copy_(0, rows_, flat)
    return table_[table_ < row_start.add_(row).unsqueeze(1)]  # the last chunk may pass the row end
