"""The user-facing entry point: :func:`prune`, a method resolved for a backbone and hooked into it."""
from __future__ import annotations

import contextlib

from sharp.engine.method import PruningMethod
from sharp.engine.session import PruningSession
from sharp.methods.settings import resolve_method


@contextlib.contextmanager
def prune(backbone, method: str | PruningMethod = "vanilla", retention: float = 1.0, **method_kwargs):
    """Prune visual tokens of ``backbone.model`` inside the block; yields the :class:`~sharp.engine.Trace`.

    ``method`` is a registered name (``sharp.method_names()``), a ``+``-joined composition
    (``"visionzip+sharp"``) or a method instance (``sharp.compose(m1, m2)`` included), resolved for the
    backbone by :func:`sharp.methods.settings.resolve_method` (unset layers follow its depth, automatic
    positions; an instance's automatic settings are filled in a copy); ``retention``
    in (0, 1] is the kept share of the ORIGINAL visual tokens; ``method_kwargs`` override the method's
    defaults (e.g. ``layer=3``; for a composition, per child: ``sharp={"layer": 2, "retention": 0.1}``).
    Leaving the block (also by an exception) removes every hook.
    """
    if isinstance(method, PruningMethod) and method_kwargs:
        raise TypeError("pass method kwargs to the method instance, not to prune()")
    session = PruningSession(backbone, resolve_method(method, backbone, retention, **method_kwargs).method)
    try:
        session.install()
        yield session.trace
    finally:
        session.remove()
