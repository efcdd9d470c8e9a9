"""What can run: methods and backbones, from the registries (``sharp.methods``, ``sharp.backbones``).

The registries are the one source of truth. ``configs/method/*.yaml`` may describe methods that are
not implemented yet; such a file says so (``implemented: false`` and a one-line ``planned:`` note
naming what will implement it), and the harness reports those cells as "not implemented" instead
of running them (tests/test_harness_config.py keeps the marks in step with the registry).

Method names: a registered method (``fastv``), a registered combination (``visionzip_sharp``) or a
``+``-joined sequence of registered methods (``fastv+sharp``), whose per-child kwargs are dicts keyed
by the child's name (``name@i`` for the i-th occurrence of a repeated child).

Import-light: PyYAML and the standard library at import; the registries load on first use.
"""
from __future__ import annotations

import functools
import keyword
from pathlib import Path
from typing import Optional

import yaml

from sharp.harness.resources import HarnessError
from sharp.lmms.manifest import FAMILIES as _WRAPPED_FAMILIES

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
METHOD_CONFIG_DIR = CONFIG_DIR / "method"
FAMILIES = tuple(_WRAPPED_FAMILIES)  # backbone families with an lmms-eval wrapper
# The backbone a family's lmms-eval wrapper loads when model_args name none (the paper's models).
DEFAULT_BACKBONES = {"llava_onevision": "llava_onevision_7b", "qwen2_vl": "qwen2_vl_7b",
                     "llava_video": "llava_video_7b", "qwen2_5_vl": "qwen2_5_vl_7b", "qwen3_vl": "qwen3_vl_8b"}
COMPOSE_HINT = "or several joined by '+': method=compose method.name=fastv+sharp"  # run.py syntax
NOT_IMPLEMENTED = "not implemented"


# ----------------------------------------------------------------------------- methods
def registered_methods() -> list[str]:
    """Names ``sharp.prune`` accepts on their own: registered methods and combinations, without the
    test-only ones (``_name``)."""
    from sharp.methods import method_names

    return [name for name in method_names() if not name.startswith("_")]


def method_parts(name: str) -> Optional[list[str]]:
    """The children of a composed name (``a+b``) or declared composition, else None. Unknown plain
    names raise the registry's ValueError."""
    from sharp.methods import method_parts as parts_of

    return parts_of(name)


def method_children(name: str) -> Optional[list[str]]:
    """Per-child kwarg keys of a composed method / combination (``fastv``, ``sharp``), else None."""
    from sharp.engine.compose import child_keys

    parts = method_parts(name)
    return child_keys(parts) if parts else None


@functools.lru_cache(maxsize=None)
def _method_configs(config_dir: str) -> dict[str, dict]:
    out = {}
    for path in sorted(Path(config_dir).glob("*.yaml")):
        with open(path, encoding="utf-8") as fh:
            out[path.stem] = yaml.safe_load(fh) or {}
    return out


def method_configs(config_dir: Optional[Path] = None) -> dict[str, dict]:
    """configs/method/<file>.yaml -> its raw content (cached per folder)."""
    return _method_configs(str(config_dir or METHOD_CONFIG_DIR))


def planned_methods(config_dir: Optional[Path] = None) -> dict[str, str]:
    """Method name -> its ``planned:`` note, for method configs marked ``implemented: false``."""
    out = {}
    for stem, raw in method_configs(config_dir).items():
        if raw.get("implemented", True) is False:
            out[str(raw.get("name", stem))] = str(raw.get("planned") or "no note")
    return out


def config_problems(config_dir: Optional[Path] = None, registered: Optional[list[str]] = None) -> list[str]:
    """Method configs that disagree with the registry (tests/test_harness_config.py wants none):
    a config naming an unregistered method that is not marked planned, a config marked planned whose
    method is registered (remove the mark), a planned mark without its note, a name that is not the
    file's (the ``compose`` template, ``name: ???``, is exempt)."""
    registered = set(registered_methods() if registered is None else registered)
    problems = []
    for stem, raw in method_configs(config_dir).items():
        name = raw.get("name")
        if name == "???":  # a template: method.name is given on the command line
            continue
        where = f"configs/method/{stem}.yaml"
        if name != stem:
            problems.append(f"{where}: name {name!r} differs from the file name")
        planned = raw.get("implemented", True) is False
        if planned and name in registered:
            problems.append(f"{where}: {name!r} is registered now; remove `implemented: false` and `planned:`")
        elif planned and not str(raw.get("planned") or "").strip():
            problems.append(f"{where}: marked `implemented: false` without a `planned:` note naming what implements it")
        elif not planned and name not in registered:
            problems.append(f"{where}: {name!r} is not a registered method; register it or mark the config "
                            "`implemented: false` with a `planned:` note")
        if "implemented" in raw and not isinstance(raw["implemented"], bool):
            problems.append(f"{where}: implemented must be true or false, got {raw['implemented']!r}")
    return problems


def method_status(name: str) -> tuple[str, Optional[str]]:
    """("implemented" | "planned" | "unknown", note). A composed name is implemented when every child
    is; planned when a child is planned (the note names it)."""
    registered = set(registered_methods())
    planned = planned_methods()
    parts = name.split("+") if "+" in name else [name]
    if any(not p for p in parts):
        return "unknown", None
    if all(p in registered for p in parts):
        return "implemented", None
    for p in parts:
        if p not in registered and p in planned:
            return "planned", (planned[p] if p == name else f"{p}: {planned[p]}")
    return "unknown", None


def is_implemented(name: str) -> bool:
    return method_status(name)[0] == "implemented"


def not_implemented_message(name: str, compose_hint: str = COMPOSE_HINT) -> str:
    """One line: what is missing, what will implement it, what can run instead."""
    state, note = method_status(name)
    what = f"method {name!r} is not implemented yet"
    if note:
        what += f" [planned: {note}]"
    return f"{what}; implemented methods: {', '.join(registered_methods())} ({compose_hint})"


def check_method(name: str) -> None:
    """Raise a one-line HarnessError for a planned (not implemented) method; unknown names are left
    to ``sharp.make_method``'s error (it names the valid methods)."""
    if method_status(name)[0] == "planned":
        raise HarnessError(not_implemented_message(name))


def lmms_method_ids() -> list[str]:
    """Methods that get their own lmms-eval model id (``<family>_<method>``): the registered ones whose
    name is an identifier (composed names go through the generic ids' ``method=`` argument)."""
    return [m for m in registered_methods() if m.isidentifier() and not keyword.iskeyword(m)]


# ----------------------------------------------------------------------------- backbones
def backbone_names() -> list[str]:
    from sharp.backbones import backbone_names as names

    return list(names())


def backbone_family(name: str) -> str:
    """"llava_onevision" | "qwen2_vl" of a registered backbone; ValueError naming the valid ones."""
    from sharp.backbones import backbone_family as family

    return family(name)


def family_backbones(family: str) -> list[str]:
    """Registered backbones of one family, the family's default first."""
    names = [n for n in backbone_names() if backbone_family(n) == family]
    default = DEFAULT_BACKBONES.get(family)
    if default in names:
        names.remove(default)
        names.insert(0, default)
    return names


def check_backbone(name: str, family: Optional[str] = None) -> str:
    """The family of a registered backbone; a one-line HarnessError for an unknown name or a config whose
    ``family`` disagrees with the registry."""
    names = backbone_names()
    if name not in names:
        raise HarnessError(f"backbone {name!r} is not a registered backbone; registered backbones: {', '.join(names)}")
    actual = backbone_family(name)
    if family is not None and family != actual:
        raise HarnessError(f"backbone {name!r}: its config says family {family!r} but sharp.backbones says "
                           f"{actual!r}; fix configs/backbone/{name}.yaml")
    return actual
