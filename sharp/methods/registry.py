"""The method registry: names -> classes, and :func:`make_method` (plain and composed methods).

A name is a registered method (``fastv``), a registered combination (``visionzip_sharp``, a
:class:`~sharp.engine.compose.ComposedMethod` subclass) or a ``+``-joined sequence of names
(``fastv+sharp``), composed in that order. A composed method takes its children's kwargs as dicts
keyed by the child's name (``fastv={"layer": 3}``; a repeated child is ``fastv@2`` for its second
occurrence); a ``retention`` inside a child's dict overrides the top-level retention for that child.
"""
from __future__ import annotations

import dataclasses

from sharp.engine.compose import ComposedMethod, child_keys
from sharp.engine.method import PruningMethod, check_retention
from sharp.methods.fastv import FastV
from sharp.methods.feather import Feather
from sharp.methods.framefusion import FrameFusion
from sharp.methods.holitom import HoliTom, HoliTomSharp
from sharp.methods.pdrop import PyramidDrop
from sharp.methods.sharp import ShaRP
from sharp.methods.sharpv import SharpV
from sharp.methods.vanilla import Vanilla
from sharp.methods.visionzip import VisionZip, VisionZipShaRP

# The built-in methods and combinations, the one list of them (a new method adds its class here).
BUILTIN_METHODS: tuple[type[PruningMethod], ...] = (
    Vanilla, ShaRP, SharpV,  # the paper's method and its sibling
    FastV, PyramidDrop, Feather, FrameFusion, VisionZip, HoliTom,  # the compared baselines
    VisionZipShaRP, HoliTomSharp,  # the combinations of Table 3
)
_REGISTRY: dict[str, type[PruningMethod]] = {cls.name: cls for cls in BUILTIN_METHODS}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator for methods defined outside this package (an extension, a test's ``_probe``):
    make ``cls`` available as ``sharp.prune(..., method=cls.name)``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} must define a class attribute `name`")
    if "+" in cls.name or "@" in cls.name:
        raise TypeError(f"{cls.__name__}: a method name may not contain '+' or '@' (they compose), got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every registered method and combination (test-only methods start with ``_``)."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[PruningMethod]:
    if name not in _REGISTRY:
        valid = ", ".join(n for n in sorted(_REGISTRY) if not n.startswith("_"))
        raise ValueError(f"unknown pruning method {name!r}; valid methods: {valid} "
                         f"(or several joined by '+', e.g. 'fastv+sharp')")
    return _REGISTRY[name]


def is_composed_name(name: str) -> bool:
    """True for ``a+b`` names and registered combinations."""
    return "+" in name or issubclass(get_method_class(name), ComposedMethod)


def _check_kwargs(cls: type[PruningMethod], name: str, kwargs: dict) -> None:
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"method {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"valid arguments: {', '.join(sorted(valid - {'retention'}))}")


def make_method(name: str, retention: float = 1.0, **kwargs) -> PruningMethod:
    """Instantiate a registered, combined or ``+``-composed method; bad names, kwargs, types or values
    raise a clear error here, before any forward."""
    retention = check_retention(retention)
    if "+" in name:
        return _make_composed(ComposedMethod, name.split("+"), retention, kwargs, label=name)
    cls = get_method_class(name)
    if issubclass(cls, ComposedMethod):
        return _make_composed(cls, list(cls.parts), retention, kwargs, label=name)
    _check_kwargs(cls, name, kwargs)
    return cls(retention=retention, **kwargs)


def _make_composed(cls: type[ComposedMethod], parts: list[str], retention: float, kwargs: dict,
                   label: str) -> ComposedMethod:
    if any(not p for p in parts):
        raise ValueError(f"composed method {label!r} has an empty part; write e.g. 'fastv+sharp'")
    keys = child_keys(parts)
    defaults = getattr(cls, "child_defaults", {}) or {}
    unknown = sorted(set(kwargs) - set(keys))
    if unknown:
        raise TypeError(
            f"composed method {label!r} takes per-child kwargs as dicts keyed by its children "
            f"({', '.join(keys)}), e.g. {keys[-1]}={{'retention': 0.1}}; got {', '.join(unknown)}")
    children = []
    for part, key in zip(parts, keys):
        given = kwargs.get(key) or {}
        if not isinstance(given, dict):
            raise TypeError(f"composed method {label!r}: {key} must be a dict of {part}'s kwargs, got {given!r}")
        child_kwargs = {**defaults.get(key, {}), **given}
        child_retention = child_kwargs.pop("retention", retention)
        children.append(make_method(part, child_retention, **child_kwargs))
    return cls(retention=retention, children=tuple(children), label=label)
