"""PyramidDrop (Xing et al., CVPR'25; official code Cooperx521/PyramidDrop, ``modeling_llama_pdrop.py``).

Drop visual tokens in stages, before decoder layers ``layers = (k_1, k_2, ...)``. Stage i keeps the
top ``round(ratio_i x N_vis)`` current visual tokens (a share of the ORIGINAL count; a stage never
keeps more than it receives) ranked by the attention the LAST token pays them in layer k_i's map:

    score_j = mean_h softmax_row( q_last^h  K^h^T / sqrt(d_h) + causal )_j        (one query row)

with q, K from layer k_i's INPUT through its input_layernorm, q_proj / k_proj and RoPE at the
current positions, the softmax over the whole causal row (text and visual keys), grouped-query heads
repeated to the query heads (the official code has no ``repeat_kv``), then the visual keys' slice
(``ctx.last_token_attention()`` on the stage layer, then ``ctx.gather_visual``). The official code
drops "after layer 8, 16, 24" = before 0-based layers 8, 16, 24: layers 0..7 see every token and the
ranking layer is the layer that then runs on the pruned sequence, as here.

Schedules (``schedule``; ``ratios`` and ``layers`` None = the schedule's own):
- ``"paper"`` (default): the ShaRP paper's FLOPs-matched runs ("PDrop starts from the 4th decoder
  layer"): layers (4, 16, 24), ratio_i = R^(i+1) with R = ``retention`` (R, R^2, R^3 of the
  original). R = 1 is the identity.
- ``"official"``: the official code's layers (8, 16, 24) and ratios lambda^(i+1) with lambda = 0.5
  ((0.5, 0.25, 0.125)); ``retention`` is then not used.
Explicit ``layers`` / ``ratios`` replace the schedule's own (``ratios`` must have one entry per
layer; with ``schedule="paper"`` and explicit ``layers`` the ratios are R^(i+1) for those layers).

Positions: ``positions="compact"`` by default, as the official code: after each stage the kept
tokens are re-numbered 0..len-1 and decode positions shift back by the tokens dropped. Qwen2-VL
(M-RoPE) has no 1-D re-numbering: the engine refuses compact there; pass ``positions="original"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from sharp import ScorerMethod, budget, layer_kwarg

SCHEDULES = ("paper", "official")
_DEFAULT_LAYERS = {"paper": (4, 16, 24), "official": (8, 16, 24)}
OFFICIAL_LAMBDA = 0.5  # official ratios 0.5, 0.25, 0.125


@dataclass
class PyramidDrop(ScorerMethod):
    name = "pdrop"
    official_positions = "compact"  # the official code re-numbers the kept tokens (auto: on 1-D RoPE)
    # decoder layers before which a stage runs (None: the schedule's own, paper (4, 16, 24) / official (8, 16, 24))
    layers: Optional[Union[list, tuple]] = layer_kwarg(None, scaling="relative", value_of="stage_layers")
    schedule: str = "paper"  # "paper": ratios R, R^2, R^3 | "official": 0.5, 0.25, 0.125
    # kept share of the ORIGINAL visual count after each stage (None: the schedule's own)
    ratios: Optional[Union[list, tuple]] = None

    def __post_init__(self):
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"pdrop: schedule must be one of {', '.join(map(repr, SCHEDULES))}, "
                             f"got {self.schedule!r}")
        layers = self.stage_layers
        if not layers or any(not isinstance(k, int) or isinstance(k, bool) for k in layers):
            raise TypeError(f"pdrop: layers must be a non-empty list of ints, got {self.layers!r}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"pdrop: layers must be strictly increasing, got {list(layers)}")
        if self.ratios is not None:
            r = list(self.ratios)
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in r):
                raise TypeError(f"pdrop: ratios must be a list of numbers, got {self.ratios!r}")
            if len(r) != len(layers):
                raise ValueError(f"pdrop: ratios must have one entry per stage layer ({len(layers)} layers "
                                 f"{list(layers)}), got {len(r)}: {r}")
            if any(not 0.0 < x <= 1.0 for x in r):
                raise ValueError(f"pdrop: ratios must be in (0, 1] (kept shares of the original visual "
                                 f"tokens), got {r}")
            if any(b > a for a, b in zip(r, r[1:])):
                raise ValueError(f"pdrop: ratios must be non-increasing (a stage cannot add tokens), got {r}")

    # -- the schedule ------------------------------------------------------------------------
    @property
    def stage_layers(self) -> tuple[int, ...]:
        """The stage layers in use (explicit ``layers`` or the schedule's own)."""
        return tuple(self.layers) if self.layers is not None else _DEFAULT_LAYERS[self.schedule]

    @property
    def stage_ratios(self) -> tuple[float, ...]:
        """Kept share of the ORIGINAL visual tokens after each stage."""
        if self.ratios is not None:
            return tuple(float(x) for x in self.ratios)
        base = self.retention if self.schedule == "paper" else OFFICIAL_LAMBDA
        return tuple(base ** (i + 1) for i in range(len(self.stage_layers)))

    def stages(self, num_layers: int) -> list[int]:
        layers = list(self.stage_layers)
        bad = [k for k in layers if not 1 <= k < num_layers]
        if bad:
            raise ValueError(f"pdrop: every stage layer must be in 1..{num_layers - 1} (a stage ranks with its "
                             f"own layer's input; layer 0 would rank the embeddings), got layers {layers}")
        return layers

    def stage_retention(self, layer: int) -> float:
        return self.stage_ratios[self.stage_layers.index(layer)]

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """N_vis before the first stage, then each stage's budget(N_vis, ratio_i), never increasing."""
        kept = dict(zip(self.stages(num_layers), self.stage_ratios))
        out, current = [], n_visual
        for layer in range(num_layers):
            if layer in kept:
                current = min(current, budget(n_visual, kept[layer]))
            out.append(current)
        return out

    # -- the score ---------------------------------------------------------------------------
    def score(self, ctx):
        """(b, n_max): last token's attention (mean over heads) in the stage layer's own map."""
        return ctx.gather_visual(ctx.last_token_attention())
