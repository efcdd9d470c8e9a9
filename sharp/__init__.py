"""sharp: visual-token pruning for video LLMs (ShaRP, SharpV and baselines) on unmodified HF models."""
from sharp.backbones import Backbone, VisualLayout, backbone_names, load_backbone
from sharp.engine import PruningSession, StageContext, Trace, prune
from sharp.methods import PruningMethod, Selection, get_method_class, make_method, method_names, register_method
from sharp import flops

__all__ = [
    "Backbone", "VisualLayout", "backbone_names", "load_backbone", "PruningSession", "StageContext", "Trace",
    "prune", "PruningMethod", "Selection", "get_method_class", "make_method", "method_names", "register_method",
    "flops",
]
