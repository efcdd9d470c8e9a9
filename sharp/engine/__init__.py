"""The pruning engine: hooks, KV cache, masks, positions and composition, once for every method.

Modules: ``method`` (the contract a method implements: PruningMethod, Selection, budget, layer
kwargs), ``plan`` (which method acts where), ``prefill`` (stages, masks and probes in a prefill),
``decode`` (per-layer caches in decode, visual KV drops), ``session`` (the hooks that wire them to a
model, layer watchers), ``context`` (what a method sees: the only way in, with its named operations),
``masks`` (mask assembly, structured segment restrictions), ``compat`` (the engine's transformers shims), ``sequence`` (the current prefill sequence), ``attention``
(last-token scores without the N x N map), ``compose`` (methods in sequence), ``trace`` (what the
last prefill did). The engine imports nothing from :mod:`sharp.methods`; ``sharp.prune`` (resolve, then
hook) is in :mod:`sharp.api`.
"""
from sharp.engine.attention import attention_of_last_tokens, cuda_sync, rope_apply
from sharp.engine.compose import ComposedMethod, compose
from sharp.engine.context import LayerRows, SessionContext, StageContext, VisualTokens
from sharp.engine.method import PruningMethod, Selection, budget
from sharp.engine.session import PruningSession
from sharp.engine.trace import Trace

__all__ = ["ComposedMethod", "LayerRows", "PruningMethod", "PruningSession", "Selection", "SessionContext", "StageContext", "Trace",
           "VisualTokens", "attention_of_last_tokens", "budget", "compose", "cuda_sync", "rope_apply"]
