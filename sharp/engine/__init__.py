"""The pruning engine: hooks, KV cache, masks, positions and composition, once for every method.

Modules: ``session`` (hooks, stages, decode), ``context`` (what a method sees), ``sequence`` (the
current prefill sequence), ``attention`` (last-token scores without the N x N map), ``compose``
(methods in sequence), ``trace`` (what the last prefill did).
"""
from sharp.engine.attention import attention_of_last_tokens, cuda_sync, rope_apply
from sharp.engine.compose import ComposedMethod, compose
from sharp.engine.context import StageContext, VisualTokens
from sharp.engine.session import PruningSession, prune
from sharp.engine.trace import Trace

__all__ = ["ComposedMethod", "PruningSession", "StageContext", "Trace", "VisualTokens", "attention_of_last_tokens",
           "compose", "cuda_sync", "prune", "rope_apply"]
