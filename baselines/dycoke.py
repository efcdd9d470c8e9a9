"""DyCoke (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models",
CVPR 2025; official code KD-TAO/DyCoke @ dd74634). Two stages, one before the LLM and one in every
decode step:

1. TTM, temporal token merging (``llava/model/llava_arch.py: dycole_ttm``), on the input embeddings
   x_{t,i} (t = 0..F-1 frames, i = 0..n-1 tokens per frame), with k = int((1 - K) n):

       pairs    (2j, 2j+1):          s_i = cos(x_{2j,i}, x_{2j+1,i})  -> frame 2j+1 keeps its k lowest s_i
       windows  (i, i+2), i = 0, 4, ..., < F-4:  s_j = cos(x_{i,j}, x_{i+2,j}) -> frame i+2 keeps its k lowest

   (the same spatial index only; the dropped tokens are not averaged into anything). On F = 32, n = 196,
   K = 0.7: frames {0, 4, ..., 28, 30} stay whole, the other 23 keep 58 tokens: 9 x 196 + 23 x 58 = 3098.
2. Dynamic KV-cache pruning (``llava/model/language_model/modeling_qwen2.py: PrunableDynamicCache``),
   every decode step, from decoder layer L on: with a = mean over heads of layer L-1's attention of the
   step's query to the cached visual entries,

       if cos(a_t, a_{t-1}) < 0.9:  the step's query sees the text and topk(a_t, int(n' (1 - P))) visual entries
       else:                         the step's query sees the whole cache (official; ``similar_steps``)

   in layers L..end; the cache itself keeps every entry (the official code gathers K/V by index each
   step; the engine masks instead: the same attention). n' = the cached visual entries - 1 (official
   ``image_token_length = N_TTM - 1``: the last visual entry is never scored and always kept;
   ``scored_span="all"`` scores all).

Defaults: the official lmms-eval wrapper (L = 3, P = 0.8, K = 0.7). ``retention`` is the share of the
video's tokens entering the LLM: k per pruned frame is the largest that fits round(r N_vis) after the
whole frames (K = 0.7 on 32 x 196 is r = 0.494; below (whole frames)/F no pruned frame keeps a token);
``prune_ratio=K`` sets K directly (the official knob). docs/methods/dycoke.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from sharp import PruningMethod, Selection, budget, layer_kwarg

ODD_LAST_FRAME = ("drop", "keep")
SIMILAR_STEPS = ("full", "previous")
SCORED_SPANS = ("official", "all")
FRAME_ORDERS = ("similarity", "spatial")


def ttm_plan(frames: int, odd_last_frame: str = "drop") -> tuple[list[tuple[int, int]], list[int]]:
    """(comparisons, dropped frames) of TTM on ``frames`` frames: each (reference, pruned) frame pair in
    the official order (pairs (2j, 2j+1), then windows (i, i+2) for i = 0, 4, ... < frames - 4), and the
    frames the official pair loop leaves out (the last one of an odd count, unless ``keep``)."""
    pairs = [(2 * j, 2 * j + 1) for j in range(frames // 2)]
    windows = [(i, i + 2) for i in range(0, frames - 4, 4)]
    dropped = [frames - 1] if frames % 2 and odd_last_frame == "drop" else []
    return pairs + windows, dropped


def tokens_per_pruned_frame(n_visual: int, frames: int, per_frame: int, retention: float,
                            prune_ratio: Optional[float], odd_last_frame: str = "drop") -> int:
    """k: int((1 - K) n) for an explicit K (official: ``merging_ratio = 1 - K``), else the largest k such
    that the whole frames plus k per pruned frame fit round(r N_vis) (clamped to 0..n)."""
    if prune_ratio is not None:
        return int((1 - prune_ratio) * per_frame)
    comparisons, dropped = ttm_plan(frames, odd_last_frame)
    pruned = len(comparisons)
    whole = frames - pruned - len(dropped)
    if pruned == 0:
        return per_frame
    k = (budget(n_visual, retention) - whole * per_frame) // pruned
    return max(0, min(per_frame, k))


def lowest_similarity(reference: torch.Tensor, frame: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) token indices of ``frame`` (n, d) least similar to the same index of ``reference`` (n, d),
    ascending similarity (official: topk(largest=False) of the per-index cosine)."""
    similarity = F.cosine_similarity(reference, frame, dim=1)  # (n,)
    return torch.topk(similarity, k, largest=False).indices


def ttm_keep(features: torch.Tensor, k: int, odd_last_frame: str = "drop") -> list[torch.Tensor]:
    """TTM on one video's features (F, n, d): per frame, the kept token indices in the official order
    (a whole frame: 0..n-1; a pruned frame: its k lowest-similarity tokens, ascending similarity;
    a dropped frame: none). The reference frames are the raw features (no frame compared is pruned
    before it is a reference)."""
    frames, n, _ = features.shape
    keep = [torch.arange(n, device=features.device) for _ in range(frames)]
    comparisons, dropped = ttm_plan(frames, odd_last_frame)
    for reference, pruned in comparisons:
        keep[pruned] = lowest_similarity(features[reference], features[pruned], k)
    for t in dropped:
        keep[t] = keep[t][:0]
    return keep


@dataclass
class DyCoke(PruningMethod):
    """TTM before the LLM, and a per-step visual KV selection from layer L on while decoding."""

    name = "dycoke"
    identity_at_full_retention: ClassVar[bool] = False  # the decode-time KV selection prunes at any retention
    input_dependent_schedule: ClassVar[bool] = True  # the TTM count depends on the frame count
    official_positions: ClassVar[str] = "compact"  # the official LLM sees the TTM output renumbered
    retention: float = 0.5  # the share entering the LLM; K = 0.7 on 32 x 196 is 0.494
    prune_ratio: Optional[float] = None  # K: the share of a pruned frame's tokens TTM drops (None: from retention)
    layer: int = layer_kwarg(3, scaling="relative", lowest=1)  # L: the KV selection acts from layer L on
    kv_prune_ratio: float = 0.8  # P: the share of the scored visual entries a selecting step hides
    similarity_threshold: float = 0.9  # a step re-selects when cos(a_t, a_{t-1}) is below this
    similar_steps: str = "full"  # a step that does not re-select sees: "full" cache (official) | "previous" selection
    scored_span: str = "official"  # "official": the last visual entry is never scored, always kept | "all"
    odd_last_frame: str = "drop"  # an odd frame count: the official pair loop drops the last frame | "keep"
    frame_order: str = "similarity"  # compact positions: a pruned frame's tokens in ascending similarity (official) | "spatial"

    def __post_init__(self):
        super().__post_init__()
        for field_name, allowed in (("similar_steps", SIMILAR_STEPS), ("scored_span", SCORED_SPANS),
                                    ("odd_last_frame", ODD_LAST_FRAME), ("frame_order", FRAME_ORDERS)):
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"dycoke: {field_name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, field_name)!r}")
        for field_name in ("kv_prune_ratio",) + (("prune_ratio",) if self.prune_ratio is not None else ()):
            if not 0.0 <= getattr(self, field_name) <= 1.0:
                raise ValueError(f"dycoke: {field_name} must be in [0, 1], got {getattr(self, field_name)}")

    # -- where ---------------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        return [0]

    def decode_stages(self, num_layers: int) -> list[int]:
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"dycoke: layer must be in 1..{num_layers - 1} (it reads layer L-1), got {self.layer}")
        return [self.layer]

    def compacts_at(self, layer: int) -> bool:
        return self.positions == "compact" and layer == 0

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """NOMINAL schedule (the count depends on the frames: the trace's visual_tokens_per_layer):
        round(r N_vis) in every layer (TTM is before the LLM; the decode-time selection is not prefill)."""
        return [budget(n_visual, self.retention)] * num_layers

    # -- 1. TTM before the LLM -----------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        frames, per_frame = ctx.layout.frames, ctx.layout.tokens_per_frame
        if any(n != ctx.n_visual for n in ctx.visual_counts):
            raise ValueError("dycoke: TTM compares whole frames, so it must come first in a composition "
                             "(an earlier stage removed visual tokens)")
        k = tokens_per_pruned_frame(ctx.n_visual, frames, per_frame, self.retention, self.prune_ratio,
                                    self.odd_last_frame)
        reorder = self.frame_order == "similarity" and self.positions == "compact"
        hidden = ctx.hidden_states.clone() if reorder else None
        kept, trace_kept = [], []
        for b in range(ctx.batch_size):
            tokens = ctx.visual_tokens(b)
            features = ctx.visual_hidden_states(b).view(frames, per_frame, -1)  # (F, n, d)
            per_frame_keep = ttm_keep(features, k, self.odd_last_frame)
            order = torch.cat([t * per_frame + i for t, i in enumerate(per_frame_keep)])  # official order
            slots = order.sort().values  # the engine keeps tokens in sequence order
            if reorder:  # the official sequence holds the kept tokens in `order`: its rows, in our slots
                hidden[b, tokens.positions[slots]] = ctx.hidden_states[b, tokens.positions[order]]
            kept.append(slots)
            trace_kept.append(tokens.index[slots].cpu())
        ctx.trace.tokens_per_pruned_frame = k
        ctx.trace.kept = trace_kept
        ctx.trace.visual_kv_entries = [len(s) for s in kept]
        return Selection(kept, hidden_states=hidden)

    # -- 2. the KV selection of every decode step ----------------------------------------------------
    def decode_select(self, ctx) -> Selection:
        attention = ctx.visual_attention(self.layer - 1)  # (b, n_max) a_t over the cached visual entries
        counts = ctx.visual_counts
        previous = getattr(ctx.state, "attention", None) or [None] * len(counts)
        last = getattr(ctx.state, "keep", None) or [None] * len(counts)
        keep, selected = [], []
        for b, n in enumerate(counts):
            scored = n - 1 if self.scored_span == "official" else n
            a = attention[b, :scored]
            similarity = F.cosine_similarity(a, previous[b], dim=0) if previous[b] is not None else 0.0
            previous[b] = a
            if similarity < self.similarity_threshold:
                top = torch.topk(a, int(scored * (1 - self.kv_prune_ratio))).indices
                last[b] = torch.cat([top, torch.arange(scored, n, device=top.device)])
                keep.append(last[b])
                selected.append(True)
            else:
                full = torch.arange(n, device=attention.device)
                keep.append(full if self.similar_steps == "full" or last[b] is None else last[b])
                selected.append(False)
        ctx.state.attention, ctx.state.keep = previous, last
        ctx.trace.reselected = getattr(ctx.trace, "reselected", []) + [selected]
        if all(len(k) == n for k, n in zip(keep, counts)):  # every sample sees its whole cache: no mask
            return Selection.unchanged()
        return Selection(keep)
