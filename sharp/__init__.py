"""sharp: visual-token pruning for video LLMs (ShaRP, SharpV and baselines) on unmodified HF models.

The method API (what a method file imports; ``baselines/`` and outside packages use nothing else):
``PruningMethod``, ``ScorerMethod``, ``Selection``, ``budget``, ``split_budget``, ``layer_kwarg``,
``LayerRule``, ``BackboneFacts`` (for ``backbone_settings`` and ``token_schedule``), and the contexts a
method is handed (:class:`~sharp.engine.context.StageContext`, :class:`~sharp.engine.context.SessionContext`).
"""
from sharp.backbones import Backbone, VisualLayout, backbone_names, load_backbone
from sharp.api import prune
from sharp.engine import ComposedMethod, PruningSession, StageContext, Trace, compose
from sharp.engine.method import LayerRule, budget, layer_kwarg, split_budget
from sharp.methods import (PruningMethod, ScorerMethod, Selection, get_method_class, make_method, method_names,
                           register_method)
from sharp.methods.settings import BackboneFacts, Resolved, resolve_method
from sharp import flops

__all__ = [
    "Backbone", "ComposedMethod", "VisualLayout", "backbone_names", "load_backbone", "PruningSession",
    "StageContext", "Trace", "compose", "prune", "PruningMethod", "ScorerMethod", "Selection", "get_method_class",
    "make_method", "method_names", "register_method", "flops", "BackboneFacts", "Resolved", "resolve_method",
    "LayerRule", "budget", "layer_kwarg", "split_budget",
]
