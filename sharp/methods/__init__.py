"""Every pruning method, one module each, and the registry that names them.

The contract a method implements (``PruningMethod``, ``Selection``, ``budget``) is the engine's:
:mod:`sharp.engine.method`. Here: ``scorer`` (a score becomes a top-k), ``registry`` (the one list
of built-in methods, ``make_method``, composition by name), ``settings`` (a method's settings on a
backbone), ``vanilla``; ShaRP: ``sharp`` (the method), ``segm`` (Sec. 4.1), ``posc`` (Sec. 4.2),
``regd`` (Sec. 4.3); ``sharpv``; the baselines ``fastv``, ``pdrop``, ``feather``, ``framefusion``,
``visionzip`` (and ``visionzip_sharp``), ``holitom`` (and ``holitom_sharp``).
"""
from sharp.engine.method import PruningMethod, Selection, budget, check_retention
from sharp.methods.registry import (BUILTIN_METHODS, get_method_class, is_composed_name, make_method, method_names,
                                    register_method)
from sharp.methods.scorer import ScorerMethod

__all__ = ["BUILTIN_METHODS", "PruningMethod", "ScorerMethod", "Selection", "budget", "check_retention",
           "get_method_class", "is_composed_name", "make_method", "method_names", "register_method"]
