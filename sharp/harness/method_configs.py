"""The Hydra side of the methods: each method's kwargs are generated from its dataclass, the one source.

``configs/method/<name>.yaml`` carries only what Hydra needs and the dataclass cannot say: the name,
the default retention of a run (its Table 1 value), per-backbone values (``backbones:``) and, for a
declared composition, its parts and per-child defaults. Everything else is generated here into Hydra's
ConfigStore (``register_method_configs``: when ``run.py`` starts and before each harness ``compose``):

* ``method_defaults/<name>``: every kwarg of the method and its dataclass default (a composition: one
  dict per child, the child's defaults under the composition's ``child_defaults``); ``configs/config.yaml``
  merges it into ``method.kwargs`` (``- method_defaults@method.kwargs: ${method}``), so
  ``method.kwargs.<kwarg>=<value>`` sets any kwarg and ``--cfg job`` lists them all;
* ``method/<name>`` for a registered method without a yaml (an outside package's): its name and, as
  default retention, the dataclass's ``retention`` default. ``python run.py method=<it>`` then works.

Which kwargs a run SET is read from its command line (:func:`explicit_method_kwargs`), never by comparing
values with the defaults: an explicit value equal to the 7B default is still explicit, so it is not
depth-mapped (``method.kwargs.llm_layer=18`` runs layer 18 on every backbone).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from sharp.paths import config_dir

DEFAULTS_GROUP = "method_defaults"
COMPOSE = "compose"  # configs/method/compose.yaml: any '+'-joined names, kwargs via +method_kwargs


def method_kwargs_of(name: str) -> dict:
    """{kwarg: default} of a registered method (its made instance's settings; ``retention`` is the run's)."""
    from sharp.methods.registry import make_method
    from sharp.methods.settings import method_settings

    return {k: v for k, v in method_settings(make_method(name)).items() if k != "retention"}


def default_retention(cls: type) -> float:
    """A yaml-less method's default retention: its dataclass's ``retention`` default."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == "retention")


def method_kwarg_defaults(name: str) -> dict:
    """The generated ``method.kwargs`` of a registered method or declared composition."""
    from sharp.engine.compose import child_keys
    from sharp.methods.registry import composition

    spec = composition(name)
    if spec is None:
        return method_kwargs_of(name)
    out = {}
    for part, key in zip(spec.parts, child_keys(list(spec.parts))):
        own = {"retention": "${retention}", **method_kwargs_of(part)}
        out[key] = {**own, **spec.child_defaults.get(key, {})}
    return out


def register_method_configs() -> None:
    """Store the generated method configs of every registered method in Hydra's ConfigStore (again
    when a ``register_method`` at run time added a name)."""
    from hydra.core.config_store import ConfigStore

    from sharp.methods.registry import get_method_class, method_names

    store = ConfigStore.instance()
    names = method_names()
    key = [(name, id(get_method_class(name))) for name in names]
    if _STORED.get("key") == key and _STORED.get("store") is store:
        return  # every one already stored (compose calls this each time)
    store.store(group=DEFAULTS_GROUP, name=COMPOSE, node={})
    with_yaml = {p.stem for p in (config_dir() / "method").glob("*.yaml")}
    for name in names:
        store.store(group=DEFAULTS_GROUP, name=name, node=method_kwarg_defaults(name))
        if name not in with_yaml:
            store.store(group="method", name=name,
                        node={"name": name, "default_retention": default_retention(get_method_class(name))})
    _STORED.update(key=key, store=store)


_STORED: dict = {}  # the (name, class) pairs last stored, and in which ConfigStore


def explicit_method_kwargs(kwargs: dict, command_line: Iterable[str]) -> dict:
    """The entries of ``kwargs`` (a run's ``method.kwargs``) that the command line set, whatever their
    value: ``method.kwargs.llm_layer=18`` -> {"llm_layer": 18}; ``method.kwargs.sharp.lam=0.5`` ->
    {"sharp": {"lam": 0.5}}; ``method.kwargs={...}`` -> all of them."""
    out: dict = {}
    for override in command_line:
        if "=" not in override or override.startswith("~"):
            continue
        key = override.split("=", 1)[0].lstrip("+")
        if key == "method.kwargs":
            return dict(kwargs)
        if not key.startswith("method.kwargs."):
            continue
        path = key.split(".")[2:]
        value: Any = kwargs
        for part in path:
            value = value[part]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out
