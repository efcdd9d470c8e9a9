"""FastV (Chen et al., ECCV'24; official code pkunlp-icler/FastV).

Prune once, before decoder layer K (default 2): score each visual token by the attention the LAST
token pays it in the attention map produced by layer K-1 (mean over heads), keep the top
round(retention x N_vis). Kept tokens keep their original positions.
"""
from dataclasses import dataclass

from sharp import ScorerMethod, layer_kwarg


@dataclass
class FastV(ScorerMethod):
    name = "fastv"
    layer: int = layer_kwarg(2, scaling="fixed")  # K: the first layer that sees the pruned sequence (FastV's K = 2)

    def stages(self, num_layers: int) -> list[int]:
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"fastv: layer must be in 1..{num_layers - 1} (it scores with layer K-1), got {self.layer}")
        return [self.layer]

    def score_layers(self, num_layers: int) -> list[int]:
        return [self.layer - 1]

    def score(self, ctx):
        return ctx.gather_visual(ctx.last_token_attention(layer=self.layer - 1))  # last row of layer K-1's map
