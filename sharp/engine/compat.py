"""What the engine needs to run inside unmodified transformers 4.57.x and 5.x models.

Every difference is detected from the installed code (a signature, an attribute), never from a
version string, and each helper returns what the engine expects on both lines:

==========================  ===============================  ====================================
what                        4.57.x                           5.x
==========================  ===============================  ====================================
KV cache keyword / output   ``past_key_values``              ``cache``
``create_causal_mask``      ``input_embeds``,                ``inputs_embeds``, ``cache``,
                            ``cache_position``,              ``layer_idx`` (query offset from
                            ``past_key_values``              ``cache.get_query_offset``)
decoder layer kwargs        ``cache_position`` passed        no ``cache_position``
Qwen2-VL ``(cos, sin)``     (3, b, s, d), merged by          (b, s, d), sections already merged:
(Qwen2.5-VL too)            ``apply_multimodal_rotary...``   plain ``apply_rotary_pos_emb``
==========================  ===============================  ====================================

Helpers: :func:`cache_of`, :func:`output_cache`, :func:`without_cache`; :func:`causal_mask`;
:func:`set_cache_position`, :func:`step_positions`; :func:`rope_function`.

What the backbones need (generate's pre-encoding of pixels and 4.57's M-RoPE positions via
``adapt_model``, token types, the Qwen2.5-VL window index, the SigLIP module path and weight names)
is :mod:`sharp.backbones.compat`; helpers only the tests use are in ``tests/compat_helpers.py``.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Optional

import torch
from transformers.masking_utils import create_causal_mask

_MASK_PARAMS = inspect.signature(create_causal_mask).parameters
# 4.57: create_causal_mask(config, input_embeds, attention_mask, cache_position, past_key_values, ...)
MASK_TAKES_CACHE_POSITION = "cache_position" in _MASK_PARAMS

CACHE_KWARGS = ("past_key_values", "cache")  # the KV cache keyword of model and layer calls (4.57, 5.x)


def cache_of(kwargs: dict) -> Any:
    """The KV cache passed to a model or decoder-layer call (None if there is none)."""
    for key in CACHE_KWARGS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def output_cache(output) -> Any:
    """The KV cache of a model or generate output (``past_key_values`` on 4.57, ``cache`` on 5.x: read
    first, since reading 5.x's deprecated ``past_key_values`` alias prints a warning)."""
    for key in reversed(CACHE_KWARGS):
        got = getattr(output, key, None)
        if got is not None:
            return got
    return None


def without_cache(kwargs: dict, *extra: str) -> dict:
    """``kwargs`` less the cache keyword(s) (and ``extra`` keys)."""
    drop = set(CACHE_KWARGS) | set(extra)
    return {k: v for k, v in kwargs.items() if k not in drop}


class _PastLength:
    """Stands in for a cache in ``create_causal_mask``: one layer's cache of ``past`` entries."""

    is_compileable = False

    def __init__(self, past: int):
        self.past = past

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        q = query if isinstance(query, int) else query.shape[0]  # 5.x: query length; 4.57: cache_position
        return self.past + q, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.past

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past


def causal_mask(config, hidden: torch.Tensor, attention_mask_2d: Optional[torch.Tensor], past: int = 0):
    """transformers' own causal + padding mask, in the format of ``config._attn_implementation``, for
    the queries ``hidden`` (b, q, d) after ``past`` cached keys; ``attention_mask_2d`` (b, past + q)."""
    q = hidden.shape[1]
    cache = _PastLength(past) if past else None
    if MASK_TAKES_CACHE_POSITION:
        return create_causal_mask(config=config, input_embeds=hidden, attention_mask=attention_mask_2d,
                                  cache_position=torch.arange(past, past + q, device=hidden.device),
                                  past_key_values=cache, position_ids=None)
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask_2d, cache=cache,
                              position_ids=None, layer_idx=0)


_LAYER_TAKES_CACHE_POSITION: dict[type, bool] = {}


def set_cache_position(layer: torch.nn.Module, kwargs: dict, cache_position: torch.Tensor) -> dict:
    """Put ``cache_position`` into a decoder layer's kwargs where the layer takes one (4.57)."""
    cls = type(layer)
    if cls not in _LAYER_TAKES_CACHE_POSITION:
        _LAYER_TAKES_CACHE_POSITION[cls] = "cache_position" in inspect.signature(cls.forward).parameters
    if _LAYER_TAKES_CACHE_POSITION[cls]:
        kwargs["cache_position"] = cache_position
    else:
        kwargs.pop("cache_position", None)
    return kwargs


def step_positions(kwargs: dict, hidden: torch.Tensor) -> torch.Tensor:
    """(b, q) 1-D positions of a decode step's queries as the layer call states them."""
    pos = kwargs.get("position_ids")
    if pos is not None:
        return pos if pos.dim() == 2 else pos[0]
    cache_position = kwargs.get("cache_position")
    if cache_position is None:  # the unpruned frame: layer 0's cache length
        past = cache_of(kwargs).get_seq_length()
        cache_position = torch.arange(past, past + hidden.shape[1], device=hidden.device)
    return cache_position[None].expand(hidden.shape[0], -1)


def rope_function(attn: torch.nn.Module) -> Callable:
    """The attention module's own RoPE, as f(x (b, h, n, d), cos, sin) -> x, for the ``(cos, sin)``
    its decoder layer receives (4.57 Qwen2-VL: per-section angles merged by
    ``apply_multimodal_rotary_pos_emb``; 5.x: already merged)."""
    module = sys.modules[type(attn).__module__]
    # the model's function rotates a query and a key tensor: x is the query, and its first head stands
    # in for the key (the rotation is per head: the same values as rotating x twice, an eighth of the work)
    if hasattr(module, "apply_multimodal_rotary_pos_emb"):
        section = attn.rope_scaling["mrope_section"]
        return lambda x, cos, sin: module.apply_multimodal_rotary_pos_emb(x, x[:, :1], cos, sin, section)[0]
    return lambda x, cos, sin: module.apply_rotary_pos_emb(x, x[:, :1], cos, sin)[0]
