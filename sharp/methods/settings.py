"""A method's settings on a backbone: the one place where a method's defaults meet a model.

A method's dataclass defaults are the paper's settings for the 28-layer 7B models (LLaVA-OneVision-7B
and Qwen2-VL-7B both have 28 decoder layers). :func:`resolve_method` turns a method name (or instance)
and a backbone into the method that runs there, in this order:

1. the method's defaults (for a declared composition, its config's ``child_defaults`` on top);
2. every layer kwarg that the user did not set follows the backbone's depth L (its :class:`LayerRule`):
   - ``relative`` (a depth in the paper's 28 layers: PyramidDrop's 4/16/24, HoliTom's 18, FEATHER's
     official 8/16): l -> round(l x L / 28) (halves up), clamped to ``lowest .. L-1``; a list stays
     strictly increasing (a later stage moves one layer deeper when two would land together);
   - ``fixed`` (a layer the method defines by its index: FastV's K = 2, ShaRP's first layer, FEATHER's
     paper-mode K = 2): kept, clamped to ``lowest .. L-1``;
3. the method's per-backbone section of its Hydra config (``configs/method/<name>.yaml``, key
   ``backbones``: a family name or a backbone name, the name winning), e.g. FrameFusion's official
   Qwen2-VL threshold; these values count as set and are not depth-mapped;
4. the user's kwargs (never mapped; an invalid one is an error);
5. the method's automatic settings on that backbone (:meth:`PruningMethod.backbone_settings`):
   ``positions="auto"`` is the official code's numbering (``official_positions``) on 1-D RoPE and
   ``"original"`` on multimodal RoPE; VisionZip's port layer and grouping per family.

An explicit ``positions="compact"`` on an M-RoPE backbone, a layer outside the model and a bad value
are a ``ValueError`` here, before any model is loaded (a backbone name is enough:
:meth:`BackboneFacts.of` reads its config file). ``run.py``, the lmms-eval models, ``sharp.prune``,
``sharp.flops`` and the scripts all resolve through this function; the resolved values are printed at
the start of a run and written to its summary (:attr:`Resolved.settings`, :attr:`Resolved.changes`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from sharp.engine.method import REFERENCE_DEPTH, PruningMethod, layer_rules

# ----------------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class BackboneFacts:
    """What resolving needs to know of a backbone, read from its config without loading weights."""

    name: str
    family: str
    num_layers: int  # decoder layers
    vision_layers: int  # vision-encoder layers
    mrope: bool  # multimodal RoPE (no 1-D re-numbering of positions)

    def fit_vision_layer(self, layer: Union[int, str]) -> Union[int, str]:
        """A method's default vision-encoder layer on this backbone's tower (:func:`fit_vision_layer`)."""
        return fit_vision_layer(layer, self.vision_layers)

    @classmethod
    def of(cls, backbone) -> "BackboneFacts":
        """From a loaded :class:`~sharp.backbones.Backbone`, a backbone name or a BackboneFacts."""
        if isinstance(backbone, BackboneFacts):
            return backbone
        if isinstance(backbone, str):
            return _facts_of_name(backbone)
        from sharp.engine.plan import uses_mrope

        return cls(backbone.name, backbone.family, backbone.num_layers, len(backbone.vision_layers),
                   uses_mrope(backbone))


@functools.lru_cache(maxsize=None)
def _facts_of_name(name: str) -> BackboneFacts:
    from sharp.backbones import backbone_config_path, backbone_family, family_class

    family = backbone_family(name)
    config = json.loads(backbone_config_path(name).read_text())
    text = config["text_config"]
    mrope = "mrope_section" in (text.get("rope_scaling") or {})
    return BackboneFacts(name, family, int(text["num_hidden_layers"]),
                         family_class(family).vision_depth(config["vision_config"]), mrope)


def fit_vision_layer(layer: Union[int, str], depth: int) -> Union[int, str]:
    """A vision-encoder layer on a tower of ``depth`` layers: "feature" and indices that exist there are
    kept (negative ones count from the end, as the methods' defaults do: -2 = the penultimate layer);
    an index beyond the tower becomes its nearest layer (-2 on a 1-layer tower: 0)."""
    if not isinstance(layer, int) or -depth <= layer < depth:
        return layer
    return 0 if layer < 0 else depth - 1


# ----------------------------------------------------------------------------- per-backbone config
def method_config_dir() -> Path:
    from sharp.paths import config_dir

    return config_dir() / "method"


@functools.lru_cache(maxsize=None)
def _backbone_sections(name: str) -> dict:
    path = method_config_dir() / f"{name}.yaml"
    if not path.is_file():
        return {}
    import yaml

    sections = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("backbones") or {}
    if not isinstance(sections, dict) or any(not isinstance(v, dict) for v in sections.values()):
        raise ValueError(f"{path}: 'backbones' must map a family or backbone name to a dict of kwargs")
    return sections


def configured_for_backbone(name: str, backbone: BackboneFacts) -> dict:
    """The ``backbones`` section of ``configs/method/<name>.yaml`` for this backbone (family, then name)."""
    sections = _backbone_sections(name)
    return deep_merge(dict(sections.get(backbone.family) or {}), dict(sections.get(backbone.name) or {}))


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` on top of ``base``; dicts merge key by key (a composed method's per-child kwargs)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- resolving
@dataclass
class Resolved:
    """A method made for one backbone.

    method: the instance to pass to ``sharp.prune`` / ``sharp.flops``; settings: every kwarg it runs
    with (a combination: per child), JSON-ready; changes: one line per value that differs from the
    paper's 7B default and why (depth mapping, per-backbone config, automatic choices other than the
    official positions, e.g. original positions on M-RoPE)."""

    method: PruningMethod
    backbone: BackboneFacts
    settings: dict
    changes: list[str]

    def describe(self) -> str:
        """One line for logs: the changes from the paper's defaults (or that there are none) and the
        decoder layers the stages run before."""
        what = "; ".join(self.changes) if self.changes else "the paper's defaults"
        stages = self.method.stages(self.backbone.num_layers)
        where = f"; stages before layer(s) {', '.join(map(str, stages))}" if stages else "; no stage"
        return f"{_label(self.method)} on {self.backbone.name} ({self.backbone.num_layers} layers): {what}{where}"


def resolve_method(method: Union[str, PruningMethod], backbone, retention: float = 1.0, **kwargs) -> Resolved:
    """The method ``method`` (a registered name, a ``+``-joined composition or an instance) as it runs on
    ``backbone`` (a Backbone, a backbone name or BackboneFacts), with the user's ``kwargs`` (a
    composition: per child, ``sharp={"layer": 2}``). See the module docstring for the order.

    An instance is taken as given (its layers are the user's) and only its automatic settings are
    filled in (a copy is returned when one changes)."""
    facts = BackboneFacts.of(backbone)
    changes: list[str] = []
    if isinstance(method, PruningMethod):
        if kwargs:
            raise TypeError("pass method kwargs to the method instance, not with it")
        made = _fill_automatic(method, facts, changes, prefix="")
    else:
        made = _resolve_name(str(method), retention, facts, {}, kwargs, {}, changes, prefix="")
    check_on_backbone(made, facts)
    return Resolved(made, facts, method_settings(made), changes)


def _resolve_name(name: str, retention: float, facts: BackboneFacts, defaults: dict, user: dict,
                  rules: dict, changes: list[str], prefix: str) -> PruningMethod:
    from sharp.methods.registry import get_method_class, is_composed_name, make_method

    if is_composed_name(name):
        return _resolve_composed(name, retention, facts, defaults, user, changes, prefix)
    rules = {**layer_rules(get_method_class(name)), **rules}
    configured = configured_for_backbone(name, facts)
    explicit = {**configured, **user}
    base = make_method(name, retention, **defaults)
    mapped = {}
    for key, rule in rules.items():
        value = getattr(base, rule.value_of or key) if key not in explicit else None
        if value is None:
            continue
        new = rule.map(value, facts.num_layers)
        if _plain(new) != _plain(value):
            mapped[key] = new
            changes.append(f"{prefix}{key} {_show(value)} -> {_show(new)} ({rule.scaling}, depth "
                           f"{REFERENCE_DEPTH} -> {facts.num_layers})")
    for key, value in configured.items():
        if key not in user and _plain(value) != _plain(getattr(base, key, None)):
            changes.append(f"{prefix}{key} {_show(getattr(base, key, None))} -> {_show(value)} "
                           f"(configs/method/{name}.yaml)")
    made = make_method(name, retention, **{**defaults, **mapped, **explicit})
    return _fill_automatic(made, facts, changes, prefix)


def _resolve_composed(name: str, retention: float, facts: BackboneFacts, defaults: dict, user: dict,
                      changes: list[str], prefix: str) -> PruningMethod:
    from sharp.engine.compose import ComposedMethod
    from sharp.methods.registry import child_keys, composition, make_method, method_parts

    parts = method_parts(name)
    spec = composition(name)  # a declared composition (its per-child defaults and layer rules), or None
    keys = child_keys(parts)
    make_method(name, retention, **deep_merge(defaults, user))  # names, per-child dicts and values, as given
    combo_defaults = deep_merge(spec.child_defaults if spec else {}, defaults)
    configured = configured_for_backbone(name, facts) if spec else {}
    combo_rules = spec.child_layer_rules if spec else {}
    children = []
    for part, key in zip(parts, keys):
        child_defaults = dict(combo_defaults.get(key) or {})
        child_user = deep_merge(dict(configured.get(key) or {}), dict(user.get(key) or {}))
        child_retention = child_user.pop("retention", child_defaults.pop("retention", retention))
        child_defaults.pop("retention", None)
        children.append(_resolve_name(part, child_retention, facts, child_defaults, child_user,
                                      combo_rules.get(key, {}), changes, prefix=f"{prefix}{key}."))
    return ComposedMethod(retention=retention, children=tuple(children), label=name)


def _fill_automatic(method: PruningMethod, facts: BackboneFacts, changes: list[str], prefix: str) -> PruningMethod:
    """The method with its automatic settings for the backbone: the same instance if none changes, else a
    shallow copy with those fields set (the copy shares everything else, e.g. ShaRP's PosC cache and any
    wrapper a caller put on the instance's bound methods)."""
    from sharp.engine.compose import ComposedMethod

    if isinstance(method, ComposedMethod):
        children = tuple(_fill_automatic(c, facts, changes, f"{prefix}{_child_key(method, i)}.")
                         for i, c in enumerate(method.children))
        return method if all(a is b for a, b in zip(children, method.children)) else _copy_with(method, children=children)
    automatic = {k: v for k, v in method.backbone_settings(facts).items() if getattr(method, k) != v}
    for key, value in automatic.items():
        if key != "positions" or value != type(method).official_positions:  # not the official numbering
            changes.append(f"{prefix}{key} {_show(getattr(method, key))} -> {_show(value)}")
    return _copy_with(method, **automatic) if automatic else method


def _copy_with(method: PruningMethod, **values) -> PruningMethod:
    out = copy.copy(method)
    for key, value in values.items():
        setattr(out, key, value)
    out.check_fields()
    return out


def _child_key(method, i: int) -> str:
    from sharp.methods.registry import child_keys

    return child_keys([c.name for c in method.children])[i]


def check_on_backbone(method: PruningMethod, backbone) -> None:
    """What ``sharp.prune`` would refuse, without a model: compact positions on M-RoPE, and a stage,
    score or after-attention layer outside ``0 .. num_layers-1`` (ValueError naming the method)."""
    from sharp.engine.compose import ComposedMethod

    facts = BackboneFacts.of(backbone)
    leaves = method.flat_children() if isinstance(method, ComposedMethod) else [method]
    where = f"on {facts.name} ({facts.num_layers} decoder layers)"
    for m in leaves:
        if m.positions == "compact" and facts.mrope:
            raise ValueError(
                f"{m.name}: positions='compact' needs 1-D RoPE, but {facts.name} uses multimodal RoPE (M-RoPE): "
                f"each visual token's position is its (t, h, w) grid cell, so the compact re-numbering is not "
                f"defined there; accepted values on this backbone: 'auto' (the default) or 'original'")
        for v in m.vision_layers():
            if isinstance(v, int) and not -facts.vision_layers <= v < facts.vision_layers:
                raise ValueError(f"{m.name} {where}: vision layer {v} is outside the {facts.vision_layers}-layer vision "
                                 f"encoder; accepted values: {-facts.vision_layers}..{facts.vision_layers - 1} or "
                                 f"'feature'")
        for hook in ("stages", "score_layers", "after_attention_layers"):
            layers = list(getattr(m, hook)(facts.num_layers))  # a method's own range check raises here
            bad = [k for k in layers if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < facts.num_layers]
            if bad:
                raise ValueError(f"{m.name} {where}: {hook}() gives layer(s) {bad}; accepted values: "
                                 f"0..{facts.num_layers - 1}")


def method_settings(method: PruningMethod) -> dict:
    """Every init kwarg of ``method`` (a composition: ``retention`` and one dict per child key), JSON-ready."""
    from sharp.engine.compose import ComposedMethod
    from sharp.methods.registry import child_keys

    if isinstance(method, ComposedMethod):
        keys = child_keys([c.name for c in method.children])
        return {"retention": method.retention, **{k: method_settings(c) for k, c in zip(keys, method.children)}}
    return {f.name: _plain(getattr(method, f.name)) for f in dataclasses.fields(method)
            if f.init and not f.name.startswith("_")}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    return json.dumps(_plain(value)).strip('"') if value is not None else "None"


def _label(method: PruningMethod) -> str:
    return getattr(method, "label", None) or method.name
