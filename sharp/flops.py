"""Prefill FLOPs of the video tokens for a method's token schedule.

``convention="paper"``: FastV's per-layer formula f(n) = 4 n d^2 + 2 n^2 d + 2 n d m (n visual tokens
in that layer, d hidden size, m FFN size), summed over the layers with the method's schedule
(what the ShaRP paper reports in Tables 1-4: e.g. LLaVA-OV vanilla 40.8 TFLOPs for 6272 tokens).

``convention="exact"``: multiply-adds x 2 of the real architecture for the same tokens: q/o
projections 2 n d^2 each, k/v projections 2 n d d_kv each (GQA), causal attention 2 x 2 x d x
n(n+1)/2 (QK^T and AV), SwiGLU MLP 3 matrices 6 n d m.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

CONVENTIONS = ("paper", "exact")


@dataclass(frozen=True)
class LMDims:
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int


# Visual tokens of the paper's 32-frame layouts (Table 1: 32 x 196; Table 2: 2880 for Qwen2-VL).
_DEFAULT_VISUAL_TOKENS = {"llava_onevision_7b": 6272, "qwen2_vl_7b": 2880,
                          # newer families (docs/backbones.md): LLaVA-Video 64 frames x 196 (the HF class's
                          # pooling); Qwen2.5-VL as Qwen2-VL (16 temporal patches x 12 x 15); Qwen3-VL 16
                          # temporal patches x 12 x 15 tokens (a 384 x 480 frame at patch 16, merge 2)
                          "llava_video_7b": 12544, "qwen2_5_vl_7b": 2880, "qwen3_vl_8b": 2880}


def lm_dims(backbone) -> LMDims:
    """Language-model sizes from a Backbone object or a backbone name (no model is built)."""
    if isinstance(backbone, str):
        from sharp.backbones import backbone_config_path

        tc = json.loads(backbone_config_path(backbone).read_text())["text_config"]
        return LMDims(tc["num_hidden_layers"], tc["hidden_size"], tc["intermediate_size"],
                      tc["num_attention_heads"], tc["num_key_value_heads"])
    tc = backbone.text_config
    return LMDims(tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size, tc.num_attention_heads,
                  tc.num_key_value_heads)


def default_visual_tokens(backbone) -> int:
    name = backbone if isinstance(backbone, str) else backbone.name
    if name in _DEFAULT_VISUAL_TOKENS:
        return _DEFAULT_VISUAL_TOKENS[name]
    raise ValueError(f"no default 32-frame visual-token count for backbone {name!r}: pass visual_tokens=")


def layer_flops(n: int, dims: LMDims, convention: str = "paper") -> float:
    """FLOPs of one decoder layer processing n tokens."""
    d, m = dims.hidden, dims.ffn
    if convention == "paper":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if convention == "exact":
        d_kv = d * dims.kv_heads // dims.heads
        proj = 2 * n * d * d * 2 + 2 * n * d * d_kv * 2  # q, o + k, v
        attn = 2 * 2 * d * n * (n + 1) / 2  # causal QK^T and AV
        mlp = 2 * 3 * n * d * m  # SwiGLU gate, up, down
        return proj + attn + mlp
    raise ValueError(f"unknown FLOPs convention {convention!r}; valid: {', '.join(CONVENTIONS)}")


def schedule_tflops(schedule: list[int], dims: LMDims, convention: str = "paper") -> float:
    return sum(layer_flops(n, dims, convention) for n in schedule) / 1e12


def token_schedule(backbone, method, retention: float, visual_tokens: int | None = None, **method_kwargs) -> list[int]:
    """Visual tokens per decoder layer in prefill for ``method`` at ``retention`` on ``backbone``, with
    the method's settings for that backbone (``sharp.resolve_method``: unset layers follow its depth)."""
    from sharp.methods.settings import resolve_method

    dims = lm_dims(backbone)
    n = visual_tokens if visual_tokens is not None else default_visual_tokens(backbone)
    m = resolve_method(method, backbone, retention, **method_kwargs).method
    return m.token_schedule(n, dims.num_layers, backbone=backbone)


def prefill_tflops(backbone, method="vanilla", retention: float = 1.0, visual_tokens: int | None = None,
                   convention: str = "paper", **method_kwargs) -> float:
    """Prefill TFLOPs of the video tokens for ``method`` at ``retention`` on ``backbone``.

    backbone: a name (e.g. "llava_onevision_7b") or a Backbone; visual_tokens defaults to the
    paper's 32-frame layout (6272 for LLaVA-OV, 2880 for Qwen2-VL).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    schedule = token_schedule(backbone, method, retention, visual_tokens, **method_kwargs)
    return schedule_tflops(schedule, lm_dims(backbone), convention)


def match_retention(backbone, method: str, target_method: str, target_retention: float,
                    visual_tokens: int | None = None, convention: str = "paper",
                    target_kwargs: dict | None = None, **method_kwargs) -> float:
    """Retention of ``method`` whose prefill TFLOPs match ``target_method`` at ``target_retention``.

    Searches the kept-token count n (retention n / N) minimising the TFLOPs difference, as the paper
    matches FLOPs across methods (Table 1: FastV 25% <-> ShaRP 28.2% on LLaVA-OV).
    """
    n_vis = visual_tokens if visual_tokens is not None else default_visual_tokens(backbone)
    goal = prefill_tflops(backbone, target_method, target_retention, n_vis, convention, **(target_kwargs or {}))

    def cost(k: int) -> float:
        return prefill_tflops(backbone, method, k / n_vis, n_vis, convention, **method_kwargs)

    lo, hi = 1, n_vis  # cost is non-decreasing in k: bisect on the first k with cost >= goal
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid) < goal:
            lo = mid + 1
        else:
            hi = mid
    best = min((k for k in (lo - 1, lo) if k >= 1), key=lambda k: abs(cost(k) - goal))
    return best / n_vis
