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
(nonreg_s x reg_s) block for pre-filtering; the sequential "pivot" pass is resolved without a
Python loop over tokens: ``next[i]`` = first later token too dissimilar to ``i`` (argmax over a
masked row of the block), then the chain 0 -> next[0] -> ... is found by pointer doubling
(ceil(log2 m) + 1 vectorised steps). Python loops run only over segments.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


__all__ = ["RegDResult", "regd", "sequential_pivots", "DEDUP_MODES", "CLUSTER_MODES", "CENTRE_MODES", "FILL_MODES",
           "ABSORB_MODES"]

DEDUP_MODES = ("pivot", "adjacent")
_ROW_CHUNK = 2048  # rows of a similarity block computed at once (bounds memory to 2048 x m floats)
CLUSTER_MODES = ("first", "adjacent")
CENTRE_MODES = ("first", "medoid", "mean")
MEDOID_TIE = 1e-5  # summed cosines this close to the cluster's best count as a tie (float rounding)
FILL_MODES = ("segment", "global")
ABSORB_MODES = ("mean", "drop")


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}")


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
    device = x.device
    ar = torch.arange(m, device=device)
    if m == 0:
        return ar
    if seg is None:
        seg = torch.zeros(m, dtype=torch.long, device=device)
    if mode == "adjacent":
        absorbed = torch.zeros(m, dtype=torch.bool, device=device)
        if m > 1:
            sim = (x[1:] * x[:-1]).sum(-1)
            absorbed[1:] = (sim > tau) & (seg[1:] == seg[:-1])
        is_pivot = ~absorbed
    else:  # "pivot" / "first": the reference is the run's first row
        nxt = torch.empty(m, dtype=torch.long, device=device)
        for start, length in _runs_by_value(seg)[1]:
            block = x[start : start + length]
            # next[i] = first j > i with cos(x_i, x_j) <= tau (end of segment if none); rows in
            # chunks against the columns from the chunk start on (upper triangle only)
            for r0 in range(0, length, _ROW_CHUNK):
                r1 = min(length, r0 + _ROW_CHUNK)
                sim = block[r0:r1] @ block[r0:].T  # (r1 - r0, length - r0)
                col = torch.arange(r0, length, device=device)
                row = torch.arange(r0, r1, device=device)
                stop = (sim <= tau) & (col[None, :] > row[:, None])  # later and too dissimilar
                stop = torch.cat([stop, torch.ones(r1 - r0, 1, dtype=torch.bool, device=device)], dim=1)
                nxt[start + r0 : start + r1] = start + r0 + stop.to(torch.uint8).argmax(dim=1)  # first True
        # pivots = the chain 0 -> nxt[0] -> nxt[nxt[0]] -> ... (< m); pointer doubling
        jump = torch.cat([nxt, torch.tensor([m], device=device)])
        on = torch.zeros(m + 1, dtype=torch.long, device=device)
        on[0] = 1
        for _ in range(math.ceil(math.log2(m + 1)) + 1):
            on = torch.maximum(on, torch.zeros_like(on).scatter_reduce(0, jump, on, "amax"))
            jump = jump[jump]
        is_pivot = on[:m].bool()
    return torch.where(is_pivot, ar, torch.zeros_like(ar)).cummax(dim=0).values


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
    n = hidden.shape[0]
    device = hidden.device
    x = F.normalize(hidden.float(), dim=-1, eps=1e-12)  # (n, d) unit rows: dot = cosine
    is_reg = torch.zeros(n, dtype=torch.bool, device=device)
    is_reg[registers] = True
    absorber = torch.full((n,), -1, dtype=torch.long, device=device)  # token -> the token it went into
    times: dict[str, float] = {}
    clock = clock or _synced_clock(device)

    t0 = clock()
    filtered = _prefilter(x, registers, is_reg, segment_ids, tau_filter, absorber)
    t1 = clock()
    kept_reg, deduplicated = _deduplicate(x, registers, segment_ids, tau_merge, dedup, absorber)
    t2 = clock()
    filled, used_centres, fallback, cluster_of = _postfill(x, hidden, scores, registers, kept_reg, is_reg, segment_ids,
                                                           absorber, tau_cluster, beta, cluster, fill, centre)
    keep = torch.sort(torch.cat([kept_reg, filled])).values
    owner = _final_owners(keep, absorber)
    kept_hidden = _merged_hidden(hidden, keep, owner) if absorb == "mean" else None
    if centre == "mean" and used_centres.numel():
        owner, kept_hidden = _centre_means(hidden, keep, owner, kept_hidden, used_centres, cluster_of)
    times.update(filter=t1 - t0, dedup=t2 - t1, fill=clock() - t2)
    return RegDResult(
        keep=keep,
        kept_hidden=kept_hidden,
        owner=owner,
        filtered=filtered,
        deduplicated=deduplicated,
        registers_after_dedup=kept_reg,
        centres=torch.sort(used_centres).values,
        fallback=torch.sort(fallback).values,
        times=times,
    )


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


def _prefilter(x, registers, is_reg, segment_ids, tau_filter, absorber) -> torch.Tensor:
    """Step (1): per segment, a non-register token whose max cosine to the segment's registers is
    ``> tau_filter`` is absorbed into the most similar one (first maximum on ties). Writes
    ``absorber``; returns the absorbed (filtered) tokens."""
    nonreg = torch.arange(x.shape[0], device=x.device)[~is_reg]
    reg_runs = dict(zip(*_runs_by_value(segment_ids[registers])))
    non_runs = dict(zip(*_runs_by_value(segment_ids[nonreg])))
    for s, (ns, nl) in non_runs.items():
        if s not in reg_runs:
            continue
        rs, rl = reg_runs[s]
        non_s, reg_s = nonreg[ns : ns + nl], registers[rs : rs + rl]
        best, arg = (x[non_s] @ x[reg_s].T).max(dim=1)  # first maximum on ties
        hit = best > tau_filter
        absorber[non_s[hit]] = reg_s[arg[hit]]
    return nonreg[absorber[nonreg] >= 0]


def _deduplicate(x, registers, segment_ids, tau_merge, dedup, absorber) -> tuple[torch.Tensor, torch.Tensor]:
    """Step (2): the sequential pivot pass over each segment's registers. Writes ``absorber``;
    returns (H'_reg: surviving registers, deduplicated registers)."""
    owner_r = sequential_pivots(x[registers], tau_merge, segment_ids[registers], dedup)
    dup = owner_r != torch.arange(registers.numel(), device=x.device)
    absorber[registers[dup]] = registers[owner_r[dup]]
    return registers[~dup], registers[dup]


def _postfill(x, hidden, scores, registers, kept_reg, is_reg, segment_ids, absorber, tau_cluster, beta, cluster, fill,
              centre="first"):
    """Step (3): refill what deduplication removed from the clusters of H'_nreg, ranked by Eq. 6.

    Returns (filled tokens in fill order, the centres among them, the fallback tokens, (n,) the
    first member of each H'_nreg token's cluster (-1: not clustered))."""
    device = x.device
    n = x.shape[0]
    ar = torch.arange(n, device=device)
    need = registers.numel() - kept_reg.numel()
    rest = ar[(~is_reg) & (absorber < 0)]  # H'_nreg, sequence order
    if need == 0:  # nothing to refill: clustering would be wasted work
        rest = rest[:0]
    owner_c = sequential_pivots(x[rest], tau_cluster, segment_ids[rest], "pivot" if cluster == "first" else "adjacent")
    is_first = owner_c == torch.arange(rest.numel(), device=device)
    sizes = torch.bincount(owner_c, minlength=rest.numel())[is_first]
    is_centre, unit = _centres(x, hidden, rest, owner_c, is_first, centre)
    centres, members = rest[is_centre], rest[~is_centre]
    div = _diversity(unit, centres, sizes, kept_reg, segment_ids, beta, x)
    tier = _centre_order(div, segment_ids[centres], segment_ids, registers, kept_reg, fill)
    candidates = [centres[tier]]
    from_centres = min(need, centres.numel())
    if need > centres.numel():  # not enough centres: calibrated score decides the rest
        absorbed = ar[absorber >= 0]
        for group in (members, absorbed):
            candidates.append(group[torch.sort(scores[group].float(), descending=True, stable=True).indices])
    filled = torch.cat(candidates)[:need]
    cluster_of = torch.full((n,), -1, dtype=torch.long, device=device)
    cluster_of[rest] = rest[owner_c]
    return filled, filled[:from_centres], filled[from_centres:], cluster_of


def _centres(x, hidden, rest, owner_c, is_first, centre) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre of every cluster of H'_nreg: ((m,) bool over ``rest``, True at the token that stands
    for its cluster; (clusters, d) unit vectors of the centres in that token order, for Eq. 6).

    ``owner_c`` (m,): position in ``rest`` of each token's cluster's first member. "first": the first
    member; "medoid": argmax_i sum_{j in C} cos(x_i, x_j) = x_i . sum_{j in C} x_j over the members
    (ties within MEDOID_TIE: the earliest); "mean": the first member's position, the members' plain mean as c_k."""
    m = rest.numel()
    if centre == "first" or m == 0:
        return is_first, x[rest[is_first]]
    xr = x[rest]
    if centre == "medoid":
        summed = torch.zeros_like(xr).index_add_(0, owner_c, xr)  # (m, d): per first member, sum of its cluster
        affinity = (xr * summed[owner_c]).sum(-1)  # (m,)
        best = torch.full((m,), -math.inf, device=x.device).scatter_reduce(0, owner_c, affinity, "amax")
        tied = affinity >= best[owner_c] - MEDOID_TIE  # a two-member cluster is always a tie: the first
        candidate = torch.where(tied, torch.arange(m, device=x.device), m)
        medoid = torch.full((m,), m, device=x.device).scatter_reduce(0, owner_c, candidate, "amin")[is_first]
        is_centre = torch.zeros(m, dtype=torch.bool, device=x.device)
        is_centre[medoid] = True
        return is_centre, xr[medoid]
    mean = torch.zeros(m, hidden.shape[1], device=x.device).index_add_(0, owner_c, hidden[rest].float())
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


def _diversity(unit, centres, sizes, kept_reg, segment_ids, beta, x) -> torch.Tensor:
    """Eq. 6: Div_k = 1 - mean_{h in H'_reg of the segment} cos(c_k, h) + beta |C_k| (similarity
    term 0 for a segment without surviving registers), via the mean of the unit register rows.
    ``unit`` (clusters, d): the centres' unit vectors; ``centres``: their tokens (for the segment)."""
    n_seg = int(segment_ids[-1]) + 1
    reg_seg = segment_ids[kept_reg]
    mu = torch.zeros(n_seg, x.shape[1], device=x.device).index_add_(0, reg_seg, x[kept_reg])
    mu = mu / torch.bincount(reg_seg, minlength=n_seg).clamp_min(1).unsqueeze(1)
    return 1.0 - (unit * mu[segment_ids[centres]]).sum(-1) + beta * sizes.float()


def _centre_order(div, c_seg, segment_ids, registers, kept_reg, fill) -> torch.Tensor:
    """Order in which centres refill: by Div (descending, ties: earlier first); with
    ``fill="segment"`` each segment's own quota (registers it lost) comes first."""
    by_div = torch.sort(div, descending=True, stable=True).indices
    if fill != "segment":
        return by_div
    n_seg = int(segment_ids[-1]) + 1
    quota = (torch.bincount(segment_ids[registers], minlength=n_seg)
             - torch.bincount(segment_ids[kept_reg], minlength=n_seg))
    order = by_div[torch.sort(c_seg[by_div], stable=True).indices]  # by segment, then Div
    seg_sorted = c_seg[order]
    rank = torch.arange(order.numel(), device=div.device) - torch.searchsorted(seg_sorted, seg_sorted, right=False)
    chosen = order[rank < quota[seg_sorted]]
    chosen = chosen[torch.sort(div[chosen], descending=True, stable=True).indices]
    taken = torch.zeros(div.numel(), dtype=torch.bool, device=div.device)
    taken[chosen] = True
    return torch.cat([chosen, by_div[~taken[by_div]]])


def _final_owners(keep, absorber) -> torch.Tensor:
    """(n,) kept token each token ends in (itself if kept, -1 if dropped unmerged), following the
    chains pre-filtered -> register -> pivot (a pivot is always kept)."""
    n = absorber.numel()
    kept = torch.zeros(n, dtype=torch.bool, device=absorber.device)
    kept[keep] = True
    owner = torch.where(kept, torch.arange(n, device=absorber.device), absorber)
    for _ in range(2):
        step = owner >= 0
        owner = torch.where(step & ~kept[owner.clamp_min(0)], absorber[owner.clamp_min(0)], owner)
    return owner


def _merged_hidden(hidden, keep, owner) -> Optional[torch.Tensor]:
    """absorb="mean": each kept row becomes the plain mean of itself and every row it absorbed
    (None when nothing was absorbed)."""
    kept = torch.zeros(owner.numel(), dtype=torch.bool, device=owner.device)
    kept[keep] = True
    merged_in = (owner >= 0) & ~kept
    if not bool(merged_in.any()):
        return None
    slot = torch.searchsorted(keep, owner[merged_in])  # row of its owner in `keep`
    acc = hidden[keep].float().index_add_(0, slot, hidden[merged_in].float())
    count = torch.bincount(slot, minlength=keep.numel()).add_(1).unsqueeze(1)
    return (acc / count).to(hidden.dtype)


def _runs_by_value(seg: torch.Tensor) -> tuple[list[int], list[tuple[int, int]]]:
    """Values and (start, length) of the runs of a sorted 1-D tensor."""
    if seg.numel() == 0:
        return [], []
    values, counts = torch.unique_consecutive(seg, return_counts=True)
    starts, acc = [], 0
    for c in counts.tolist():
        starts.append(acc)
        acc += c
    return values.tolist(), list(zip(starts, counts.tolist()))
