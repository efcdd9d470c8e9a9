"""Spatial average pooling, a control: each frame's token grid pooled to about ``retention`` of its
tokens before the LLM.

Per frame (LLaVA-OV: the 14 x 14 grid of pooled SigLIP features; Qwen-family backbones: the grid of
one temporal patch's MERGED tokens, each already the 2 x 2 patch merge of the vision tower, so a
2 x 2 pool there averages 4 x 4 patches), with the grid (H, W):

    H' = clamp(round(H sqrt(R)), 1, H),   W' = clamp(round(R H W / H'), 1, W)     (round half up)
    bin(r, c) = (floor(r H' / H), floor(c W' / W))                    a partition of the grid
    x'_bin = mean_{(r, c) in bin} x_{r, c}                             (pooled in float32)

so R = 0.25 on 14 x 14 gives 7 x 7 = 49, exactly ``F.avg_pool2d(kernel_size=2)`` (and any R whose
H' divides H, W' divides W is ``avg_pool2d`` with kernel H / H'); where they do not divide, bins are
floor/ceil sized and disjoint (``adaptive_avg_pool2d``'s bins overlap instead). The kept share is
H' W' / (H W), close to R but not equal (14 x 14 at R = 0.1: 4 x 5 = 10.2%; 7 x 7 at 0.25: 4 x 3 =
24.5%), so the schedule is measured (it depends on the grid).

Each bin's row replaces that of its first token (raster order), which stays in the sequence; the
others leave. Positions: renumbered on 1-D RoPE (a pooled model sees a smaller grid; the trailing
newline follows), the first token's original M-RoPE ids on Qwen. Frames missing tokens (after another
stage) pool what they still hold. There is no official code (the field's controls: LightCompress has
none, VidCom2's unmerged PR #9 pools inside Qwen3-VL's ViT); docs/methods/pooling.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sharp import PruningMethod, Selection


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def pooled_grid(grid: tuple[int, int], retention: float) -> tuple[int, int]:
    """(H', W') of a pooled (H, W) grid: H' the height scaled by sqrt(R), then W' the width that brings
    H' W' nearest R H W (each within 1..side)."""
    h, w = grid
    ph = min(h, max(1, round_half_up(h * math.sqrt(retention))))
    pw = min(w, max(1, round_half_up(retention * h * w / ph)))
    return ph, pw


def bin_of_tokens(frame: torch.Tensor, row: torch.Tensor, col: torch.Tensor, grid: tuple[int, int],
                  pooled: tuple[int, int]) -> torch.Tensor:
    """(n,) bin id of each token (frame-major, raster inside a frame): bin(r, c) = (r H'/H, c W'/W)."""
    (h, w), (ph, pw) = grid, pooled
    return (frame * ph + row * ph // h) * pw + col * pw // w


def pool_bins(x: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the rows of x (n, D) per bin: (first token of each non-empty bin (m,), means (m, D)
    float32), bins in ascending order."""
    ids, inverse = torch.unique(bins, return_inverse=True)
    sums = x.new_zeros(len(ids), x.shape[1], dtype=torch.float32).index_add_(0, inverse, x.float())
    counts = torch.bincount(inverse, minlength=len(ids)).to(torch.float32)[:, None]
    order = torch.arange(len(bins), device=bins.device)
    first = torch.full((len(ids),), len(bins), device=bins.device).scatter_reduce_(0, inverse, order, "amin")
    return first, sums / counts


@dataclass
class Pooling(PruningMethod):
    """Per-frame spatial average pooling to about R of the tokens, before the LLM."""

    name = "pooling"
    input_dependent_schedule: ClassVar[bool] = True  # the kept share is H'W'/(HW) of the backbone's grid
    official_positions = "compact"  # a pooled model numbers its smaller grid 0..n-1

    def stages(self, num_layers: int) -> list[int]:
        return [0]  # before the LLM: on the input embeddings

    def select(self, ctx) -> Selection:
        if self.retention >= 1.0:
            return Selection.unchanged()
        grid = tuple(ctx.layout.grid)
        pooled = pooled_grid(grid, self.retention)
        hidden = ctx.hidden_states.clone()  # (b, s, D): each bin's mean is written at its first token
        keep = []
        for b in range(ctx.batch_size):
            tokens = ctx.visual_tokens(b)
            bins = bin_of_tokens(tokens.frame, tokens.row, tokens.col, grid, pooled)
            first, means = pool_bins(ctx.hidden_states[b, tokens.positions], bins)
            hidden[b, tokens.positions[first]] = means.to(hidden.dtype)
            keep.append(first)
        ctx.trace.grid, ctx.trace.pooled_grid = grid, pooled
        ctx.trace.kept = [ctx.visual_tokens(b).index[k].cpu() for b, k in enumerate(keep)]
        return Selection(keep, hidden_states=hidden)
