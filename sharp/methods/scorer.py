"""A base for methods whose stage keeps the top-k of a score (kvpress's ScorerPress, for tokens)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sharp.engine.method import PruningMethod, Selection


@dataclass
class ScorerMethod(PruningMethod):
    """Subclasses implement :meth:`score`; each stage keeps the top ``stage_retention`` x N_vis
    (ORIGINAL count, at most the current one) current visual tokens by that score."""

    def score(self, ctx) -> torch.Tensor:
        """(b, n_max) float: one score per current visual token, in sequence order; entries past a
        sample's count are -inf (``ctx.gather_visual`` builds this from per-position scores)."""
        raise NotImplementedError

    def stage_retention(self, layer: int) -> float:
        """The kept share of the ORIGINAL visual tokens after the stage at ``layer``."""
        return self.retention

    def select(self, ctx) -> Selection:
        return Selection.top_k(self.score(ctx), ctx.budget(self.stage_retention(ctx.layer_idx)))
