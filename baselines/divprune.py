"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025; official code vbdi/divprune ``LLaVA/llava/model/llava_arch.py``: ``DivPrune``,
``pairwise_cosine_similarity``, called in ``prepare_inputs_labels_for_multimodal`` with LAYER_INDEX=0).

Before the LLM, on the visual tokens as they enter it (projected, and pooled on LLaVA-OV), one global
set S of k = round(R x N_vis) tokens over the whole video (no per-frame budget) that greedily
maximises the minimum pairwise distance (a max-min diversity problem):

    D = 1 - cos(x_i, x_j)                               (n, n), in the model's dtype (official)
    s_1 = argmax_j  min_{i != j} D_ij                    the token farthest from its nearest neighbour
                                                        (official: the 2nd-smallest entry of column j)
    s_t = argmax_j  min_{i in S_{t-1}} D_ij              t = 2..k (ties: the lowest index)

Once every remaining token duplicates a chosen one (all minima 0: static frames), the official argmax
can pick a chosen token again (D_cc = 0 ties; the first index wins) and its sequence holds that token
twice; a sequence here holds each token once, so fewer than k tokens remain (``repeats="official"``,
the default, measured: ``input_dependent_schedule``); ``repeats="distinct"`` never picks a token
twice (exactly k).

The official loop re-reads the rows of all selected tokens at every step (O(k^2 n)); we keep the
running column minimum instead (farthest-point sampling), which takes the same minima of the same
entries, hence the same indices, in O(k n). The kept tokens keep sequence order. Positions: the
official code renumbers the shortened sequence (``position_ids=None``); on Qwen (M-RoPE) the kept
tokens' own ids, as LightCompress's Qwen2.5-VL port. Memory: D is n x n (32 x 196 = 6272 tokens:
39.3 M entries, 79 MB in bf16, 157 MB in float32; the selection's measured peak on CPU is that one
matrix, tests/test_divprune.py). docs/methods/divprune.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sharp import PruningMethod, Selection

DISTANCE_DTYPES = ("model", "float32")
REPEATS = ("official", "distinct")


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, n) D = 1 - cos, in x's dtype (official ``pairwise_cosine_similarity``: rows divided
    by their norms, one matrix product); computed in place, so one n x n matrix is alive at a time
    ((-c) + 1 is 1 - c exactly)."""
    unit = x / x.norm(dim=1, keepdim=True)
    return (unit @ unit.T).neg_().add_(1.0)


def max_min_diverse(distance: torch.Tensor, k: int, distinct: bool = False) -> torch.Tensor:
    """(k,) indices chosen greedily by max-min distance, in the order chosen (distance: (n, n)).

    Official: once every remaining token duplicates a chosen one (all running minima 0), the argmax can
    return a token already chosen (D_cc = 0 ties with them; the first index wins), so the k picks may
    repeat. ``distinct``: a chosen token is never a candidate again, so the k picks are k tokens."""
    chosen = torch.empty(k, dtype=torch.long, device=distance.device)
    if k == 0:
        return chosen
    nearest = torch.topk(distance, 2, dim=0, largest=False).values[-1] if len(distance) > 1 else distance[0]
    chosen[0] = torch.argmax(nearest)
    running = distance[chosen[0]].clone()  # (n,) min over the chosen rows, per column
    for t in range(1, k):
        if distinct:
            running[chosen[t - 1]] = float("-inf")
        chosen[t] = torch.argmax(running)
        running = torch.minimum(running, distance[chosen[t]])
    return chosen


@dataclass
class DivPrune(PruningMethod):
    """One max-min diverse set of round(R x N_vis) visual tokens before the LLM."""

    name = "divprune"
    official_positions = "compact"  # the official code renumbers the shortened sequence
    # "model": the distance matrix in the model's dtype, as the official code (fp16 there); "float32"
    distance_dtype: str = "model"
    # "official": the official greedy, whose picks repeat a token once all that is left duplicates the
    # chosen ones (its sequence then holds the token twice; the engine keeps each token once, so fewer
    # than k remain); "distinct": a chosen token is never picked again (exactly k tokens)
    repeats: str = "official"

    def __post_init__(self):
        super().__post_init__()
        if self.distance_dtype not in DISTANCE_DTYPES:
            raise ValueError(f"divprune: distance_dtype must be one of {', '.join(map(repr, DISTANCE_DTYPES))}, "
                             f"got {self.distance_dtype!r}")
        if self.repeats not in REPEATS:
            raise ValueError(f"divprune: repeats must be one of {', '.join(map(repr, REPEATS))}, got {self.repeats!r}")

    @property
    def input_dependent_schedule(self) -> bool:  # type: ignore[override]
        """Official picks can repeat on duplicate tokens: the kept count is then below k (measured)."""
        return self.repeats == "official"

    def stages(self, num_layers: int) -> list[int]:
        return [0]  # LAYER_INDEX=0: on the input embeddings

    def select(self, ctx) -> Selection:
        budgets = ctx.budget(self.retention)
        if budgets == ctx.visual_counts:
            return Selection.unchanged()
        picks = [self.diverse_set(ctx.visual_hidden_states(b), k) for b, k in enumerate(budgets)]
        keep = [p.unique() for p in picks]  # sorted; a repeated pick is one token
        ctx.trace.budget = budgets
        ctx.trace.repeated_picks = [len(p) - len(u) for p, u in zip(picks, keep)]
        ctx.trace.kept = [ctx.visual_tokens(b).index[i].cpu() for b, i in enumerate(keep)]
        return Selection(keep)

    def diverse_set(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(n, d) visual embeddings -> (k,) chosen indices."""
        if self.distance_dtype == "float32":
            x = x.float()
        return max_min_diverse(cosine_distance(x), k, distinct=self.repeats == "distinct")
