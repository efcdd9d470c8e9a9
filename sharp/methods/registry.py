"""The method registry: names -> classes, and :func:`make_method` (plain and composed methods).

Where the names come from, read once on first use:

1. the entry-point group ``sharp.methods`` of every installed distribution, ``name = "module:Class"``.
   This project's ``pyproject.toml`` lists ``vanilla``, ``sharp`` and every method of ``baselines/``
   there; an outside package registers its methods the same way (docs/adding_a_method.md);
2. compositions declared in ``configs/method/<name>.yaml`` by a ``parts`` list (Table 3's
   ``visionzip_sharp``, ``holitom_sharp``), with their per-child defaults (``child_defaults``) and the
   layer rules of children whose layer means something else there (``child_layer_rules``): the one
   place of those values;
3. :func:`register_method`, for a class made at run time (a test's ``_probe``, a notebook's).

A name is a registered method (``fastv``), a declared composition (``visionzip_sharp``) or a
``+``-joined sequence of names (``fastv+sharp``), composed in that order. A composed method takes its
children's kwargs as dicts keyed by the child's name (``fastv={"layer": 3}``; a repeated child is
``fastv@2`` for its second occurrence); a ``retention`` inside a child's dict overrides the top-level
retention for that child.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from importlib import metadata
from typing import Optional

from sharp.engine.compose import ComposedMethod, child_keys
from sharp.engine.method import LayerRule, PruningMethod, check_retention

ENTRY_POINT_GROUP = "sharp.methods"
PROJECT_DISTRIBUTION = "sharp-prune"


@dataclass(frozen=True)
class Composition:
    """A composition declared in a method config: ``parts`` in order, per-child defaults keyed like the
    user's kwargs (``{"sharp": {"retention": 0.124}}``), per-child :class:`LayerRule` overrides."""

    name: str
    parts: tuple[str, ...]
    child_defaults: dict = field(default_factory=dict)
    child_layer_rules: dict = field(default_factory=dict)  # child key -> {field: LayerRule}
    source: str = ""


# methods registered at run time (register_method); the entry points and configs are read once
_RUNTIME: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator for a method made at run time (a test's ``_probe``, a notebook's): make ``cls``
    available as ``sharp.prune(..., method=cls.name)`` in this process. A package registers its methods
    through the entry-point group ``sharp.methods`` instead (then ``run.py`` and lmms-eval see them)."""
    _check_name(cls, where=cls.__name__)
    _RUNTIME[cls.name] = cls
    return cls


def _check_name(cls, where: str) -> None:
    if not isinstance(cls, type) or not issubclass(cls, PruningMethod):
        raise TypeError(f"{where}: a method must be a PruningMethod subclass, got {cls!r}")
    if not getattr(cls, "name", None):
        raise TypeError(f"{where}: {cls.__name__} must define a class attribute `name`")
    if "+" in cls.name or "@" in cls.name:
        raise TypeError(f"{where}: a method name may not contain '+' or '@' (they compose), got {cls.name!r}")


@functools.lru_cache(maxsize=None)
def entry_point_methods() -> dict[str, type[PruningMethod]]:
    """{name: class} of the entry-point group ``sharp.methods`` of every installed distribution."""
    out: dict[str, tuple[type[PruningMethod], str]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        where = f"entry point {ep.name} = {ep.value!r} of {dist} (group {ENTRY_POINT_GROUP})"
        try:
            cls = ep.load()
        except Exception as err:  # an outside package that does not import: name it, never skip it
            raise RuntimeError(f"{where} failed to load: {type(err).__name__}: {err}") from err
        _check_name(cls, where)
        if cls.name != ep.name:
            raise TypeError(f"{where}: the entry point's name must be the class's `name` ({cls.name!r})")
        if ep.name in out and out[ep.name][0] is not cls:
            raise TypeError(f"{where}: the name {ep.name!r} is already registered by {out[ep.name][1]}")
        out[ep.name] = (cls, dist)
    missing = sorted(set(_checkout_entry_points()) - set(out))
    if missing or not any(dist == PROJECT_DISTRIBUTION for _, dist in out.values()):
        raise RuntimeError(f"the installed entry points of {PROJECT_DISTRIBUTION} (group {ENTRY_POINT_GROUP!r}) "
                           f"lack {', '.join(missing) or 'every method'} that pyproject.toml lists: install the "
                           f"project again (pip install -e . from the checkout, or bash scripts/setup.sh)")
    return {name: cls for name, (cls, _) in out.items()}


def _checkout_entry_points() -> dict:
    """The ``sharp.methods`` entry points this checkout's pyproject.toml lists ({} outside a checkout)."""
    from pathlib import Path

    try:
        import tomllib
    except ImportError:  # Python 3.10: no check
        return {}
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    return project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})


@functools.lru_cache(maxsize=None)
def declared_compositions() -> dict[str, Composition]:
    """{name: Composition} of every ``configs/method/<name>.yaml`` with a ``parts`` list."""
    import yaml

    from sharp.paths import config_dir

    out = {}
    for path in sorted((config_dir() / "method").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if "parts" in raw:
            out[path.stem] = _composition(path.stem, raw, str(path))
    return out


def _composition(name: str, raw: dict, source: str) -> Composition:
    parts = raw.get("parts")
    if raw.get("name") != name or not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{source}: a composition needs `name: {name}` and `parts: [<method>, <method>, ...]`")
    keys = child_keys(parts)
    defaults = raw.get("child_defaults") or {}
    rules = raw.get("child_layer_rules") or {}
    for what, table in (("child_defaults", defaults), ("child_layer_rules", rules)):
        unknown = sorted(set(table) - set(keys))
        if unknown or any(not isinstance(v, dict) for v in table.values()):
            raise ValueError(f"{source}: {what} must map children ({', '.join(keys)}) to dicts; got {unknown or table}")
    layer_rules = {key: {f: _layer_rule(rule, source) for f, rule in fields.items()} for key, fields in rules.items()}
    return Composition(name, tuple(parts), {k: dict(v) for k, v in defaults.items()}, layer_rules, source)


def _layer_rule(rule, source: str) -> LayerRule:
    """``relative`` | ``fixed`` | ``{scaling: relative, lowest: 1}`` -> LayerRule."""
    if isinstance(rule, str):
        return LayerRule(rule)
    if isinstance(rule, dict):
        return LayerRule(**rule)
    raise ValueError(f"{source}: a child layer rule is 'relative', 'fixed' or a dict of LayerRule's fields, got {rule!r}")


def _classes() -> dict[str, type[PruningMethod]]:
    return {**entry_point_methods(), **_RUNTIME}


def method_names() -> list[str]:
    """Every registered method and declared composition (test-only methods start with ``_``)."""
    return sorted({*_classes(), *declared_compositions()})


def composition(name: str) -> Optional[Composition]:
    """The declared composition of that name, or None."""
    return declared_compositions().get(name)


def get_method_class(name: str) -> type[PruningMethod]:
    """The class of a registered method; :class:`ComposedMethod` for a declared composition."""
    classes = _classes()
    if name in classes:
        return classes[name]
    if name in declared_compositions():
        return ComposedMethod
    valid = ", ".join(n for n in method_names() if not n.startswith("_"))
    raise ValueError(f"unknown pruning method {name!r}; valid methods: {valid} "
                     f"(or several joined by '+', e.g. 'fastv+sharp')")


def method_parts(name: str) -> Optional[list[str]]:
    """The children of a ``+``-joined name or a declared composition, else None (unknown names raise)."""
    if "+" in name:
        return name.split("+")
    get_method_class(name)
    spec = composition(name)
    return list(spec.parts) if spec else None


def leaf_classes(name: str) -> list[type[PruningMethod]]:
    """The classes of every method a name runs (a composition's children, recursively)."""
    parts = method_parts(name)
    if parts is None:
        return [get_method_class(name)]
    return [cls for part in parts for cls in leaf_classes(part.split("@")[0])]


def is_composed_name(name: str) -> bool:
    """True for ``a+b`` names and declared compositions."""
    return method_parts(name) is not None


def _check_kwargs(cls: type[PruningMethod], name: str, kwargs: dict) -> None:
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"method {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"valid arguments: {', '.join(sorted(valid - {'retention'}))}")


def make_method(name: str, retention: float = 1.0, **kwargs) -> PruningMethod:
    """Instantiate a registered, declared or ``+``-composed method; bad names, kwargs, types or values
    raise a clear error here, before any forward."""
    retention = check_retention(retention)
    parts = method_parts(name)
    if parts is not None:
        spec = composition(name)
        return _make_composed(parts, retention, kwargs, label=name, defaults=spec.child_defaults if spec else {})
    cls = get_method_class(name)
    _check_kwargs(cls, name, kwargs)
    return cls(retention=retention, **kwargs)


def _make_composed(parts: list[str], retention: float, kwargs: dict, label: str, defaults: dict) -> ComposedMethod:
    if any(not p for p in parts):
        raise ValueError(f"composed method {label!r} has an empty part; write e.g. 'fastv+sharp'")
    keys = child_keys(parts)
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
    return ComposedMethod(retention=retention, children=tuple(children), label=label)
