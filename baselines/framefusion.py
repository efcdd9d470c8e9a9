"""FrameFusion (Fu et al., 2024; official code thu-nics/FrameFusion, ``framefusion/main.py``).

Merge, then prune, inside the LLM, to a compute budget ``cost`` = ``retention``: the mean share of
visual tokens over the decoder layers (the ShaRP paper's "equivalent retention", 31/26/21/16% in
Table 1 = FastV's mean share at 25/20/15/10%).

Hook points (as the official decoder layer): before layer 0's attention, then after every layer's
attention + residual, before its MLP (the engine's ``after_attention``). At a MERGE step, on the
current visual tokens x_1..x_n (rows of the residual stream, sorted by patch type = position in the
frame's token grid, then by frame):

    sim_j = cos(x_prev(j), x_j)       x_prev(j) = the token before j with the same patch type (else -2)
    marked = { j : sim_j >= similarity_lower_bound }                      (0.6)
    a run of marked tokens folds into the unmarked token before it: x <- mean of the n + 1 tokens

The merged share p = |marked| / n is compared with s_up, the sparsity the remaining layers would
need to meet the budget (:func:`required_sparsity`, the official ``_compute_pruning_ratio``):

* p < s_up: merge; p joins the sparsity list; if p < ratio_lower_bound (0.1) merging ends and ONE
  pruning step follows after the next layer's attention;
* p >= s_up: merge only the int(s_up x n) most similar tokens, which meets the budget: no pruning
  (also when the step would overspend what is left of the budget, where the official code raises
  "The cost is too small": shallow models, tiny budgets).

PRUNE step (the layer after merging ended): score = softmax(q k^T / sqrt(d_h)) after RoPE over the
whole causal row, mean over heads and the last ``queries`` query rows (1 for Qwen2 LMs, 4 for
Qwen2-VL as the official ports); keep the top round(n x (1 - s_up)) visual tokens.

Our choices (docs/methods/framefusion.md): cosine and means in float32; a marked token whose
predecessor is of another patch type cannot occur (sim = -2), and the top-k branch never marks such
a token (the official top-k could pick -2 entries when s_up x n exceeds the candidates; the pruning
step then follows to meet the budget); the budget
accounting uses the model's own depth (the official code hard-codes 28 layers); per sample in a
batch (the official code is batch 1), so samples stop merging at their own layers. Original
positions are kept (the official code slices cos/sin). Its FLOPs depend on the video:
``token_schedule`` is the nominal schedule the paper's TFLOPs column implies (FastV's shape with the
same mean share) and the trace's ``visual_tokens_per_layer`` is the measured one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from sharp import PruningMethod, Selection

IGNORE_SIMILARITY = -2.0  # official: the first token of a patch type has no predecessor
# official query rows of the pruning score per backbone family (Qwen2 LM ports: 1, Qwen2-VL port: 4)
OFFICIAL_QUERIES = {"qwen2_vl": 4}
NOMINAL_FULL_LAYERS = 2  # the nominal schedule: FastV's shape (K = 2) with the budget's mean share


def patch_order(patch: torch.Tensor) -> torch.Tensor:
    """(n,) order of the tokens by patch type, then by sequence position (the official sort)."""
    return torch.sort(patch, stable=True).indices


def neighbour_similarity(x: torch.Tensor, patch: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """sim (n,) in patch order: cos(token, previous token of the same patch type), -2 where none.

    x: (n, d) current visual tokens in sequence order; patch: (n,) their patch types.
    """
    xs = x[order].float()
    p = patch[order]
    sim = torch.full((x.shape[0],), IGNORE_SIMILARITY, dtype=torch.float32, device=x.device)
    if x.shape[0] > 1:
        cos = torch.nn.functional.cosine_similarity(xs[:-1], xs[1:], dim=-1)
        sim[1:] = torch.where(p[:-1] == p[1:], cos, torch.full_like(cos, IGNORE_SIMILARITY))
    return sim


def fold_runs(x: torch.Tensor, order: torch.Tensor, marked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold every run of marked tokens (patch order) into the unmarked token before it.

    Returns (merged x (n, d) in sequence order: each unmarked token = the unweighted mean of itself
    and its run, keep (n,) bool in sequence order: the unmarked tokens).
    """
    n = x.shape[0]
    positions = torch.arange(n, device=x.device)
    target = torch.cummax(torch.where(marked, torch.full_like(positions, -1), positions), dim=0).values  # (n,)
    if bool((target < 0).any()):
        raise RuntimeError("framefusion: a marked token has no unmarked token before it")
    xs = x[order].float()
    sums = torch.zeros_like(xs).index_add_(0, target, xs)
    counts = torch.bincount(target, minlength=n).clamp_min(1).to(xs.dtype)
    merged = x.clone()
    unmarked = ~marked
    merged[order[unmarked]] = (sums[unmarked] / counts[unmarked, None]).to(x.dtype)
    keep = torch.zeros(n, dtype=torch.bool, device=x.device)
    keep[order[unmarked]] = True
    return merged, keep


def _shares_left(sparsity: list[float]) -> list[float]:
    """s_i = prod_{j<=i} (1 - p_j): the share of visual tokens left after each merge step."""
    out, left = [], 1.0
    for p in sparsity:
        left *= 1.0 - p
        out.append(left)
    return out


def required_sparsity(sparsity: list[float], cost: float, num_layers: int) -> float:
    """s_up: the share of the current visual tokens the remaining layers must drop to meet ``cost``.

    With s_i the share left after merge step i (s_i = prod_{j<=i} (1 - p_j)), the steps so far cost
    sum_i s_i layer-equivalents; the remaining L - m layers at share s_m x (1 - s_up) must bring the
    total to L x cost:  s_up = 1 - (L cost - sum_i s_i) / ((L - m) s_m), clamped to [0, 1].
    """
    shares = _shares_left(sparsity)
    left, spent = (shares[-1] if shares else 1.0), sum(shares)
    remaining = num_layers * cost - spent
    if remaining < 0:  # already spent (the official code raises "The cost is too small"): drop all we may
        return 1.0
    layers_left = num_layers - len(sparsity)
    if layers_left <= 0 or remaining / (layers_left * left) > 1.0:
        return 0.0
    return 1.0 - remaining / (layers_left * left)


@dataclass
class _Progress:
    """One sample's state machine in one prefill."""

    sparsity: list = field(default_factory=list)  # merged share of each merge step (official sparsity_list)
    merging: bool = True
    pruning: bool = True  # the pruning step is still to come
    steps: list = field(default_factory=list)  # (layer, "input" | "after_attention", "merge" | "prune", n_before, n_after)


@dataclass
class FrameFusion(PruningMethod):
    name = "framefusion"
    similarity_lower_bound: float = 0.6  # merge when cos >= this (Qwen2-VL: 0.5, configs/method/framefusion.yaml)
    ratio_lower_bound: float = 0.1  # merging ends after a step that merges less than this share
    queries: Optional[int] = None  # query rows of the pruning score (None: 1, Qwen2-VL 4, as official)

    identity_at_full_retention: ClassVar[bool] = True  # R = 1: s_up = 0, nothing merges or prunes
    input_dependent_schedule: ClassVar[bool] = True  # merges depend on the video

    def __post_init__(self):
        super().__post_init__()
        if not -1.0 <= self.similarity_lower_bound <= 1.0:
            raise ValueError(f"framefusion: similarity_lower_bound must be a cosine in [-1, 1], "
                             f"got {self.similarity_lower_bound}")
        if not 0.0 <= self.ratio_lower_bound <= 1.0:
            raise ValueError(f"framefusion: ratio_lower_bound must be a share in [0, 1], got {self.ratio_lower_bound}")
        if self.queries is not None and self.queries < 1:
            raise ValueError(f"framefusion: queries must be a positive number of query rows or None, got {self.queries}")

    # -- where it acts ------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        return [0]  # before layer 0's attention

    def after_attention_layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers))

    # -- the steps ------------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        ctx.state.progress = [_Progress() for _ in range(ctx.batch_size)]
        ctx.trace.budget = self.retention
        return self._step(ctx, "input")

    def after_attention(self, ctx) -> Selection:
        return self._step(ctx, "after_attention")

    def _step(self, ctx, point: str) -> Selection:
        progress: list[_Progress] = ctx.state.progress
        if not any(p.merging or p.pruning for p in progress):
            return Selection.unchanged()
        counts = ctx.visual_counts
        keep = [torch.arange(n, device=ctx.hidden_states.device) for n in counts]
        hidden = None
        scores = None
        for b, p in enumerate(progress):
            if p.merging:
                if hidden is None:
                    hidden = ctx.hidden_states.clone()
                keep[b] = self._merge(ctx, b, p, hidden, point)
            elif p.pruning and point == "after_attention":
                if scores is None:
                    scores = ctx.gather_visual(ctx.last_token_attention(queries=self._queries(ctx)))
                keep[b] = self._prune(ctx, b, p, scores[b, :counts[b]])
        ctx.trace.steps = [p.steps for p in progress]
        if hidden is None and all(len(k) == n for k, n in zip(keep, counts)):
            return Selection.unchanged()
        return Selection(keep_visual=keep, hidden_states=hidden)

    def _merge(self, ctx, b: int, p: _Progress, hidden: torch.Tensor, point: str) -> torch.Tensor:
        """One merge step on sample b (writes the merged rows into ``hidden``); returns kept indices."""
        tokens = ctx.visual_tokens(b)
        n = len(tokens)
        patch = tokens.index % ctx.layout.tokens_per_frame  # (n,) position in the frame's token grid
        x = hidden[b, tokens.positions]  # (n, d)
        order = patch_order(patch)
        sim = neighbour_similarity(x, patch, order)  # (n,) in patch order
        s_up = required_sparsity(p.sparsity, self.retention, ctx.num_layers)
        marked = sim >= self.similarity_lower_bound
        merged_share = int(marked.sum()) / n
        if merged_share < s_up and self._affordable(p.sparsity, merged_share, ctx.num_layers):
            p.sparsity.append(merged_share)
            if merged_share < self.ratio_lower_bound:
                p.merging = False
        else:  # this step alone meets the budget: merge the int(s_up n) most similar, no pruning
            wanted = int(s_up * n)
            marked = self._most_similar(sim, wanted)
            p.merging = False
            p.pruning = int(marked.sum()) < wanted  # fewer candidates than the budget needs: prune next
            if p.pruning:
                p.sparsity.append(int(marked.sum()) / n)
        merged, kept = fold_runs(x, order, marked)
        hidden[b, tokens.positions] = merged
        p.steps.append((ctx.layer_idx, point, "merge", n, int(kept.sum())))
        return kept.nonzero().squeeze(1)

    def _affordable(self, sparsity: list[float], merged_share: float, num_layers: int) -> bool:
        """Whether a merge step leaving (1 - merged_share) of the tokens fits the budget left (the
        official code raises "The cost is too small" when it does not: shallow models, tiny budgets;
        we take the top-k branch instead, which meets the budget exactly)."""
        shares = _shares_left(sparsity)
        left, spent = (shares[-1] if shares else 1.0), sum(shares)
        return left * (1.0 - merged_share) <= num_layers * self.retention - spent

    @staticmethod
    def _most_similar(sim: torch.Tensor, k: int) -> torch.Tensor:
        """marked (n,) bool: the k highest similarities among tokens that have a predecessor."""
        marked = torch.zeros_like(sim, dtype=torch.bool)
        candidates = (sim > IGNORE_SIMILARITY).nonzero().squeeze(1)
        k = min(k, int(candidates.numel()))
        if k > 0:
            marked[candidates[torch.topk(sim[candidates], k).indices]] = True
        return marked

    def _prune(self, ctx, b: int, p: _Progress, scores: torch.Tensor) -> torch.Tensor:
        """The pruning step on sample b: top round(n (1 - s_up)) by the last rows' attention."""
        n = scores.shape[0]
        s_up = required_sparsity(p.sparsity, self.retention, ctx.num_layers)
        k = max(1, min(n, int(round(n * (1.0 - s_up)))))
        p.pruning = False
        p.steps.append((ctx.layer_idx, "after_attention", "prune", n, k))
        return torch.topk(scores, k).indices

    def _queries(self, ctx) -> int:
        if self.queries is not None:
            return self.queries
        return OFFICIAL_QUERIES.get(ctx.backbone_family, 1)

    # -- FLOPs -----------------------------------------------------------------------------------
    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """NOMINAL schedule (the real one depends on the video: the trace's visual_tokens_per_layer):
        FastV's shape with the budget's mean share, N_vis in the first two layers then n_kept with
        (2 N_vis + (L - 2) n_kept) / L = retention x N_vis (the paper's TFLOPs column assumes it)."""
        full = min(NOMINAL_FULL_LAYERS, num_layers - 1)
        share = (num_layers * self.retention - full) / (num_layers - full)
        kept = max(1, min(n_visual, int(round(share * n_visual))))
        return [n_visual] * full + [kept] * (num_layers - full)
