"""``--model_args`` of our lmms-eval models: per-child kwargs of composed methods as dotted keys.

    --model_args method=fastv+sharp,retention=0.25,sharp.layer=2,fastv.retention=0.5

lmms-eval splits the string at commas and ``=`` (values become bool/int/float/str); a dotted key
``<child>.<kwarg>`` goes into the child's dict (``{"sharp": {"layer": 2}, "fastv": {"retention": 0.5}}``),
which is what ``sharp.make_method`` takes. :func:`format_model_args` writes the string back (the
summary of a run records it, so a cell can be rerun through lmms-eval's CLI).
"""
from __future__ import annotations

from typing import Any, Optional

from sharp.harness.resources import HarnessError


class ModelArgsError(HarnessError, ValueError):
    """A bad ``--model_args`` value; the message names the argument and the accepted values."""


def nest_child_kwargs(method: str, kwargs: dict, who: str = "model_args",
                      children: Optional[list[str]] = None) -> dict:
    """Dotted keys -> nested per-child dicts. ``children``: the method's child keys (default: asked of
    the registry); a dotted key whose child is not one of them is a ModelArgsError naming them."""
    dotted = [k for k in kwargs if "." in k]
    if not dotted:
        return dict(kwargs)
    if children is None:
        from sharp.harness.catalog import method_children

        try:
            children = method_children(method)
        except ValueError as err:  # unknown method: the registry's message names the valid ones
            raise ModelArgsError(f"{who}: {err}") from None
    if not children:
        raise ModelArgsError(
            f"{who}: {', '.join(sorted(dotted))}: dotted keys set a child's kwarg of a composed method "
            f"(e.g. method=fastv+sharp,sharp.layer=2), but method {method!r} has no children")
    out = {k: v for k, v in kwargs.items() if "." not in k}
    for key in dotted:
        child, _, rest = key.partition(".")
        if child not in children:
            raise ModelArgsError(f"{who}: {key}: {child!r} is not a child of method {method!r}; "
                                 f"its children: {', '.join(children)}")
        target = out.setdefault(child, {})
        parts = rest.split(".")
        if not all(parts) or not isinstance(target, dict):
            raise ModelArgsError(f"{who}: {key}: accepted form: <child>.<kwarg>=<value>, child one of "
                                 f"{', '.join(children)}")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ModelArgsError(f"{who}: {key} conflicts with another key")
        target[parts[-1]] = kwargs[key]
    return out


def flatten_kwargs(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """{"sharp": {"lam": 0.5}} -> [("sharp.lam", 0.5)] (dotted keys; an empty dict stays a value)."""
    out = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out += flatten_kwargs(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "|".join(_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_model_args(kwargs: dict) -> str:
    """The ``--model_args`` string of ``kwargs`` (nested per-child dicts as dotted keys)."""
    return ",".join(f"{k}={_value(v)}" for k, v in flatten_kwargs(kwargs) if v is not None)
