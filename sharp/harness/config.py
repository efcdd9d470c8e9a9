"""Config helpers: paths, the ``sharp_path`` resolver, composing cells and reading sweep files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from sharp.harness.cells import Cell, format_retention
from sharp.harness.method_configs import explicit_method_kwargs, register_method_configs
from sharp.harness.resources import HarnessError
from sharp.lmms.args import flatten_kwargs
from sharp.methods.settings import deep_merge
from sharp.paths import config_dir

PACKAGE_DIR = Path(__file__).resolve().parents[1]          # .../sharp
REPO_ROOT = PACKAGE_DIR.parent                             # checkout root (configs/, run.py, results/)
CONFIG_DIR = config_dir()
SWEEP_DIR = CONFIG_DIR / "sweep"


def _sharp_path(rel: str = "") -> str:
    return str(PACKAGE_DIR / rel)


if not OmegaConf.has_resolver("sharp_path"):
    OmegaConf.register_new_resolver("sharp_path", _sharp_path)


def compose(overrides: Iterable[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the run config with Hydra's compose API (inside a running Hydra app or outside)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    register_method_configs()  # method.kwargs from the dataclasses; yaml-less (outside) methods
    if GlobalHydra.instance().is_initialized():
        return with_command_line(hydra_compose(config_name=config_name, overrides=overrides), overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return with_command_line(hydra_compose(config_name=config_name, overrides=overrides), overrides)


def with_command_line(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """``cfg`` with ``command_line``, the overrides it was composed from (which method kwargs a run SET
    is read from it; the summary records it)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.command_line = [str(o) for o in overrides]
    return cfg


def list_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def load_sweep(name: str) -> dict:
    path = SWEEP_DIR / f"{name}.yaml"
    if not path.is_file():
        raise HarnessError(f"unknown sweep {name!r}; accepted values: {', '.join(list_sweeps())} "
                           f"(files in {SWEEP_DIR})")
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format_retention(value) if 0 <= value <= 1 else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in " ,=+[]{}()'\"") :
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def cell_overrides(sweep: dict, index: int) -> list[str]:
    """Hydra overrides of cell ``index`` of a sweep (backbone, method, retention, tasks, ...)."""
    cells = sweep.get("cells") or []
    if not 0 <= int(index) < len(cells):
        raise HarnessError(f"cell={index} is out of range for sweep {sweep.get('name')!r}; "
                           f"accepted values: 0..{len(cells) - 1}")
    c = cells[int(index)]
    method = str(c["method"])
    # a method with a config of its own (a yaml, or generated for a registered method), else the generic
    # composition config ('+'-joined names)
    method_ov = ([f"method={method}"] if _has_method_config(method)
                 else ["method=compose", f"method.name={_override_value(method)}"])
    ov = [
        f"backbone={c.get('backbone', sweep.get('backbone'))}",
        *method_ov,
        f"retention={_override_value(float(c.get('retention', 1.0)))}",
        f"tasks={c.get('tasks', sweep.get('tasks'))}",
    ]
    if c.get("variant"):
        ov.append(f"variant={_override_value(str(c['variant']))}")
    for key, value in flatten_kwargs(c.get("method_kwargs") or {}):
        ov.append(f"+method_kwargs.{key}={_override_value(value)}")
    limit = c.get("limit", sweep.get("limit"))
    if limit is not None:
        ov.append(f"limit={limit}")
    return ov


def _has_method_config(name: str) -> bool:
    from sharp.methods import method_names

    return (CONFIG_DIR / "method" / f"{name}.yaml").is_file() or name in method_names()


def resolve_sweep_cell(cfg: DictConfig) -> DictConfig:
    """``sweep=<name> cell=<i>``: recompose with the cell's overrides on top of the other overrides."""
    sweep = cfg.get("sweep")
    if sweep is None or cfg.get("cell") is None:
        if cfg.get("cell") is not None:
            raise HarnessError("cell=<index> needs sweep=<name> (one of: " + ", ".join(list_sweeps()) + ")")
        return cfg
    sweep_dict = to_plain(sweep)
    cell_ov = cell_overrides(sweep_dict, int(cfg.cell))
    user = []
    try:
        from hydra.core.hydra_config import HydraConfig

        user = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not inside a Hydra app
        pass
    cell_keys = {o.split("=", 1)[0].lstrip("+") for o in cell_ov}
    keep = [o for o in user if o.split("=", 1)[0].lstrip("+~") not in cell_keys | {"sweep", "cell"}
            and not o.lstrip("+").startswith("method_kwargs.")]
    composed = compose(keep + cell_ov)
    OmegaConf.set_struct(composed, False)
    composed.sweep_cell = {"sweep": sweep_dict.get("name"), "cell": int(cfg.cell)}
    return composed


def to_plain(node: Any) -> Any:
    """A plain Python value of a config node (None stays None, a plain dict/list is returned as is)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def method_kwargs(cfg: DictConfig) -> dict:
    """The kwargs the user SET for the cell's method: the ``method.kwargs`` entries its command line
    names (``method.kwargs.llm_layer=18``, whatever the value; ``cfg.command_line``) merged with the run's
    ``method_kwargs`` (``+method_kwargs.sharp.lam=0.5`` changes one kwarg of the child ``sharp`` and keeps
    the others). ``method.kwargs`` itself lists every kwarg at its dataclass default (generated,
    :mod:`sharp.harness.method_configs`); what is not set is the method's defaults resolved for the
    backbone (``sharp.resolve_method``)."""
    configured = dict(to_plain(cfg.method.get("kwargs")) or {})
    explicit = explicit_method_kwargs(configured, cfg.get("command_line") or [])
    return deep_merge(explicit, dict(to_plain(cfg.get("method_kwargs")) or {}))


def method_name(cfg: DictConfig) -> str:
    from omegaconf.errors import MissingMandatoryValue

    try:
        name = cfg.method.name
    except MissingMandatoryValue:
        raise HarnessError("method=compose needs method.name=<method>+<method>, e.g. method=compose "
                           "method.name=fastv+sharp (registered methods joined by '+')") from None
    if name in (None, ""):
        raise HarnessError("method.name is empty; accepted values: a registered method or several joined by '+'")
    return str(name)


def cell_from_cfg(cfg: DictConfig) -> Cell:
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    from sharp.harness.checks import check_limit, check_retention

    limit = check_limit(cfg.get("limit"))
    name = method_name(cfg)
    try:
        raw_retention = cfg.retention
    except (MissingMandatoryValue, InterpolationResolutionError):
        raise HarnessError(f"method {name!r} has no default retention; pass retention=<a number in (0, 1]>") from None
    retention = check_retention(raw_retention, name)
    return Cell(
        backbone=str(cfg.backbone.name),
        method=name,
        retention=retention,
        tasks=[str(t) for t in cfg.tasks.names],
        variant=(str(cfg.variant) if cfg.get("variant") not in (None, "") else None),
        method_kwargs=method_kwargs(cfg),
        limit=limit,
        gen_kwargs=(str(cfg.gen_kwargs) if cfg.get("gen_kwargs") else None),
        backbone_overrides=dict(to_plain(cfg.backbone.get("overrides")) or {}),
    )


def results_root(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(str(cfg.results_dir))).resolve()


def include_paths(cfg: DictConfig) -> list[str]:
    return [str(p) for p in (cfg.tasks.get("include_path") or [])]


def sweep_cells(name: str, results_dir: Optional[str] = None) -> list[tuple[int, dict, Cell]]:
    """(index, raw cell dict, Cell) for every cell of a sweep, composed through Hydra."""
    sweep = load_sweep(name)
    out = []
    for i, raw in enumerate(sweep.get("cells") or []):
        cfg = compose(cell_overrides(sweep, i))
        out.append((i, raw, cell_from_cfg(cfg)))
    return out
