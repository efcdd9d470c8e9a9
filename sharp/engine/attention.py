"""Attention scores without the N x N matrix: the last query rows of one decoder layer."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from sharp.engine import compat

SCORE_SPACES = ("prob", "logit")
SCORE_REDUCTIONS = ("mean", "max")


def cuda_sync(device: torch.device) -> None:
    """Wait for the GPU so that a stage timer brackets the real work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def rope_apply(backbone, layer: int) -> Callable:
    """The attention module's own RoPE function, as f(x (b, h, n, d), cos, sin) -> x."""
    return compat.rope_function(backbone.layers[layer].self_attn)


def attention_of_last_tokens(backbone, layer: int, hidden: torch.Tensor, position_embeddings,
                             attention_mask_2d: Optional[torch.Tensor], queries: int = 1, rope: bool = True,
                             key_mask: Optional[torch.Tensor] = None, space: str = "prob",
                             causal: bool = True, reduce: str = "mean") -> torch.Tensor:
    """Head- and query-reduced attention of the last ``queries`` tokens of ``hidden`` in ``layer``.

    Recomputed from the layer's input (input_layernorm, q_proj on the last rows, k_proj on all rows,
    the layer's RoPE, grouped-query logits (b, KV, G, n, s) without repeating K).
    hidden: (b, s, d) input of the layer; returns (b, s) float32: softmax probabilities
    (``space="prob"``) or pre-softmax logits q k^T / sqrt(d_h) (``space="logit"``, masked keys 0).
    ``key_mask`` (b, s) restricts the keys (FEATHER's softmax over visual keys only).
    ``causal=False``: every query row sees every (unpadded) key, later rows included (PruneVid's
    official eager map, llama.py L446-449); ``reduce``: ``"mean"`` over heads and queries (default) or
    ``"max"`` over both (PruneVid's process_attention).
    """
    if space not in SCORE_SPACES:
        raise ValueError(f"space must be one of {', '.join(map(repr, SCORE_SPACES))}, got {space!r}")
    if reduce not in SCORE_REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(map(repr, SCORE_REDUCTIONS))}, got {reduce!r}")
    block = backbone.layers[layer]
    attn = block.self_attn
    b, s, _ = hidden.shape
    hd = attn.head_dim
    n_heads = attn.config.num_attention_heads
    n_kv = attn.config.num_key_value_heads
    x = block.input_layernorm(hidden)
    q = attn.q_proj(x[:, -queries:]).view(b, queries, n_heads, hd).transpose(1, 2)  # (b, H, n, hd)
    k = attn.k_proj(x).view(b, s, n_kv, hd).transpose(1, 2)  # (b, KV, s, hd)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-VL: RMSNorm per head before RoPE (head_dim last)
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope:
        cos, sin = position_embeddings
        apply = rope_apply(backbone, layer)
        q = apply(q, cos[..., -queries:, :], sin[..., -queries:, :])
        k = apply(k, cos, sin)
    groups = n_heads // n_kv
    q = q.float().view(b, n_kv, groups, queries, hd)
    logits = torch.einsum("bkgnd,bksd->bkgns", q, k.float()) * attn.scaling  # (b, KV, G, n, s)
    if causal:
        qpos = torch.arange(s - queries, s, device=hidden.device)
        allowed = torch.arange(s, device=hidden.device)[None, None, :] <= qpos[None, :, None]  # (1, n, s) causal
    else:
        allowed = torch.ones(1, queries, s, dtype=torch.bool, device=hidden.device)
    allowed = allowed.expand(b, queries, s)
    if attention_mask_2d is not None:
        allowed = allowed & attention_mask_2d.bool()[:, None, :]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
    if space == "logit":
        return _reduce(logits.masked_fill(~allowed[:, None, None], 0.0), reduce)
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return _reduce(probs, reduce)  # (b, s)


def _reduce(scores: torch.Tensor, reduce: str) -> torch.Tensor:
    """(b, KV, G, n, s) -> (b, s): mean or max over the heads (KV x G) and the query rows (n)."""
    if reduce == "max":
        return scores.amax(dim=(1, 2, 3))
    return scores.mean(dim=(1, 2, 3))


def attention_of_query_over_cache(backbone, layer: int, hidden: torch.Tensor, position_embeddings,
                                  keys: torch.Tensor, key_mask_2d: Optional[torch.Tensor]) -> torch.Tensor:
    """Head-averaged attention of a decode step's last query over layer ``layer``'s KV cache.

    hidden: (b, q, d) the layer's input in the step; position_embeddings: the (cos, sin) the layer ran
    with; keys: (b, KV, kv, hd) the layer's cache keys after the step (normed and RoPE'd as cached);
    key_mask_2d: (b, kv) the entries its attention could see (None: all). The query is recomputed as the
    layer does (input_layernorm, q_proj, q_norm, RoPE), without repeating K. Returns (b, kv) float32
    softmax probabilities (0 at masked entries).
    """
    block = backbone.layers[layer]
    attn = block.self_attn
    b = hidden.shape[0]
    hd = attn.head_dim
    n_heads = attn.config.num_attention_heads
    n_kv = keys.shape[1]
    q = attn.q_proj(block.input_layernorm(hidden[:, -1:])).view(b, 1, n_heads, hd).transpose(1, 2)  # (b, H, 1, hd)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-VL
        q = attn.q_norm(q)
    cos, sin = position_embeddings
    q = rope_apply(backbone, layer)(q, cos[..., -1:, :], sin[..., -1:, :])
    q = q.float().view(b, n_kv, n_heads // n_kv, hd)
    logits = torch.einsum("bkgd,bksd->bkgs", q, keys.float()) * attn.scaling  # (b, KV, G, kv)
    if key_mask_2d is not None:
        logits = logits.masked_fill(~key_mask_2d.bool()[:, None, None, :].to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=(1, 2))  # (b, kv)
