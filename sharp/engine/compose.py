"""Composition: a method that is a sequence of methods (``fastv+sharp``, ``visionzip_sharp``).

The engine (:class:`~sharp.engine.session.PruningSession`) flattens a :class:`ComposedMethod` into
its children and

* runs the union of the children's stages, in layer order; at a layer where several children have
  a stage they run in the children's order, each on the sequence the previous one left;
* dispatches each stage to its owner (``select``, and ``after_attention`` at its after-attention
  layers) and records its selection under the owner's key;
* ANDs the children's custom attention masks (``attention_mask``) layer by layer;
* chains ``install`` and ``after_prefill`` in the children's order;
* records ``score_layers`` and ``vision_layers`` for all of them.

The FLOPs counter composes the token schedules (:meth:`ComposedMethod.token_schedule`): the element-wise
minimum of the children's schedules. This is exact because every budget is a share of the ORIGINAL
visual count (see :mod:`sharp.engine.method`) and a stage never keeps more than it receives.

What cannot compose (a clear error when the method is made or ``sharp.prune`` starts):

* ``positions="compact"`` on a backbone with multimodal RoPE (Qwen2-VL), composed or not;
* the same method instance twice (its per-prefill state would be shared): make two instances.

What composes with a documented approximation:

* a probe (ShaRP's PosC black-video forward) replays the earlier stages' selections (the same kept
  original indices), not their merges (hidden-state replacements), on the probe's inputs;
* the composed token schedule is exact for budget-driven children; a child whose kept count
  depends on the video (FrameFusion, adaptive SharpV) contributes its own nominal schedule and the
  trace's ``visual_tokens_per_layer`` is the measured one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from sharp.engine.method import PruningMethod


def child_keys(parts: list[str]) -> list[str]:
    """Kwarg keys of composed children: the name, or ``name@i`` (i-th occurrence) when repeated."""
    keys, seen = [], {}
    for p in parts:
        seen[p] = seen.get(p, 0) + 1
        keys.append(p if parts.count(p) == 1 else f"{p}@{seen[p]}")
    return keys


@dataclass
class ComposedMethod(PruningMethod):
    """Children applied in order. A named composition (Table 3's ``visionzip_sharp``) is declared in its
    method config (``parts``, ``child_defaults``: :mod:`sharp.methods.registry`); ``label`` is its name."""

    name: ClassVar[str] = "compose"
    children: tuple = ()
    label: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if not self.children:
            raise ValueError(f"{self.label or self.name}: a composed method needs at least one child")
        seen = set()
        for child in self.flat_children():
            if id(child) in seen:
                raise ValueError(f"{self.label or self.name}: the same {child.name} instance appears twice; "
                                 f"compose two instances")
            seen.add(id(child))

    def flat_children(self) -> list[PruningMethod]:
        """The leaves in order (a composed child contributes its own children)."""
        out = []
        for child in self.children:
            out += child.flat_children() if isinstance(child, ComposedMethod) else [child]
        return out

    @property
    def input_dependent_schedule(self) -> bool:  # type: ignore[override]
        """Whether a child's kept counts depend on the input (then the composed schedule is nominal)."""
        return any(c.input_dependent_schedule for c in self.flat_children())

    @property
    def display_name(self) -> str:
        return self.label or "+".join(c.name for c in self.flat_children())

    # a composed method has no stage of its own: the engine dispatches to the children
    def stages(self, num_layers: int) -> list[int]:
        return sorted({k for c in self.flat_children() for k in c.stages(num_layers)})

    def score_layers(self, num_layers: int) -> list[int]:
        return sorted({k for c in self.flat_children() for k in c.score_layers(num_layers)})

    def after_attention_layers(self, num_layers: int) -> list[int]:
        return sorted({k for c in self.flat_children() for k in c.after_attention_layers(num_layers)})

    def decode_stages(self, num_layers: int) -> list[int]:
        return sorted({k for c in self.flat_children() for k in c.decode_stages(num_layers)})

    def vision_layers(self) -> list[Union[int, str]]:
        out = []
        for c in self.flat_children():
            out += [v for v in c.vision_layers() if v not in out]
        return out

    def select(self, ctx):
        raise RuntimeError("a ComposedMethod has no select of its own; the engine runs its children's")

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        schedules = [c.token_schedule(n_visual, num_layers, backbone=backbone) for c in self.flat_children()]
        return [min(column) for column in zip(*schedules)]


def compose(*methods: PruningMethod, label: Optional[str] = None) -> ComposedMethod:
    """Compose method instances in order: ``sharp.prune(bb, compose(m1, m2))``."""
    return ComposedMethod(children=tuple(methods), label=label)
