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
   token (its centre; ``cluster="first"``, default) -- or to the immediately preceding token
   (``cluster="adjacent"``) -- is ``> tau_cluster``, else it opens a new cluster. Centres are
   ranked by Eq. 6, ``Div_k = 1 - mean_{h in H'_reg} cos(c_k, h) + beta |C_k|`` (the similarity
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
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["RegDResult", "regd", "sequential_pivots", "DEDUP_MODES", "CLUSTER_MODES", "FILL_MODES", "ABSORB_MODES"]

DEDUP_MODES = ("pivot", "adjacent")
_ROW_CHUNK = 2048  # rows of a similarity block computed at once (bounds memory to 2048 x m floats)
CLUSTER_MODES = ("first", "adjacent")
FILL_MODES = ("segment", "global")
ABSORB_MODES = ("mean", "drop")


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    kept_hidden: Optional[torch.Tensor]  # (len(keep), d) merged states of `keep` (absorb="mean"); None = unchanged
    owner: torch.Tensor  # (n,) kept token each token ends in (itself if kept), -1 = dropped unmerged
    filtered: torch.Tensor  # non-register tokens absorbed by pre-filtering
    deduplicated: torch.Tensor  # register tokens absorbed by deduplication
    registers_after_dedup: torch.Tensor  # H'_reg over all segments
    centres: torch.Tensor  # cluster centres used for filling
    fallback: torch.Tensor  # tokens filled beyond cluster centres (not enough centres)
    times: dict[str, float] = field(default_factory=dict)  # filter / dedup / fill seconds

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` (n, d) with the kept rows replaced by their merged states (a copy if any)."""
        if self.kept_hidden is None:
            return hidden
        out = hidden.clone()
        out[self.keep] = self.kept_hidden.to(out.dtype)
        return out


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
) -> RegDResult:
    """Register-token deduplication of one sample (Sec. 4.3), see the module docstring.

    Args:
        hidden: ``(n, d)`` visual hidden states (sequence order) used for the similarities.
        scores: ``(n,)`` calibrated scores (Eq. 5); only used by the filling fallback.
        registers: indices of the top-K register tokens (any order, unique).
        segment_ids: ``(n,)`` non-decreasing segment index of each visual token.

    Returns: :class:`RegDResult`; ``keep`` has exactly ``len(registers)`` tokens.
    """
    _check("absorb", absorb, ABSORB_MODES)
    _check("dedup", dedup, DEDUP_MODES)
    _check("cluster", cluster, CLUSTER_MODES)
    _check("fill", fill, FILL_MODES)
    n, d = hidden.shape
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
    times: dict[str, float] = {}
    ar = torch.arange(n, device=device)
    x = F.normalize(hidden.float(), dim=-1, eps=1e-12)
    is_reg = torch.zeros(n, dtype=torch.bool, device=device)
    is_reg[registers] = True
    absorber = torch.full((n,), -1, dtype=torch.long, device=device)

    # ---- (1) pre-filtering -----------------------------------------------------------------
    _sync(device)
    t0 = time.perf_counter()
    nonreg = ar[~is_reg]
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
    filtered = nonreg[absorber[nonreg] >= 0]
    _sync(device)
    t1 = time.perf_counter()
    times["filter"] = t1 - t0

    # ---- (2) deduplication -----------------------------------------------------------------
    owner_r = sequential_pivots(x[registers], tau_merge, segment_ids[registers], dedup)
    local = torch.arange(k, device=device)
    dup = owner_r != local
    absorber[registers[dup]] = registers[owner_r[dup]]
    kept_reg = registers[~dup]
    deduplicated = registers[dup]
    _sync(device)
    t2 = time.perf_counter()
    times["dedup"] = t2 - t1

    # ---- (3) post-filling ------------------------------------------------------------------
    need = k - kept_reg.numel()
    rest = ar[(~is_reg) & (absorber < 0)]  # H'_nreg, sequence order
    if need == 0:  # nothing to refill: clustering would be wasted work
        rest = rest[:0]
    owner_c = sequential_pivots(x[rest], tau_cluster, segment_ids[rest], "pivot" if cluster == "first" else "adjacent")
    is_centre = owner_c == torch.arange(rest.numel(), device=device)
    sizes = torch.bincount(owner_c, minlength=rest.numel())[is_centre]
    centres = rest[is_centre]
    members = rest[~is_centre]
    n_seg = int(segment_ids[-1]) + 1
    # mean over H'_reg of cos(c, h) = c . mean(h / |h|), per segment (0 where H'_reg is empty)
    reg_seg = segment_ids[kept_reg]
    mu = torch.zeros(n_seg, d, device=device).index_add_(0, reg_seg, x[kept_reg])
    cnt = torch.bincount(reg_seg, minlength=n_seg).clamp_min(1).unsqueeze(1)
    mu = mu / cnt
    c_seg = segment_ids[centres]
    div = 1.0 - (x[centres] * mu[c_seg]).sum(-1) + beta * sizes.float()
    # centres by Div (descending, ties: earlier token first)
    by_div = torch.sort(div, descending=True, stable=True).indices
    if fill == "segment":
        quota = torch.bincount(segment_ids[registers], minlength=n_seg) - torch.bincount(reg_seg, minlength=n_seg)
        order = by_div[torch.sort(c_seg[by_div], stable=True).indices]  # by segment, then Div
        seg_sorted = c_seg[order]
        first_of_seg = torch.searchsorted(seg_sorted, seg_sorted, right=False)
        rank = torch.arange(order.numel(), device=device) - first_of_seg
        chosen = order[rank < quota[seg_sorted]]
        chosen = chosen[torch.sort(div[chosen], descending=True, stable=True).indices]
        taken = torch.zeros(centres.numel(), dtype=torch.bool, device=device)
        taken[chosen] = True
        tier_centres = torch.cat([chosen, by_div[~taken[by_div]]])
    else:
        tier_centres = by_div
    candidates = [centres[tier_centres]]
    fill_from_centres = min(need, centres.numel())
    if need > centres.numel():  # not enough centres: calibrated score decides the rest
        absorbed = ar[absorber >= 0]
        for group in (members, absorbed):
            candidates.append(group[torch.sort(scores[group].float(), descending=True, stable=True).indices])
    filled = torch.cat(candidates)[:need]
    used_centres = filled[:fill_from_centres]
    fallback = filled[fill_from_centres:]
    keep = torch.sort(torch.cat([kept_reg, filled])).values

    # ---- ownership and merged hidden states -------------------------------------------------
    kept = torch.zeros(n, dtype=torch.bool, device=device)
    kept[keep] = True
    owner = torch.where(kept, ar, absorber)
    for _ in range(2):  # chains: pre-filtered -> register -> pivot (a pivot is always kept)
        step = owner >= 0
        owner = torch.where(step & ~kept[owner.clamp_min(0)], absorber[owner.clamp_min(0)], owner)
    kept_hidden = None
    if absorb == "mean":
        merged_in = (owner >= 0) & ~kept  # absorbed tokens, each ending in a kept token
        if bool(merged_in.any()):
            slot = torch.searchsorted(keep, owner[merged_in])  # row of its owner in `keep`
            acc = hidden[keep].float().index_add_(0, slot, hidden[merged_in].float())
            count = torch.bincount(slot, minlength=keep.numel()).add_(1).unsqueeze(1)
            kept_hidden = (acc / count).to(hidden.dtype)
    _sync(device)
    times["fill"] = time.perf_counter() - t2
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
