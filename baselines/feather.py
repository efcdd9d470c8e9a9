"""FEATHER (Endo et al., "Feather the Throttle", 2024; official code markendo/FEATHER, Prismatic
``llama2_models.py``, ``eval_feather.sh``).

Score: the attention the LAST token pays each visual token in layer K-1's map, computed from that
layer's input WITHOUT RoPE and normalised over the visual keys only, heads averaged (GQA heads
repeated):

    s_j = mean_h softmax_{j in V}( q_last^h k_j^h^T / sqrt(d_h) )          (no RoPE on q, k)

(``ctx.last_token_attention(layer=K-1, rope=False, softmax_over="visual")``). RoPE's long-term decay
makes FastV's criterion favour the bottom of the image; removing it and adding uniform samples is
FEATHER's fix. Kept tokens keep their original positions.

``schedule="paper"`` (default, the ShaRP paper's runs: "removes positional embeddings at the 2nd layer
and applies uniform sampling"): ONE stage before layer ``layer`` (K = 2, as FastV) keeps exactly
k = budget(N_vis, R) tokens (R = ``retention``, a share of the ORIGINAL count, at most the current
count), of which a uniform per-frame grid is counted INSIDE k:

1. grid candidates G = current tokens whose (row, col) in their frame's token grid are multiples of
   ``grid_stride`` (official [::3, ::3]: 25 of a 14 x 14 frame, 12.8%), in sequence (= frame, row,
   col) order;
2. the grid may take at most c = floor(``grid_share`` x k) tokens: if |G| <= c all of G is kept,
   otherwise G is thinned to a SPATIAL sub-grid (:func:`spatial_subgrid`): frame t gets
   q_t = floor((t+1) c / F) - floor(t c / F) points and keeps an a x b lattice of its grid rows and
   columns (a x b <= q_t, the most even coverage a / rows ~ b / cols; the a rows and b columns equally
   spaced and centred among the grid's), i.e. a coarser stride in both directions;
3. the remaining k - |grid| tokens are the top de-RoPE scores among the tokens not kept by step 2
   (thinned-out grid candidates compete on their score).

``schedule="official"``: the official code's two stages before ``layers`` (8, 16): stage 1 keeps the
top round(0.3 x N_vis) by the score of layer 7 UNITED with the full stride grid (a video-dependent
count, between max(0.3 N, |G|) and 0.3 N + |G|); stage 2 keeps the top int(0.09 x survivors) by the
score of layer 15 (the grid is not protected). ``retention`` and ``grid_share`` are not used there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from sharp import ScorerMethod, Selection, budget, layer_kwarg, split_budget

SCHEDULES = ("paper", "official")
OFFICIAL_TOP = 0.3  # official stage 1: fastv_ratio 0.7 -> keep the top 30% (plus the grid)
OFFICIAL_STAGE2 = 0.09  # official stage 2: int(0.09 x survivors)
# per-frame token grid of the named backbones' paper layouts (official-schedule FLOPs only)
_FRAME_GRID = {"llava_onevision_7b": (14, 14), "qwen2_vl_7b": (12, 15),
               "tiny_llava_onevision": (4, 4), "tiny_qwen2_vl": (4, 4)}


def grid_count(n_visual: int, frame_grid: tuple[int, int], stride: int) -> int:
    """Stride-``stride`` grid tokens of n_visual tokens in frames of ``frame_grid`` = (h, w)."""
    h, w = frame_grid
    return (n_visual // (h * w)) * math.ceil(h / stride) * math.ceil(w / stride)


def centred(n: int, k: int) -> torch.Tensor:
    """k of n positions, equally spaced and centred: floor((2i + 1) n / (2k)), i = 0..k-1 (all n when
    k >= n; k = 1 gives the middle one, floor(n / 2))."""
    if k >= n:
        return torch.arange(n)
    return torch.div((2 * torch.arange(k) + 1) * n, 2 * k, rounding_mode="floor")


def lattice_shape(rows: int, cols: int, q: int) -> tuple[int, int]:
    """(a, b): a of a frame's ``rows`` grid rows by b of its ``cols`` grid columns, a x b <= q points,
    as evenly spread as possible: maximise the smaller coverage min(a / rows, b / cols), then the point
    count a b, then prefer fewer rows (q >= 1; (0, 0) when q = 0)."""
    if q <= 0 or rows == 0 or cols == 0:
        return 0, 0
    best = None
    for a in range(1, rows + 1):
        b = min(cols, q // a)
        if b == 0:
            break
        key = (min(a / rows, b / cols), a * b, -a)
        if best is None or key > best[0]:
            best = (key, a, b)
    return best[1], best[2]


def spatial_subgrid(frame: torch.Tensor, row: torch.Tensor, col: torch.Tensor, cap: int) -> torch.Tensor:
    """At most ``cap`` of the grid candidates, as a spatial sub-grid of every frame.

    frame, row, col: (m,) of the candidates (one sample). The frames that have candidates, in order,
    get q_t = ``split_budget(cap, [1] * F)`` points (floor((t+1) cap / F) - floor(t cap / F): each
    floor(cap / F) or one more, on equally spaced frames); frame t keeps the lattice of a of its R distinct
    candidate rows by b of its C distinct columns (:func:`lattice_shape`), each chosen :func:`centred`
    (equally spaced, centred), i.e. a coarser stride of the stride grid along both axes; a frame whose
    quota covers all its candidates keeps them all. Returns indices into the candidates, ascending.
    """
    if cap >= len(frame):
        return torch.arange(len(frame), device=frame.device)
    frames = torch.unique(frame, sorted=True)
    chosen = []
    for f, q in zip(frames.tolist(), split_budget(cap, [1] * len(frames))):
        own = (frame == f).nonzero().flatten()
        if q >= len(own):
            chosen.append(own)
            continue
        rows, cols = torch.unique(row[own], sorted=True), torch.unique(col[own], sorted=True)
        a, b = lattice_shape(len(rows), len(cols), q)
        on = torch.isin(row[own], rows[centred(len(rows), a).to(rows.device)]) & \
            torch.isin(col[own], cols[centred(len(cols), b).to(cols.device)])
        chosen.append(own[on])
    return torch.cat(chosen).sort().values


@dataclass
class Feather(ScorerMethod):
    name = "feather"
    layer: int = layer_kwarg(2, scaling="fixed")  # paper mode: K, the first layer that sees the pruned sequence (scores with K-1)
    # "paper": one stage at `layer` | "official": two stages at `layers` (a field cannot be named
    # `stages`: that is the engine's hook)
    schedule: str = "paper"
    # official mode's two stage layers (typing.Union: the base's type check reads it)
    layers: Union[list, tuple] = layer_kwarg(default_factory=lambda: [8, 16], scaling="relative")  # noqa: UP007
    grid_stride: int = 3  # uniform grid: rows / cols [::grid_stride, ::grid_stride] of each frame
    grid_share: float = 0.5  # paper mode: the largest share of the budget the grid may take

    def __post_init__(self):
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"feather: schedule must be one of {', '.join(map(repr, SCHEDULES))}, "
                             f"got {self.schedule!r}")
        if self.grid_stride < 1:
            raise ValueError(f"feather: grid_stride must be an int >= 1, got {self.grid_stride!r}")
        if not 0.0 <= self.grid_share <= 1.0:
            raise ValueError(f"feather: grid_share must be in [0, 1], got {self.grid_share!r}")
        layers = list(self.layers)
        if len(layers) != 2 or any(not isinstance(k, int) or isinstance(k, bool) for k in layers):
            raise TypeError(f"feather: layers must be a list of two ints (official stage layers), got {self.layers!r}")
        if not layers[0] < layers[1]:
            raise ValueError(f"feather: layers must be increasing, got {self.layers!r}")
        self.layers = layers

    # -- where ---------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        ks = [self.layer] if self.schedule == "paper" else list(self.layers)
        name = "layer" if self.schedule == "paper" else "layers"
        for k in ks:
            if not 1 <= k < num_layers:
                raise ValueError(f"feather: {name} must be in 1..{num_layers - 1} (a stage scores with the "
                                 f"layer before it), got {k}")
        return ks

    def score_layers(self, num_layers: int) -> list[int]:
        return [k - 1 for k in self.stages(num_layers)]

    # -- what ------------------------------------------------------------------------------------
    def score(self, ctx) -> torch.Tensor:
        """(b, n_max): de-RoPE last-token attention of layer ``ctx.layer_idx - 1``, softmax over the
        visual keys, heads averaged, at the current visual tokens (-inf padding)."""
        return ctx.gather_visual(ctx.last_token_attention(layer=ctx.layer_idx - 1, rope=False,
                                                          softmax_over="visual"))

    def grid_candidates(self, ctx, b: int) -> torch.Tensor:
        """Indices (into sample b's current visual tokens) on the stride grid of their frame."""
        vt = ctx.visual_tokens(b)
        on = (vt.row % self.grid_stride == 0) & (vt.col % self.grid_stride == 0)
        return on.nonzero().flatten()

    def select(self, ctx) -> Selection:
        scores = self.score(ctx)
        counts = ctx.visual_counts
        keep, grids = [], []
        if self.schedule == "official" and ctx.layer_idx != self.layers[0]:
            ks = [int(OFFICIAL_STAGE2 * n) for n in counts]  # stage 2: no grid
            ks = [max(1, k) for k in ks]
            return Selection.top_k(scores, ks)
        for b, n in enumerate(counts):
            s = scores[b, :n]
            cand = self.grid_candidates(ctx, b)
            if self.schedule == "official":
                top = torch.topk(s, min(n, budget(ctx.n_visual, OFFICIAL_TOP))).indices
                kept = torch.unique(torch.cat([top, cand]))
                grid = cand
            else:
                k = ctx.budget(self.retention)[b]
                vt = ctx.visual_tokens(b)
                grid = cand[spatial_subgrid(vt.frame[cand], vt.row[cand], vt.col[cand], int(self.grid_share * k))]
                rest = s.clone()
                rest[grid] = float("-inf")
                top = torch.topk(rest, k - len(grid)).indices
                kept = torch.cat([grid, top])
            keep.append(kept)
            grids.append(ctx.current_visual_index(b)[grid])
        ctx.trace.grid = grids  # [sample] -> ORIGINAL indices of the grid tokens kept
        return Selection(keep)

    # -- FLOPs -----------------------------------------------------------------------------------
    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """Paper mode: N_vis before ``layer``, budget(N_vis, R) from it on (exact). Official mode: the
        UPPER bound of the video-dependent counts (top 30% and grid disjoint): n1 = min(N, round(0.3 N)
        + |G|) from layers[0], then int(0.09 n1); |G| from the backbone's paper frame grid (14 x 14 for
        LLaVA-OV, 12 x 15 for Qwen2-VL; 14 x 14 for an unknown backbone)."""
        ks = self.stages(num_layers)
        if self.schedule == "paper":
            kept = budget(n_visual, self.retention)
            return [n_visual if layer < ks[0] else kept for layer in range(num_layers)]
        name = backbone if isinstance(backbone, str) or backbone is None else backbone.name
        g = grid_count(n_visual, _FRAME_GRID.get(name, (14, 14)), self.grid_stride)
        n1 = min(n_visual, budget(n_visual, OFFICIAL_TOP) + g)
        n2 = max(1, int(OFFICIAL_STAGE2 * n1))
        return [n_visual if layer < ks[0] else n1 if layer < ks[1] else n2 for layer in range(num_layers)]
