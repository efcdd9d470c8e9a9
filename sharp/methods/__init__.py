"""ShaRP's own components and the method registry (the other methods are the ``baselines`` package).

The contract a method implements (``PruningMethod``, ``Selection``, ``budget``, ``split_budget``,
``layer_kwarg``) is the engine's, :mod:`sharp.engine.method`, exported by :mod:`sharp`. Here:
``scorer`` (a score becomes a top-k), ``registry`` (names from the ``sharp.methods`` entry points and the
declared compositions, ``make_method``), ``settings`` (a method's settings on a backbone), ``vanilla``;
ShaRP: ``sharp`` (the method), ``segm`` (Sec. 4.1), ``posc`` (Sec. 4.2), ``regd`` (Sec. 4.3).
"""
from sharp.engine.method import PruningMethod, Selection, budget, check_retention, split_budget
from sharp.methods.registry import (get_method_class, is_composed_name, make_method, method_names, method_parts,
                                    register_method)
from sharp.methods.scorer import ScorerMethod

__all__ = ["PruningMethod", "ScorerMethod", "Selection", "budget", "check_retention", "get_method_class",
           "is_composed_name", "make_method", "method_names", "method_parts", "register_method", "split_budget"]
