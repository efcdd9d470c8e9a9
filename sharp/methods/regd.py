"""ShaRP RegD (Sec. 4.3): register-token deduplication with pre-filtering and post-filling.

Pure tensor code for ONE sample; the ShaRP method (sharp/sharp_method.py) calls :func:`regd` per
sample with the stage's hidden states, the calibrated scores and the top-K "register" tokens.
Every interpretation of the paper's text is listed in docs/sharp.md; in short:

1. Pre-filtering (tau_filter): inside each segment, a non-register token whose max cosine
   similarity to the segment's register tokens is ``> tau_filter`` is absorbed into the most
   similar register token (ties: the earliest). The others form ``H'_nreg``.
2. Deduplication (tau_merge), inside each segment, over the register tokens in sequence order.
   ``dedup="pivot"`` (default): a token is compared with the current pivot (= the preceding
   *surviving* register token) and absorbed into it if ``cos > tau_merge``, else it becomes the
   new pivot. ``dedup="adjacent"``: a token is compared with its immediate predecessor in the
   register sequence (surviving or not); runs of such tokens collapse into the run's first token.
3. Post-filling (tau_cluster, beta), inside each segment, over ``H'_nreg`` in sequence order:
   sequential clustering, a token joins the current cluster if its cosine to the cluster's first
   token (``cluster="first"``, default) -- or to the immediately preceding token
   (``cluster="adjacent"``) -- is ``> tau_cluster``, else it opens a new cluster. The centre c_k of a
   cluster (``centre``): its first token (default), its medoid (the member with the largest summed
   cosine to the cluster's members, ties within MEDOID_TIE: the earliest) or its mean (the plain mean of the members'
   hidden states, forwarded at the first member's position; the members then count as absorbed into
   it). Centres are ranked by Eq. 6, ``Div_k = 1 - mean_{h in H'_reg} cos(c_k, h) + beta |C_k|`` (the similarity
   term is 0 for a segment without surviving register tokens).
   ``fill="segment"`` (default): every segment first refills the number of register tokens that
   deduplication removed from it, with its best centres; ``fill="global"``: the best centres over
   all segments refill the global shortfall. Whatever is still missing (too few centres) is taken,
   in this order, from the remaining centres by Div, the remaining ``H'_nreg`` tokens by
   calibrated score, then the absorbed tokens by calibrated score. The final number of kept
   tokens is therefore always exactly the number of register tokens K = round(retention x N_vis).

``absorb="mean"`` (default): each kept token's hidden state becomes the plain mean of its own and
of all the hidden states it absorbed, transitively (a pre-filtered token absorbed by a register
token that deduplication absorbed in turn ends in that register's pivot); a token put back by the
filling fallback keeps its own state and no longer counts as absorbed. ``absorb="drop"``: absorbed
tokens are just removed, hidden states untouched.

Cost: one (m_s x m_s) similarity block per segment for deduplication/clustering, one
(nonreg_s x reg_s) block for pre-filtering. Every block is its own matrix product, exactly the one a
loop over segments computes (a product's float rounding depends on its shape: one batched product
could select differently); the blocks of consecutive segments are then gathered into one
block-diagonal tile (at most ``_TILE_ENTRIES`` entries) and everything else runs once per tile:
pre-filtering gathers each row's own segment's columns, the sequential "pivot" pass reads each row's
later columns through a strided view. That pass needs no Python loop over tokens: ``next[i]`` = first
later token of the segment too dissimilar to ``i`` (a minimum over a masked row), then the chains
start -> next[start] -> ... from every segment start are found by pointer doubling (ceil(log2 m_s)
vectorised steps for the longest segment). Python loops run only over segments (one matrix product
each), tiles and doubling steps; the unit rows are computed and gathered once (registers first).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F


__all__ = ["RegDResult", "regd", "sequential_pivots", "DEDUP_MODES", "CLUSTER_MODES", "CENTRE_MODES", "FILL_MODES",
           "ABSORB_MODES"]

DEDUP_MODES = ("pivot", "adjacent")
_ROW_CHUNK = 2048  # rows of a long segment's similarity block computed at once (bounds memory to 2048 x m floats)
_TILE_ENTRIES = 1 << 16  # entries of one block-diagonal tile of consecutive segments' similarity blocks
CLUSTER_MODES = ("first", "adjacent")
CENTRE_MODES = ("first", "medoid", "mean")
MEDOID_TIE = 1e-5  # summed cosines this close to the cluster's best count as a tie (float rounding)
FILL_MODES = ("segment", "global")
ABSORB_MODES = ("mean", "drop")


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}")


@dataclass
class _Grouped:
    """Unit rows of a set of tokens, in sequence order, grouped by segment.

    ``x`` ``(m, d)``; ``counts`` ``(S,)`` long: rows of each segment (empty segments allowed); ``sizes``: the same
    as python ints; ``parts``: ``x.split(sizes)``, one ``(counts[s], d)`` view per segment."""

    x: torch.Tensor
    counts: torch.Tensor
    sizes: list
    parts: tuple

    @classmethod
    def of(cls, x: torch.Tensor, counts: torch.Tensor, sizes: Optional[list] = None) -> "_Grouped":
        sizes = counts.tolist() if sizes is None else sizes
        return cls(x, counts, sizes, x.split_with_sizes(sizes))


def sequential_pivots(
    x: torch.Tensor, tau: float, seg: Optional[torch.Tensor] = None, mode: str = "pivot"
) -> torch.Tensor:
    """Owner of every row in a sequential absorb-or-new-pivot pass.

    Args:
        x: ``(m, d)`` L2-normalised rows, in sequence order.
        tau: a row is absorbed when its cosine similarity is ``> tau``.
        seg: optional ``(m,)`` non-decreasing segment ids; passes never cross a segment (the first
            row of every segment is a pivot).
        mode: ``"pivot"`` -- compare with the current pivot (the last row that was not absorbed);
            ``"adjacent"`` -- compare with the immediately preceding row.

    Returns: ``(m,)`` long, ``owner[i]`` = index of the pivot row ``i`` belongs to (``owner[i] == i``
    for pivots). Pivots own the contiguous run that follows them.
    """
    _check("mode", mode, ("pivot", "adjacent", "first"))
    m = x.shape[0]
    if m == 0:
        return torch.arange(0, device=x.device)
    if seg is None:
        counts = torch.full((1,), m, dtype=torch.long, device=x.device)
    else:
        counts = torch.unique_consecutive(seg, return_counts=True)[1]
    return _owners(_Grouped.of(x, counts), tau, mode)[0]


def _owners(g: _Grouped, tau: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequential_pivots` of the rows ``g.x`` in the segments ``g.counts``: ``(m,)`` long owners and
    ``(m,)`` bool, the pivots."""
    m = g.x.shape[0]
    device = g.x.device
    ar = torch.arange(m, device=device)
    if m == 0:
        return ar, ar.bool()
    if mode == "adjacent":
        starts = torch.cumsum(g.counts, 0) - g.counts  # (S,) first row of each segment (m: empty at the end)
        is_pivot = torch.zeros(m + 1, dtype=torch.bool, device=device).index_fill_(0, starts, True)[:m]
        if m > 1:
            is_pivot[1:] |= ~((g.x[1:] * g.x[:-1]).sum(-1) > tau)  # not absorbed by the previous row
    else:  # "pivot" / "first": the reference is the run's first row
        ends = torch.cumsum(g.counts, 0)  # (S,) end of each segment
        steps = (max(g.sizes) - 1).bit_length()  # 2**steps >= the longest segment
        is_pivot = _chains(_next_dissimilar(g, tau, ends), ends - g.counts, steps)
    return torch.where(is_pivot, ar, 0).cummax(dim=0).values, is_pivot


def _next_dissimilar(g: _Grouped, tau: float, ends: torch.Tensor) -> torch.Tensor:
    """``next[i]`` = the first later row ``j`` of row i's segment with ``cos(x_i, x_j) <= tau``, else the
    segment's end (``ends`` ``(S,)``: the index after each segment's last row).

    Returns: ``(m + 1,)`` long, ``next[m] = m`` (a fixed point past the end, for :func:`_chains`).
    Every row reads the columns after its own in its segment's block (:func:`_later_similarities`)."""
    m = g.x.shape[0]
    device = g.x.device
    first = torch.arange(1, m + 1, device=device)  # (m,) the row after each row
    nxt = torch.full((m + 1,), m, dtype=torch.long, device=device)
    width = max(g.sizes) - 1  # the most later rows any row has
    if width == 0:  # one-row segments: everyone is a pivot
        nxt[:m] = first
        return nxt
    left = (torch.repeat_interleave(ends, g.counts, output_size=m) - first).int()  # (m,) later rows in its segment
    j = torch.arange(width, dtype=torch.int32, device=device)  # (int32: the (rows, width) temporaries stay small)
    for r0, r1, later in _later_similarities(g, width):
        stop = (later <= tau) & (j < left[r0:r1, None])  # too dissimilar, inside the segment
        nxt[r0:r1] = first[r0:r1] + torch.where(stop, j, left[r0:r1, None]).amin(dim=1)  # first + left: the end
    return nxt


def _later_similarities(g: _Grouped, width: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields ``(r0, r1, later)`` for consecutive row ranges covering ``g.x``: ``later`` ``(r1 - r0, width)`` with
    ``later[i, j] = x_{r0+i} . x_{r0+i+1+j}`` wherever row ``r0+i+1+j`` is in the same segment (anything beyond).

    A segment's block ``x_s @ x_s.T`` is one matrix product (longer than ``_ROW_CHUNK``: row chunks
    ``x_s[q:q + _ROW_CHUNK] @ x_s[q:].T`` against the columns from the chunk start on), exactly the one a loop over
    segments computes. ``later`` is a strided view of the product, row i shifted left by i + 1, so the product is
    written with room for ``width`` more entries: a segment alone straight into a slightly longer buffer, the
    blocks of consecutive short segments into one block-diagonal tile (:func:`_segment_groups`) with ``width``
    zero columns appended."""
    pad = None
    for s0, s1, r0, r1, _, _ in _segment_groups(g.sizes, g.sizes, alone_above=_ROW_CHUNK):
        if r1 == r0:
            continue
        if s1 - s0 == 1:  # one segment, in row chunks (one chunk unless longer than _ROW_CHUNK)
            part = g.parts[s0]
            for q in range(0, r1 - r0, _ROW_CHUNK):
                rows, cols = min(_ROW_CHUNK, r1 - r0 - q), r1 - r0 - q
                buf = part.new_empty(rows * cols + width)
                buf[rows * cols :].zero_()
                torch.mm(part[q : q + rows], part[q:].T, out=buf[: rows * cols].view(rows, cols))
                yield r0 + q, r0 + q + rows, buf.as_strided((rows, width), (cols + 1, 1), 1)
        else:
            if pad is None:
                pad = g.x.new_zeros((0, width))  # block_diag appends `width` zero columns
            blocks = [part @ part.T for part, size in zip(g.parts[s0:s1], g.sizes[s0:s1]) if size]
            tile = torch.block_diag(*blocks, pad)  # (r1 - r0, r1 - r0 + width)
            yield r0, r1, tile.as_strided((r1 - r0, width), (tile.shape[1] + 1, 1), 1)


def _chains(nxt: torch.Tensor, starts: torch.Tensor, steps: int) -> torch.Tensor:
    """``(m,)`` bool, True on the chains ``s -> nxt[s] -> nxt[nxt[s]] -> ...`` (indices < m) from every
    segment start ``s``, by pointer doubling.

    ``nxt`` ``(m + 1,)`` long with ``i < nxt[i] <= m``, ``nxt[m] = m`` and no jump past its segment's end (= the
    next start); ``starts`` ``(S,)`` (an empty segment's: the next one's, or m); ``2**steps`` >= the longest
    segment. After step k, ``on`` is > 0 on the rows reached from a start in fewer than ``2**k`` jumps and
    ``jump`` = nxt applied ``2**k`` times; a segment's chain has at most as many rows as the segment.
    """
    m = nxt.numel() - 1
    on = torch.zeros(m + 1, dtype=torch.long, device=nxt.device).index_fill_(0, starts, 1)
    jump = nxt
    for _ in range(steps):
        on = on.index_add(0, jump, on)  # on[v] += on[u] for every u with jump[u] == v
        jump = jump.index_select(0, jump)
    return on[:m] > 0


def _segment_groups(a_sizes: list[int], b_sizes: list[int], alone_above: Optional[int] = None):
    """Consecutive segment ranges for the block-diagonal tiles of per-segment similarity blocks.

    Args:
        a_sizes, b_sizes: rows / columns of every segment (python ints, one per segment, same order).
        alone_above: a segment with more rows than this gets a range of its own.

    Yields ``(s0, s1, a0, a1, b0, b1)``: segments ``[s0, s1)`` cover rows ``[a0, a1)`` and columns ``[b0, b1)``;
    a range holds several segments only while its tile has at most ``_TILE_ENTRIES`` entries.
    """
    s0, a0, b0, a1, b1 = 0, 0, 0, 0, 0
    for s, (la, lb) in enumerate(zip(a_sizes, b_sizes)):
        big = alone_above is not None and (la > alone_above or (s > s0 and a1 - a0 > alone_above))
        if s > s0 and (big or (a1 - a0 + la) * (b1 - b0 + lb) > _TILE_ENTRIES):
            yield s0, s, a0, a1, b0, b1
            s0, a0, b0 = s, a1, b1
        a1, b1 = a1 + la, b1 + lb
    if a_sizes:
        yield s0, len(a_sizes), a0, a1, b0, b1


def _own_blocks(a: _Grouped, b: _Grouped) -> Iterator[tuple]:
    """Similarities of every row of ``a`` with the rows of ``b`` in its own segment, laid out per row.

    Args:
        a, b: rows grouped by the same segments.

    Yields ``(r0, r1, sim, col0, width)`` for consecutive row ranges covering ``a`` (rows of segments without
    columns may be left out): ``sim`` ``(r1 - r0, w)`` float, ``sim[i, j] = a.x[r0 + i] . b.x[col0[i] + j]`` for
    ``j < width[i]`` (anything beyond); ``col0``, ``width`` ``(r1 - r0,)`` long, or for a range of one segment
    ``col0`` an int and ``width`` None (every column is the segment's).
    Each segment's block ``a_s @ b_s.T`` is one matrix product, exactly the one a loop over segments computes;
    the blocks of consecutive segments form one block-diagonal tile (:func:`_segment_groups`) from which every
    row gathers its own segment's columns.
    """
    device = a.x.device
    col0 = width = None  # per row of a: the first row of its segment in b, and their number
    for s0, s1, a0, a1, b0, b1 in _segment_groups(a.sizes, b.sizes):
        if a1 == a0 or b1 == b0:  # no rows, or no columns: nothing to compare
            continue
        if s1 - s0 == 1:  # one segment: its block is the layout
            yield a0, a1, a.parts[s0] @ b.parts[s0].T, b0, None
            continue
        if col0 is None:
            col0 = torch.repeat_interleave(torch.cumsum(b.counts, 0) - b.counts, a.counts, output_size=a.x.shape[0])
            width = torch.repeat_interleave(b.counts, a.counts, output_size=a.x.shape[0])
        tile = torch.block_diag(*[p @ q.T for p, q in zip(a.parts[s0:s1], b.parts[s0:s1])])  # (a1 - a0, b1 - b0)
        c0 = col0[a0:a1]
        local = (c0[:, None] - b0 + torch.arange(max(b.sizes[s0:s1]), device=device)).clamp_max_(b1 - b0 - 1)
        yield a0, a1, tile.gather(1, local), c0, width[a0:a1]


@dataclass
class RegDResult:
    """Outcome of :func:`regd` for one sample (all indices are visual-token indices 0..n-1)."""

    keep: torch.Tensor  # sorted, exactly len(registers) tokens
    kept_hidden: Optional[torch.Tensor]  # (len(keep), d) merged states of `keep` (absorb / centre "mean"); None = unchanged
    owner: torch.Tensor  # (n,) kept token each token ends in (itself if kept), -1 = dropped unmerged
    filtered: torch.Tensor  # non-register tokens absorbed by pre-filtering
    deduplicated: torch.Tensor  # register tokens absorbed by deduplication
    registers_after_dedup: torch.Tensor  # H'_reg over all segments
    centres: torch.Tensor  # cluster centres used for filling (centre="mean": the first members' positions)
    fallback: torch.Tensor  # tokens filled beyond cluster centres (not enough centres)
    times: dict[str, float] = field(default_factory=dict)  # filter / dedup / fill seconds

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` (n, d) with the kept rows replaced by their merged states (a copy if any)."""
        if self.kept_hidden is None:
            return hidden
        out = hidden.clone()
        out[self.keep] = self.kept_hidden.to(out.dtype)
        return out


def _synced_clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter`` read after the device's queued work (GPU) has finished."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def regd(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    registers: torch.Tensor,
    segment_ids: torch.Tensor,
    tau_filter: float = 0.7,
    tau_merge: float = 0.8,
    tau_cluster: float = 0.4,
    beta: float = 0.008,
    absorb: str = "mean",
    dedup: str = "pivot",
    cluster: str = "first",
    fill: str = "segment",
    clock: Optional[Callable[[], float]] = None,
    centre: str = "first",
) -> RegDResult:
    """Register-token deduplication of one sample (Sec. 4.3), see the module docstring.

    Args:
        hidden: ``(n, d)`` visual hidden states (sequence order) used for the similarities.
        scores: ``(n,)`` calibrated scores (Eq. 5); only used by the filling fallback.
        registers: indices of the top-K register tokens (any order, unique).
        segment_ids: ``(n,)`` non-decreasing segment index of each visual token.
        centre: what a cluster's centre c_k is (Eq. 6 and the token that refills): ``"first"`` (its first
            token), ``"medoid"`` or ``"mean"`` (see the module docstring).
        clock: what the phase times (``RegDResult.times``) read, a clock that waits for the device first;
            ShaRP passes its session's stage clock (``ctx.now``); None: ``time.perf_counter`` after a
            CUDA synchronise on a GPU.

    Returns: :class:`RegDResult`; ``keep`` has exactly ``len(registers)`` tokens.
    """
    for name, value, valid in (("absorb", absorb, ABSORB_MODES), ("dedup", dedup, DEDUP_MODES),
                               ("cluster", cluster, CLUSTER_MODES), ("fill", fill, FILL_MODES),
                               ("centre", centre, CENTRE_MODES)):
        _check(name, value, valid)
    segment_ids, registers = _checked_inputs(hidden, scores, registers, segment_ids)
    n, k = hidden.shape[0], registers.numel()
    device = hidden.device
    is_reg = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, registers, True)
    nonreg = (~is_reg).nonzero().squeeze(1)  # sorted
    x = _unit_rows(hidden, torch.cat([registers, nonreg]))  # (n, d) unit rows (dot = cosine): registers first
    absorber = torch.full((n,), -1, dtype=torch.long, device=device)  # token -> the token it went into
    times: dict[str, float] = {}
    clock = clock or _synced_clock(device)

    t0 = clock()
    _, seg, seg_counts = torch.unique_consecutive(segment_ids, return_inverse=True, return_counts=True)  # seg: 0..S-1
    reg_counts = torch.bincount(seg[registers], minlength=seg_counts.numel())  # (S,) registers per segment
    non_counts = seg_counts - reg_counts
    reg_sizes, non_sizes = torch.stack([reg_counts, non_counts]).tolist()
    reg = _Grouped.of(x[:k], reg_counts, reg_sizes)
    non = _Grouped.of(x[k:], non_counts, non_sizes)
    prefiltered = _prefilter(non, reg, nonreg, registers, tau_filter, absorber)  # (n - k,) bool over nonreg
    t1 = clock()
    kept_reg, deduplicated, x_kept = _deduplicate(reg, registers, tau_merge, dedup, absorber)
    t2 = clock()
    filled, used_centres, fallback, cluster_of = _postfill(non, nonreg, prefiltered, reg.counts, x_kept, seg, hidden,
                                                           scores, registers, kept_reg, absorber, tau_cluster, beta,
                                                           cluster, fill, centre)
    keep = torch.sort(torch.cat([kept_reg, filled])).values
    owner, kept = _final_owners(keep, absorber)
    kept_hidden = _merged_hidden(hidden, keep, owner, kept) if absorb == "mean" else None
    if centre == "mean" and used_centres.numel():
        owner, kept_hidden = _centre_means(hidden, keep, owner, kept_hidden, used_centres, cluster_of)
    times.update(filter=t1 - t0, dedup=t2 - t1, fill=clock() - t2)
    return RegDResult(
        keep=keep,
        kept_hidden=kept_hidden,
        owner=owner,
        filtered=nonreg[prefiltered],
        deduplicated=deduplicated,
        registers_after_dedup=kept_reg,
        centres=torch.sort(used_centres).values,
        fallback=torch.sort(fallback).values,
        times=times,
    )


def _unit_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(len(rows), d)`` float32: exactly ``F.normalize(hidden.float(), dim=-1, eps=1e-12)[rows]`` (the same
    norms over all rows, the same elementwise division), with one gather and the division done in place."""
    h = hidden.float()
    norm = torch.linalg.vector_norm(h, 2.0, -1, keepdim=True).clamp_min_(1e-12)  # what Tensor.norm(2.0, -1) calls
    return h.index_select(0, rows).div_(norm.index_select(0, rows))


def _checked_inputs(hidden, scores, registers, segment_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment_ids as long, sorted unique registers), or a ValueError naming what is wrong."""
    n = hidden.shape[0]
    device = hidden.device
    if scores.shape != (n,) or segment_ids.shape != (n,):
        raise ValueError(f"scores {tuple(scores.shape)} and segment_ids {tuple(segment_ids.shape)} must be ({n},)")
    segment_ids = segment_ids.to(device=device, dtype=torch.long)
    if n > 1 and bool((segment_ids[1:] < segment_ids[:-1]).any()):
        raise ValueError("segment_ids must be non-decreasing (segments are contiguous in sequence order)")
    registers = torch.unique(registers.to(device=device, dtype=torch.long))  # sorted
    k = registers.numel()
    if k == 0 or k > n or int(registers[0]) < 0 or int(registers[-1]) >= n:
        raise ValueError(f"registers must be 1..{n} distinct indices in [0, {n})")
    return segment_ids, registers


def _prefilter(non: _Grouped, reg: _Grouped, nonreg, registers, tau_filter, absorber) -> torch.Tensor:
    """Step (1): per segment, a non-register token whose max cosine to the segment's registers is
    ``> tau_filter`` is absorbed into the most similar one (first maximum on ties). Writes
    ``absorber`` (-1 on entry); returns ``(n - k,)`` bool over ``nonreg``: absorbed (filtered).

    ``non`` / ``reg``: the unit rows of the sorted non-register / register tokens ``nonreg`` / ``registers``;
    each segment's (nonreg_s x reg_s) block is one product (:func:`_own_blocks`)."""
    last = registers.numel() - 1
    hit = torch.zeros(nonreg.numel(), dtype=torch.bool, device=nonreg.device)
    for r0, r1, sim, col0, width in _own_blocks(non, reg):
        if width is not None:  # several segments: only the row's own segment's columns
            sim = torch.where(torch.arange(sim.shape[1], device=sim.device) < width[:, None], sim, -math.inf)
        best, arg = sim.max(dim=1)  # first maximum on ties
        target = registers[(col0 + arg).clamp_max_(last)]  # (clamped: a segment without registers, -inf)
        absorbs = best > tau_filter
        hit[r0:r1] = absorbs
        absorber[nonreg[r0:r1]] = torch.where(absorbs, target, -1)
    return hit


def _deduplicate(reg: _Grouped, registers, tau_merge, dedup, absorber):
    """Step (2): the sequential pivot pass over each segment's registers (``reg``: their unit rows).
    Writes ``absorber``; returns (H'_reg: surviving registers, deduplicated registers, (|H'_reg|, d) unit rows
    of H'_reg)."""
    owner_r, is_pivot = _owners(reg, tau_merge, dedup)
    dup = ~is_pivot
    absorber[registers[dup]] = registers[owner_r[dup]]
    kept = is_pivot.nonzero().squeeze(1)
    return registers[kept], registers[dup], reg.x.index_select(0, kept)


def _postfill(non: _Grouped, nonreg, prefiltered, reg_counts, x_kept, seg, hidden, scores, registers, kept_reg,
              absorber, tau_cluster, beta, cluster, fill, centre="first"):
    """Step (3): refill what deduplication removed from the clusters of H'_nreg, ranked by Eq. 6.
    ``non``: the unit rows of the sorted non-registers ``nonreg``, ``prefiltered`` (n - k,) bool over them:
    absorbed by pre-filtering; ``reg_counts`` (S,): registers per segment; ``x_kept`` (|H'_reg|, d): the unit rows of
    ``kept_reg``; ``seg`` (n,): segment of every token, 0..S-1.

    Returns (filled tokens in fill order, the centres among them, the fallback tokens, (n,) the
    first member of each H'_nreg token's cluster (-1: not clustered))."""
    device = non.x.device
    n = absorber.numel()
    n_seg = non.counts.numel()
    need = registers.numel() - kept_reg.numel()
    rest_at = (~prefiltered).nonzero().squeeze(1)  # positions in nonreg of H'_nreg
    if need == 0:  # nothing to refill: clustering would be wasted work
        rest_at = rest_at[:0]
    rest = nonreg[rest_at]  # H'_nreg, sequence order
    x_rest = non.x.index_select(0, rest_at)  # (m, d)
    rest_g = _Grouped.of(x_rest, torch.bincount(seg[rest], minlength=n_seg))
    owner_c, is_first = _owners(rest_g, tau_cluster, "pivot" if cluster == "first" else "adjacent")
    sizes = torch.bincount(owner_c, minlength=rest.numel())[is_first]
    is_centre, unit = _centres(x_rest, hidden, rest, owner_c, is_first, centre)
    centres, members = rest[is_centre], rest[~is_centre]
    kept_seg = seg[kept_reg]
    kept_counts = torch.bincount(kept_seg, minlength=n_seg)  # (S,) |H'_reg| per segment
    c_seg = seg[centres]
    div = _diversity(unit, c_seg, sizes, kept_seg, kept_counts, beta, x_kept)
    tier = _centre_order(div, c_seg, reg_counts - kept_counts, fill)
    candidates = [centres[tier]]
    from_centres = min(need, centres.numel())
    if need > centres.numel():  # not enough centres: calibrated score decides the rest
        absorbed = (absorber >= 0).nonzero().squeeze(1)
        for group in (members, absorbed):
            candidates.append(group[torch.sort(scores[group].float(), descending=True, stable=True).indices])
    filled = torch.cat(candidates)[:need]
    cluster_of = torch.full((n,), -1, dtype=torch.long, device=device)
    cluster_of[rest] = rest[owner_c]
    return filled, filled[:from_centres], filled[from_centres:], cluster_of


def _centres(xr, hidden, rest, owner_c, is_first, centre) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre of every cluster of H'_nreg: ((m,) bool over ``rest``, True at the token that stands
    for its cluster; (clusters, d) unit vectors of the centres in that token order, for Eq. 6).

    ``xr`` (m, d): the unit rows of ``rest``; ``owner_c`` (m,): position in ``rest`` of each token's
    cluster's first member. "first": the first member; "medoid": argmax_i sum_{j in C} cos(x_i, x_j) =
    x_i . sum_{j in C} x_j over the members (ties within MEDOID_TIE: the earliest); "mean": the first member's
    position, the members' plain mean as c_k."""
    m = rest.numel()
    if centre == "first" or m == 0:
        return is_first, xr.index_select(0, is_first.nonzero().squeeze(1))
    if centre == "medoid":
        summed = torch.zeros_like(xr).index_add_(0, owner_c, xr)  # (m, d): per first member, sum of its cluster
        affinity = (xr * summed[owner_c]).sum(-1)  # (m,)
        best = torch.full((m,), -math.inf, device=xr.device).scatter_reduce(0, owner_c, affinity, "amax")
        tied = affinity >= best[owner_c] - MEDOID_TIE  # a two-member cluster is always a tie: the first
        candidate = torch.where(tied, torch.arange(m, device=xr.device), m)
        medoid = torch.full((m,), m, device=xr.device).scatter_reduce(0, owner_c, candidate, "amin")[is_first]
        is_centre = torch.zeros(m, dtype=torch.bool, device=xr.device)
        is_centre[medoid] = True
        return is_centre, xr[medoid]
    mean = torch.zeros(m, hidden.shape[1], device=xr.device).index_add_(0, owner_c, hidden[rest].float())
    return is_first, F.normalize(mean[is_first], dim=-1, eps=1e-12)  # the direction of the plain mean


def _centre_means(hidden, keep, owner, kept_hidden, used_centres, cluster_of):
    """centre="mean": each refilled centre's row becomes the plain mean of its cluster's members that are
    not kept themselves (the fallback may put a member back); those members now end in the centre.
    ``cluster_of`` (n,): the first member (= the centre's token) of each clustered token's cluster, -1
    otherwise. Returns (owner, kept_hidden (len(keep), d))."""
    n = owner.numel()
    kept = torch.zeros(n, dtype=torch.bool, device=owner.device)
    kept[keep] = True
    used = torch.zeros(n, dtype=torch.bool, device=owner.device)
    used[used_centres] = True
    joins = (cluster_of >= 0) & ~kept & used[cluster_of.clamp_min(0)]
    owner = owner.clone()
    owner[joins] = cluster_of[joins]
    rows = (hidden[keep] if kept_hidden is None else kept_hidden).float()  # (len(keep), d)
    slot = torch.searchsorted(keep, cluster_of[joins])  # row of each member's centre in `keep`
    centre_rows = torch.searchsorted(keep, used_centres)
    sums = torch.zeros_like(rows).index_add_(0, slot, hidden[joins].float())
    count = torch.bincount(slot, minlength=keep.numel()).add_(1).unsqueeze(1).float()
    rows[centre_rows] = (hidden[used_centres].float() + sums[centre_rows]) / count[centre_rows]
    return owner, rows.to(hidden.dtype)


def _diversity(unit, c_seg, sizes, kept_seg, kept_counts, beta, x_kept) -> torch.Tensor:
    """Eq. 6: Div_k = 1 - mean_{h in H'_reg of the segment} cos(c_k, h) + beta |C_k| (similarity
    term 0 for a segment without surviving registers), via the mean of the unit register rows.
    ``unit`` (clusters, d): the centres' unit vectors, ``c_seg`` their segments; ``kept_seg`` / ``x_kept``
    (|H'_reg|, d): the segments / unit rows of H'_reg, ``kept_counts`` (S,) its size per segment."""
    mu = torch.zeros(kept_counts.numel(), x_kept.shape[1], device=x_kept.device).index_add_(0, kept_seg, x_kept)
    mu = mu / kept_counts.clamp_min(1).unsqueeze(1)
    return 1.0 - (unit * mu[c_seg]).sum(-1) + beta * sizes.float()


def _centre_order(div, c_seg, quota, fill) -> torch.Tensor:
    """Order in which centres refill: by Div (descending, ties: earlier first); with
    ``fill="segment"`` each segment's own quota (``quota`` (S,): the registers it lost) comes first.

    The quota centres keep their Div order: ``by_div`` ranks ties by position, i.e. by segment first (segments
    are contiguous), exactly as ranking the quota centres of each segment, segment after segment, by Div."""
    by_div = torch.sort(div, descending=True, stable=True).indices
    if fill != "segment":
        return by_div
    seg_sorted, order = torch.sort(c_seg[by_div], stable=True)  # positions in by_div: by segment, then Div
    rank = torch.arange(order.numel(), device=div.device) - torch.searchsorted(seg_sorted, seg_sorted)  # in segment
    chosen = torch.empty_like(order, dtype=torch.bool).scatter_(0, order, rank < quota[seg_sorted])  # by_div order
    return torch.cat([by_div[chosen], by_div[~chosen]])


def _final_owners(keep, absorber) -> tuple[torch.Tensor, torch.Tensor]:
    """((n,) kept token each token ends in (itself if kept, -1 if dropped unmerged), (n,) bool: kept), following
    the chains pre-filtered -> register -> pivot (a pivot is always kept). Index -1 reads the sentinel at n
    (kept, absorbed by -1), so a dropped token stays -1."""
    n = absorber.numel()
    kept = torch.zeros(n + 1, dtype=torch.bool, device=absorber.device).index_fill_(0, keep, True)
    kept[n] = True
    into = torch.cat([absorber, absorber.new_full((1,), -1)])
    owner = torch.where(kept[:n], torch.arange(n, device=absorber.device), absorber)
    for _ in range(2):
        owner = torch.where(kept[owner], owner, into[owner])
    return owner, kept[:n]


def _merged_hidden(hidden, keep, owner, kept) -> Optional[torch.Tensor]:
    """absorb="mean": each kept row becomes the plain mean of itself and every row it absorbed
    (None when nothing was absorbed). ``kept`` (n,) bool: the tokens of ``keep``."""
    merged_in = ((owner >= 0) & ~kept).nonzero().squeeze(1)
    if merged_in.numel() == 0:
        return None
    slot = torch.searchsorted(keep, owner[merged_in])  # row of its owner in `keep`
    acc = hidden.index_select(0, keep).float().index_add_(0, slot, hidden.index_select(0, merged_in).float())
    count = torch.bincount(slot, minlength=keep.numel()).add_(1).unsqueeze(1)
    return acc.div_(count).to(hidden.dtype)
