"""The method contract: what a pruning method is to the engine (in the spirit of NVIDIA/kvpress presses).

A method is a small dataclass: it says *where* it acts (``stages``), *what* it keeps at each stage
(``select``) and, for the FLOPs counter, how many visual tokens each decoder layer processes
(``token_schedule``). All plumbing (hooks, KV cache, masks, RoPE positions, composition) lives once
in :mod:`sharp.engine`.

Stage semantics: a stage at layer ``k`` runs *before* decoder layer ``k`` in prefill; layers
``< k`` see the sequence as it was, layers ``>= k`` see the selected tokens. A stage at layer 0
acts on the input embeddings, i.e. "before the LLM" (VisionZip, HoliTom, SharpV).

Budgets: every retention is a share of the ORIGINAL visual-token count N_vis of the input (the
paper's retentions are), whatever earlier stages or composed methods removed: :func:`budget` gives
round(retention x N_vis), and a stage never keeps more tokens than it receives
(``StageContext.budget`` clamps per sample).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from sharp.engine.context import DecodeContext, SessionContext, StageContext

POSITION_MODES = ("auto", "original", "compact")
REFERENCE_DEPTH = 28  # decoder layers of the paper's 7B backbones, where the methods' layer defaults are set
LAYER_SCALINGS = ("relative", "fixed")


@dataclass(frozen=True)
class LayerRule:
    """How a decoder-layer kwarg follows a backbone of another depth (:mod:`sharp.methods.settings`, step 2).

    scaling: "relative" | "fixed"; lowest: the smallest valid layer (1 for a stage that ranks with the
    layer before it); value_of: the attribute holding the value in use when the field is None and
    None means "the method's own" (PyramidDrop's ``stage_layers``); None values are otherwise kept."""

    scaling: str
    lowest: int = 1
    value_of: Optional[str] = None

    def __post_init__(self):
        if self.scaling not in LAYER_SCALINGS:
            raise ValueError(f"LayerRule: scaling must be one of {', '.join(LAYER_SCALINGS)}, got {self.scaling!r}")

    def map(self, value: Union[int, list, tuple], depth: int) -> Union[int, list]:
        """``value`` (a layer or a list of stage layers in 28-layer units) on a ``depth``-layer model."""
        if isinstance(value, (list, tuple)):
            return self._map_list(list(value), depth)
        return self._map_one(value, depth)

    def _map_one(self, layer: int, depth: int) -> int:
        if self.scaling == "relative":
            layer = math.floor(layer * depth / REFERENCE_DEPTH + 0.5)
        return min(max(layer, self.lowest), depth - 1)

    def _map_list(self, layers: list[int], depth: int) -> list[int]:
        out = []
        for layer in (self._map_one(k, depth) for k in layers):
            out.append(layer if not out or layer > out[-1] else out[-1] + 1)
        if out and out[-1] > depth - 1:
            raise ValueError(f"{len(layers)} stage layers {layers} do not fit a {depth}-layer model "
                             f"(valid layers {self.lowest}..{depth - 1})")
        return out


def layer_kwarg(default: Any = dataclasses.MISSING, *, scaling: str, lowest: int = 1,
                value_of: Optional[str] = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field holding decoder layer(s), with the :class:`LayerRule` that maps it to a
    backbone's depth (``layer: int = layer_kwarg(2, scaling="fixed")``)."""
    rule = LayerRule(scaling, lowest, value_of)
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"layer_rule": rule})
    return field(default=default, metadata={"layer_rule": rule})


def layer_rules(cls: type) -> dict[str, LayerRule]:
    """{field name: LayerRule} of a method class."""
    return {f.name: f.metadata["layer_rule"] for f in dataclasses.fields(cls) if "layer_rule" in f.metadata}



def check_retention(retention: float) -> float:
    try:
        value = float(retention)
    except (TypeError, ValueError):
        raise ValueError(f"retention must be a number in (0, 1], got {retention!r}") from None
    if isinstance(retention, bool) or not (0.0 < value <= 1.0):
        raise ValueError(f"retention must be in (0, 1] (the kept share of visual tokens), got {retention!r}")
    return value


def budget(n_visual: int, retention: float) -> int:
    """Number of visual tokens kept: round(retention x N_vis), at least 1 (N_vis = the ORIGINAL count)."""
    return max(1, min(n_visual, int(round(retention * n_visual))))


SPLIT_RULES = ("cumulative", "largest_remainder")


def split_budget(k: int, counts: list[int], rule: str = "cumulative") -> list[int]:
    """``k`` kept tokens over groups of ``counts`` tokens (frames, windows, ...), in proportion; the one
    budget-splitting rule of every method. sum = k, and k_g <= counts[g] whenever k <= sum(counts).

    ``rule="cumulative"`` (default): k_g = floor(k C_g / N) - floor(k C_{g-1} / N), C_g the cumulative
    count, N = sum(counts). Equal groups get floor(k / G) or one more, the extra ones spread evenly
    over the groups (32 frames x 196 at 12.8%: k = 803 -> 29 frames of 25 and 3 of 26; VisionZip's,
    HoliTom's and FEATHER's grid quotas).
    ``rule="largest_remainder"``: floor(k C / N) each, then one more to the groups with the largest
    remainders, ties to the earlier group (SharpV's fixed mode: 5 over [4, 4, 4] -> [2, 2, 1]).
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"split_budget: rule must be one of {', '.join(map(repr, SPLIT_RULES))}, got {rule!r}")
    total = sum(counts)
    if total == 0:
        return [0] * len(counts)
    if rule == "largest_remainder":
        shares = [k * c // total for c in counts]
        remainders = [k * c - s * total for c, s in zip(counts, shares)]  # exact: k c / N - share, times N
        for g in sorted(range(len(counts)), key=lambda g: (-remainders[g], g))[: k - sum(shares)]:
            shares[g] += 1
        return shares
    out, before, cum = [], 0, 0
    for n in counts:
        cum += n
        upto = (k * cum) // total
        out.append(upto - before)
        before = upto
    return out


@dataclass
class Selection:
    """What a stage keeps, per sample.

    keep_visual: per sample, indices into the *current* visual tokens of that sample
        (0 .. n_current-1) that survive the stage; order does not matter (the engine keeps tokens in
        sequence order). ``None`` = no token is removed (see :meth:`unchanged`).
    hidden_states: optional replacement for the stage's input hidden states (b, s, d), e.g. kept
        tokens that absorbed dropped ones. Only rows of kept tokens matter.
    new_rows: optional per sample ``(positions (k,), rows (k, d))``: new hidden states for these
        sequence positions of the stage's input (kept tokens that absorbed dropped ones), the rest
        unchanged. The engine writes them into the kept rows it gathers (no copy of the whole input:
        prefer it to ``hidden_states`` when few rows change); rows of dropped tokens are not used.
        At most one of ``hidden_states`` and ``new_rows``.
    """

    keep_visual: Optional[list[torch.Tensor]]
    hidden_states: Optional[torch.Tensor] = None
    new_rows: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    def __post_init__(self):
        if self.hidden_states is not None and self.new_rows is not None:
            raise ValueError("Selection: give hidden_states or new_rows, not both")

    @classmethod
    def unchanged(cls) -> "Selection":
        """No change at this stage: no gather, no mask rebuild, no new KV mask (free)."""
        return cls(keep_visual=None)

    @classmethod
    def top_k(cls, scores: torch.Tensor, k: list[int]) -> "Selection":
        """Keep the ``k[b]`` highest ``scores[b]`` (b, n_max; padded entries -inf) of each sample."""
        return cls([torch.topk(scores[b], int(k[b])).indices for b in range(scores.shape[0])])


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a method class (resolved once: methods are made per prefill)."""
    return typing.get_type_hints(cls)


def _type_ok(value: Any, hint: Any) -> Optional[bool]:
    """Whether ``value`` fits a simple annotation; None when the annotation is not checked."""
    origin = typing.get_origin(hint)
    if origin is Union:
        results = [_type_ok(value, h) for h in typing.get_args(hint)]
        return None if all(r is None for r in results) else any(bool(r) for r in results)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, dict) or hint in (list, tuple, dict):
        return isinstance(value, origin or hint)
    return None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


@dataclass
class PruningMethod:
    """Base class. Subclasses are dataclasses with a class attribute ``name``.

    Every method has ``retention`` (kept share of the ORIGINAL visual tokens) and ``positions``:
    ``"original"`` (kept tokens keep their RoPE positions), ``"compact"`` (kept tokens are re-numbered
    0..len-1 after each of this method's stages and decode positions shift by the number dropped, as
    PyramidDrop's official code; 1-D RoPE backbones only) or ``"auto"`` (default): the official code's
    numbering (``official_positions``) on 1-D RoPE, ``"original"`` on multimodal RoPE, decided by
    :func:`sharp.methods.settings.resolve_method` for the backbone (``sharp.prune`` resolves it).

    Decoder-layer kwargs are declared with :func:`sharp.methods.settings.layer_kwarg`, whose rule maps
    the paper's 28-layer value to a backbone of another depth when the user leaves it unset.
    """

    name: ClassVar[str] = ""
    # R = 1 is the identity (the tests then require bit-identical outputs at retention 1.0)
    identity_at_full_retention: ClassVar[bool] = True
    # the kept counts depend on the input (FrameFusion's merges, adaptive SharpV): ``token_schedule`` is
    # then a NOMINAL schedule and the trace's ``visual_tokens_per_layer`` is the measured one (read it on
    # the instance: a method whose mode decides, e.g. SharpV's adaptive threshold, may use a property)
    input_dependent_schedule: ClassVar[bool] = False
    # what the official code does with the kept tokens' RoPE positions on 1-D RoPE ("auto" there)
    official_positions: ClassVar[str] = "original"
    # reads ``ctx.frame_pooling`` (FastVID): on a hub (pretrained) LLaVA backbone that needs SigLIP's
    # attention-pooling head from the hub too, which the run's preflight checks with the weights
    reads_frame_pooling: ClassVar[bool] = False
    retention: float = 1.0
    positions: str = "auto"

    def __post_init__(self):
        self.check_fields()

    def check_fields(self) -> None:
        """Types of the dataclass fields and ``positions``: a clear error when the method is made."""
        hints = _field_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init or f.name not in hints:
                continue
            value = getattr(self, f.name)
            if _type_ok(value, hints[f.name]) is False:
                raise TypeError(f"{self.name}: {f.name} must be {_type_name(hints[f.name])}, "
                                f"got {value!r} ({type(value).__name__})")
        check_retention(self.retention)
        if self.positions not in POSITION_MODES:
            raise ValueError(f"{self.name}: positions must be one of {', '.join(map(repr, POSITION_MODES))}, "
                             f"got {self.positions!r}")

    def backbone_settings(self, backbone) -> dict[str, Any]:
        """Values of this method's automatic settings on ``backbone`` (a
        :class:`~sharp.methods.settings.BackboneFacts`): {field: value} for the fields left at a value that
        means "the official choice for this backbone". Base: ``positions="auto"``; a subclass with such
        fields of its own extends the dict (VisionZip: its port's vision layer and grouping)."""
        if self.positions != "auto":
            return {}
        return {"positions": "original" if backbone.mrope else self.official_positions}

    def compacts_at(self, layer: int) -> bool:
        """Whether this method's stage at ``layer`` re-numbers the kept tokens (``positions="compact"``:
        every stage by default; HoliTom compacts only its pre-LLM stage, as its official code)."""
        return self.positions == "compact"

    # -- where the method acts -------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        """Decoder-layer indices before which a selection stage runs (sorted). Raise ValueError for a
        layer outside 0..num_layers-1 (the engine asks when ``sharp.prune`` starts, before any forward)."""
        return []

    def score_layers(self, num_layers: int) -> list[int]:
        """Layers whose prefill *inputs* the engine must keep for ``select`` (e.g. FastV: K-1)."""
        return []

    def after_attention_layers(self, num_layers: int) -> list[int]:
        """Decoder layers after whose attention (+ residual, before the MLP) ``after_attention`` runs
        in prefill (FrameFusion's hook point)."""
        return []

    def vision_layers(self) -> list[Union[int, str]]:
        """Vision-encoder layers whose maps ``select`` reads through ``ctx.vision(layer)``
        (ints, negative from the end, or ``"feature"`` = the layer that feeds the LLM)."""
        return []

    # -- what it keeps ---------------------------------------------------------------------
    def select(self, ctx: "StageContext") -> Selection:
        raise NotImplementedError

    def after_attention(self, ctx: "StageContext") -> Selection:
        """A selection made between layer ``ctx.layer_idx``'s attention and its MLP (prefill only).

        ``ctx.hidden_states`` (b, s, d) is the residual stream after the attention; ``ctx.layer_input``
        the layer's input (``ctx.last_token_attention()`` is this layer's map). A returned
        ``hidden_states`` replaces the residual stream before the MLP (merged tokens); the tokens not in
        ``keep_visual`` leave the sequence from layer ``layer_idx + 1`` on (the MLP is token-wise, so
        their MLP rows in this layer are computed and discarded: the result equals dropping them before
        the MLP; the FLOPs counter counts this layer at its input count).
        """
        return Selection.unchanged()

    # -- decode -----------------------------------------------------------------------------
    def decode_stages(self, num_layers: int) -> list[int]:
        """Decoder layers before which ``decode_select`` runs in EVERY decode step (DyCoke's dynamic KV
        selection). The visual cache entries a step's selection keeps are the only ones that step's query
        sees in that layer and every later one (up to the next decode stage); the cache itself is not
        shrunk. Raise ValueError for a layer outside 1..num_layers-1 (a selection reads an earlier layer)."""
        return []

    def decode_select(self, ctx: "DecodeContext") -> Selection:
        """One decode step's visual-key selection at ``ctx.layer_idx``: ``keep_visual[b]`` indexes that
        layer's cached visual entries (``ctx.visual_index(b)``, cache order); ``Selection.unchanged()``
        = the step sees the whole cache. ``hidden_states`` is not allowed here."""
        raise NotImplementedError(f"{self.name} lists decode_stages but does not implement decode_select")

    # -- optional extras -------------------------------------------------------------------
    def install(self, ctx: "SessionContext") -> None:
        """Called on entering ``sharp.prune`` (extra hooks through ``ctx.add_hook``, per-session caches)."""

    def attention_mask(self, ctx: "StageContext") -> Optional[torch.Tensor]:
        """Custom prefill mask for layer ``ctx.layer_idx``: bool (b, 1, q, kv), True = may attend, or
        None. Called for every layer, in prefill and in probes (``ctx.phase``); the engine ANDs it with
        causal + padding and with the other composed methods' masks."""
        return None

    def after_prefill(self, ctx: "SessionContext") -> None:
        """Called once the prefill forward has finished (e.g. to drop KV-cache entries)."""

    # -- FLOPs -----------------------------------------------------------------------------
    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """Visual tokens processed by each decoder layer in prefill (for sharp.flops).

        ``backbone`` (a name or Backbone) is given for methods whose schedule depends on the model
        sizes (e.g. FLOPs-matched retentions). Default: one stage at ``stages()[0]`` keeping
        ``budget(n_visual, retention)``; multi-stage methods override this.
        """
        stages = self.stages(num_layers)
        if not stages:
            return [n_visual] * num_layers
        k, kept = stages[0], budget(n_visual, self.retention)
        return [n_visual if layer < k else kept for layer in range(num_layers)]
