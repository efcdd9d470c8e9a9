"""The current prefill sequence as the decoder layers from some layer on see it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch


def gather_seq(x: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Rows of ``x`` along ``seq_dim`` at per-sample ``index`` (b, s'); x's batch dim is seq_dim - 1
    (size b, or 1: shared by every sample). Advanced indexing (the same values as ``torch.gather`` over
    an expanded index, about twice as fast on a CPU)."""
    batch_dim = seq_dim - 1 if seq_dim > 0 else x.dim() + seq_dim - 1
    b = index.shape[0]
    if x.shape[batch_dim] == b:
        rows = torch.arange(b, device=index.device)
    elif x.shape[batch_dim] == 1:
        rows = torch.zeros(b, dtype=torch.long, device=index.device)
    else:
        raise ValueError(f"gather_seq: batch dim {batch_dim} of x has size {x.shape[batch_dim]}, index has {b} rows")
    # two adjacent advanced indices: the result keeps x's dim order, (..., b, s', ...)
    return x[(slice(None),) * batch_dim + (rows.view(b, 1), index)]


@dataclass(frozen=True)
class SeqState:
    """One version of the prefill sequence; a stage makes a new one (recorded layer inputs keep theirs).

    attention_mask_2d: (b, s) long padding mask; visual_mask: (b, s) bool; visual_index: (b, s)
    long ORIGINAL visual index or -1; origin: (b, s) long position in the unpruned input sequence
    (-1 for rows the engine padded in); position_embeddings: (cos, sin) with the seq dim at -2;
    mask: the layer attention mask for this sequence in the model's format (None until pruned);
    cache_position: (s,); pruned: the sequence differs from the model's own.
    """

    attention_mask_2d: torch.Tensor
    visual_mask: torch.Tensor
    visual_index: torch.Tensor
    origin: torch.Tensor
    position_embeddings: Optional[tuple] = None
    mask: Any = None
    cache_position: Optional[torch.Tensor] = None
    pruned: bool = False

    @classmethod
    def initial(cls, attention_mask_2d: torch.Tensor, visual_mask: torch.Tensor) -> "SeqState":
        vidx = torch.where(visual_mask, visual_mask.long().cumsum(1) - 1, torch.full_like(attention_mask_2d, -1))
        origin = torch.arange(visual_mask.shape[1], device=visual_mask.device).expand_as(vidx)
        return cls(attention_mask_2d=attention_mask_2d.long(), visual_mask=visual_mask, visual_index=vidx,
                   origin=origin)

    def with_rope(self, position_embeddings) -> "SeqState":
        return replace(self, position_embeddings=position_embeddings)

    def visual_positions(self, b: int) -> torch.Tensor:
        """(n_b,) sequence positions of sample b's current visual tokens, in order."""
        return self.visual_mask[b].nonzero().squeeze(1)

    def keep_index(self, keep_visual: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows kept when sample b keeps its current visual tokens ``keep_visual[b]`` and all text.

        Returns (index (b, s') into this sequence, pad (b, s') bool): shorter samples are left-padded
        with index 0 rows that the padding mask hides.
        """
        b, s = self.visual_mask.shape
        rows = []
        for i in range(b):
            vis_pos = self.visual_positions(i)
            keep = ~self.visual_mask[i]  # text (and padding) rows stay
            keep[vis_pos[torch.as_tensor(keep_visual[i], device=keep.device).long()]] = True
            rows.append(keep.nonzero().squeeze(1))
        s_new = max(len(r) for r in rows)
        index = torch.stack([torch.cat([r.new_zeros(s_new - len(r)), r]) for r in rows])  # (b, s')
        pad = torch.stack([torch.arange(s_new, device=index.device) < (s_new - len(r)) for r in rows])
        return index, pad

    def gathered(self, index: torch.Tensor, pad: torch.Tensor) -> "SeqState":
        """The sequence of rows ``index`` (mask and RoPE still to be set by the engine)."""
        cos, sin = self.position_embeddings
        return SeqState(
            attention_mask_2d=torch.gather(self.attention_mask_2d, 1, index).masked_fill(pad, 0),
            visual_mask=torch.gather(self.visual_mask, 1, index) & ~pad,
            visual_index=torch.gather(self.visual_index, 1, index).masked_fill(pad, -1),
            origin=torch.gather(self.origin, 1, index).masked_fill(pad, -1),
            position_embeddings=(gather_seq(cos, index, -2), gather_seq(sin, index, -2)),
            cache_position=torch.arange(index.shape[1], device=index.device),
            pruned=True,
        )

    def map_from(self, other: "SeqState", values: torch.Tensor, n_original: int, fill: float = 0.0) -> torch.Tensor:
        """Per-position ``values`` (b, s_other) of ``other`` read at this sequence's rows (b, s).

        Rows are matched by their position in the unpruned input (``origin``); a row of this sequence
        absent from ``other`` (or padding) reads ``fill``.
        """
        if other is self:
            return values
        b = values.shape[0]
        table = values.new_full((b, n_original + 1), fill)  # last column: padding rows
        src = other.origin.masked_fill(other.origin < 0, n_original)
        table.scatter_(1, src, values)
        table[:, n_original] = fill
        dst = self.origin.masked_fill(self.origin < 0, n_original)
        return torch.gather(table, 1, dst)
