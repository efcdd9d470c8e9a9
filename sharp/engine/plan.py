"""The plan of a pruning session: which method acts at which decoder layer, decided once per session.

A composed method is flattened into its leaves (composition order); every leaf is an ``owner`` (its
position in :attr:`PruningPlan.methods`) and its selections are recorded on the trace under its key
(:func:`~sharp.engine.compose.child_keys`). Layers a method names outside the model, an unresolved
``positions="auto"`` and ``positions="compact"`` on multimodal RoPE are errors here, before any hook.
"""
from __future__ import annotations

from dataclasses import dataclass

from sharp.engine.compose import ComposedMethod, child_keys
from sharp.engine.method import PruningMethod


def uses_mrope(backbone) -> bool:
    """Whether the backbone's LLM uses multimodal RoPE (Qwen2-VL): no 1-D compacted positions there."""
    scaling = getattr(backbone.text_config, "rope_scaling", None) or {}
    return "mrope_section" in scaling


@dataclass(frozen=True)
class PruningPlan:
    """Where each (flattened) method acts on a ``num_layers``-layer backbone."""

    methods: tuple[PruningMethod, ...]  # the leaves, in composition order; an owner is an index here
    keys: tuple[str, ...]  # the trace key of each owner
    num_layers: int
    stage_owners: dict[int, list[int]]  # layer -> owners with a stage before it, in composition order
    after_attention_owners: dict[int, list[int]]  # layer -> owners selecting after its attention
    decode_stage_owners: dict[int, list[int]]  # layer -> owners selecting visual keys before it in each decode step
    score_layers: frozenset[int]  # layers whose prefill inputs are recorded for later stages
    vision_layers: tuple[int, ...]  # vision-encoder layers whose maps a method reads (resolved indices)

    @classmethod
    def of(cls, backbone, method: PruningMethod) -> "PruningPlan":
        methods = tuple(method.flat_children() if isinstance(method, ComposedMethod) else [method])
        check_positions(backbone, methods)
        num_layers = backbone.num_layers
        wanted_vision = [v for m in methods for v in m.vision_layers()]
        return cls(
            methods=methods,
            keys=tuple(child_keys([m.name for m in methods])),
            num_layers=num_layers,
            stage_owners=_owners_by_layer(methods, num_layers, "stages", "stage"),
            after_attention_owners=_owners_by_layer(methods, num_layers, "after_attention_layers",
                                                    "after-attention"),
            decode_stage_owners=_owners_by_layer(methods, num_layers, "decode_stages", "decode stage"),
            score_layers=frozenset(_owners_by_layer(methods, num_layers, "score_layers", "score")),
            vision_layers=tuple(sorted({backbone.resolve_vision_layer(v) for v in wanted_vision})),
        )

    @property
    def stage_layers(self) -> list[int]:
        return sorted(self.stage_owners)


def check_positions(backbone, methods: tuple[PruningMethod, ...]) -> None:
    if any(m.positions == "auto" for m in methods):
        raise ValueError("positions='auto' is decided for a backbone: resolve the method first "
                         "(sharp.resolve_method(method, backbone); sharp.prune does)")
    if uses_mrope(backbone) and any(m.positions == "compact" for m in methods):
        raise ValueError(
            f"positions='compact' needs 1-D RoPE, but {backbone.name} uses multimodal RoPE (M-RoPE): each "
            f"visual token's position is its (t, h, w) grid cell and the compact re-numbering (PyramidDrop's, "
            f"the pre-LLM methods') is defined for 1-D positions only; use positions='original' on this backbone")


def _owners_by_layer(methods, num_layers: int, hook: str, what: str) -> dict[int, list[int]]:
    """{layer: [owner, ...]} of ``method.<hook>(num_layers)``; a layer outside the model is an error."""
    owners: dict[int, list[int]] = {}
    for owner, m in enumerate(methods):
        layers = getattr(m, hook)(num_layers)
        bad = [k for k in layers if not 0 <= k < num_layers]
        if bad:
            raise ValueError(f"{m.name}: {what} layer(s) {bad} outside 0..{num_layers - 1}")
        for k in layers:
            owners.setdefault(k, []).append(owner)
    return owners
