"""Pruning-method interface and registry.

A method is a small dataclass (in the spirit of NVIDIA/kvpress presses): it says *where* it
acts (``stages``), *what* it keeps at each stage (``select``) and, for the FLOPs counter, how many
visual tokens each decoder layer processes (``token_schedule``). All plumbing (hooks, KV cache,
masks, RoPE positions) lives once in :mod:`sharp.engine`.

Stage semantics: a stage at layer ``k`` runs *before* decoder layer ``k`` in prefill; layers
``< k`` see the sequence as it was, layers ``>= k`` see the selected tokens. A stage at layer 0
acts on the input embeddings, i.e. "before the LLM" (VisionZip, HoliTom, SharpV).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from sharp.engine import PruningSession, StageContext

_REGISTRY: dict[str, type["PruningMethod"]] = {}


def register_method(cls: type["PruningMethod"]) -> type["PruningMethod"]:
    """Class decorator: make ``cls`` available as ``sharp.prune(..., method=cls.name)``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} must define a class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def _import_builtin_methods() -> None:
    # Importing the modules registers their classes; kept lazy so that `import sharp` stays cheap.
    import importlib

    for module in ("sharp.vanilla", "baselines.fastv", "sharp.sharp_method"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a method module not written yet
            if err.name != module:
                raise
    try:
        import baselines  # noqa: F401  (its __init__ imports every baseline module)
    except ModuleNotFoundError as err:
        if err.name != "baselines":
            raise


def method_names() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type["PruningMethod"]:
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def check_retention(retention: float) -> float:
    try:
        value = float(retention)
    except (TypeError, ValueError):
        raise ValueError(f"retention must be a number in (0, 1], got {retention!r}") from None
    if not (0.0 < value <= 1.0):
        raise ValueError(f"retention must be in (0, 1] (the kept share of visual tokens), got {retention!r}")
    return value


def make_method(name: str, retention: float = 1.0, **kwargs) -> "PruningMethod":
    """Instantiate a registered method; unknown kwargs raise a clear error naming the valid ones."""
    cls = get_method_class(name)
    retention = check_retention(retention)
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"method {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"valid arguments: {', '.join(sorted(valid - {'retention'}))}"
        )
    return cls(retention=retention, **kwargs)


def budget(n_visual: int, retention: float) -> int:
    """Number of visual tokens kept: round(retention x N_vis), at least 1."""
    return max(1, min(n_visual, int(round(retention * n_visual))))


@dataclass
class Selection:
    """What a stage keeps, per sample.

    keep_visual: per sample, indices into the *current* visual tokens of that sample
        (0 .. n_visual_current-1) that survive the stage; order does not matter (the engine
        keeps tokens in sequence order).
    hidden_states: optional replacement for the stage's input hidden states (b, s, d), e.g. kept
        tokens that absorbed dropped ones. Only rows of kept tokens matter.
    """

    keep_visual: list[torch.Tensor]
    hidden_states: Optional[torch.Tensor] = None


@dataclass
class PruningMethod:
    """Base class. Subclasses are dataclasses with a class attribute ``name``."""

    name: ClassVar[str] = ""
    retention: float = 1.0

    # -- where the method acts -------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        """Decoder-layer indices before which a selection stage runs (sorted)."""
        return []

    def score_layers(self, num_layers: int) -> list[int]:
        """Layers whose prefill *inputs* the engine must keep for ``select`` (e.g. FastV: K-1)."""
        return []

    # -- what it keeps ---------------------------------------------------------------------
    def select(self, ctx: "StageContext") -> Selection:
        raise NotImplementedError

    # -- optional extras -------------------------------------------------------------------
    def install(self, session: "PruningSession") -> None:
        """Register extra hooks (vision tower, probes) on entering ``sharp.prune``."""

    def attention_mask(self, session: "PruningSession", layer_idx: int) -> Optional[torch.Tensor]:
        """Custom prefill mask for one layer: bool (b, 1, q, kv), True = may attend, or None."""
        return None

    def after_prefill(self, session: "PruningSession") -> None:
        """Called once the prefill forward has finished (e.g. to drop KV-cache entries)."""

    # -- FLOPs -----------------------------------------------------------------------------
    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """Visual tokens processed by each decoder layer in prefill (for sharp.flops).

        ``backbone`` (a name or Backbone) is given for methods whose schedule depends on the model
        sizes (e.g. FLOPs-matched retentions). Default: one stage at ``stages()[0]`` keeping ``budget(n_visual, retention)``; multi-stage
        methods override this.
        """
        stages = self.stages(num_layers)
        if not stages:
            return [n_visual] * num_layers
        k, kept = stages[0], budget(n_visual, self.retention)
        return [n_visual if layer < k else kept for layer in range(num_layers)]
