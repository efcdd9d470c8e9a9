"""Pruning methods: the base class, the scorer base, the registry and the built-in methods.

Modules: ``base`` (PruningMethod, Selection, budget), ``scorer`` (a score becomes a top-k),
``registry`` (names, make_method, composition by name), ``vanilla``, and ShaRP: ``sharp`` (the
method), ``segm`` (Sec. 4.1), ``posc`` (Sec. 4.2), ``regd`` (Sec. 4.3).
"""
from sharp.methods.base import PruningMethod, Selection, budget, check_retention
from sharp.methods.registry import (get_method_class, is_composed_name, make_method, method_names,
                                    register_method)
from sharp.methods.scorer import ScorerMethod

__all__ = ["PruningMethod", "ScorerMethod", "Selection", "budget", "check_retention", "get_method_class",
           "is_composed_name", "make_method", "method_names", "register_method"]

# last, once the names above exist: registers SharpV (it imports sharp.engine)
from sharp.methods import sharpv  # noqa: F401
