"""Run one cell through lmms-eval's ``simple_evaluate`` and write its results atomically."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import time

from omegaconf import DictConfig, OmegaConf

from sharp.harness import cells as C
from sharp.harness.catalog import backbone_family, check_backbone, check_method, lmms_method_ids
from sharp.harness.config import REPO_ROOT, cell_from_cfg, include_paths, resolve_sweep_cell, results_root
from sharp.harness.io import atomic_write_json, atomic_write_jsonl
from sharp.harness.resources import HarnessError, explain, preflight
from sharp.harness.summary import build_summary
from sharp.lmms.args import format_model_args

log = logging.getLogger("sharp.harness")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def ensure_registered(model_id: str) -> None:
    """Make our ids resolvable even in a checkout that was not ``pip install -e``-ed."""
    from lmms_eval import models

    try:
        models.MODEL_REGISTRY_V2.resolve(model_id)
    except ValueError:
        from sharp.lmms.manifest import register

        log.warning("lmms-eval has no entry point for %s (run `pip install -e .` to register the models "
                    "for lmms-eval's CLI); registering at runtime", model_id)
        register()


def validate_cell(cfg: DictConfig, cell: C.Cell) -> None:
    """Before anything is written: the backbone is registered (and its config agrees on the family),
    the method is implemented (not only planned) and accepts its kwargs."""
    check_backbone(cell.backbone, cfg.backbone.get("family"))
    check_method(cell.method)
    validate_method(cell)


def validate_method(cell: C.Cell) -> None:
    from sharp.methods import make_method

    if cell.method == "vanilla" and float(cell.retention) != 1.0:
        raise HarnessError(f"retention={cell.retention} with method=vanilla; accepted values: 1 "
                           "(vanilla keeps every visual token)")
    try:
        make_method(cell.method, cell.retention, **cell.method_kwargs)
    except (TypeError, ValueError) as err:
        raise HarnessError(str(err)) from None


def _sanitize_samples(samples: list[dict]) -> list[dict]:
    """lmms-eval's per-sample log format (as its EvaluationTracker writes it)."""
    out = []
    for s in samples:
        s = dict(s)
        args = s.pop("arguments", None) or []
        s["input"] = args[0] if args else None
        s.pop("doc", None)
        if isinstance(s.get("resps"), list) and len(s["resps"]) == 1:
            s["resps"] = s["resps"][0]
        if isinstance(s.get("filtered_resps"), list) and len(s["filtered_resps"]) == 1:
            s["filtered_resps"] = s["filtered_resps"][0]
        if s.get("resps") == s.get("filtered_resps") or s.get("resps") == [s.get("filtered_resps")]:
            s.pop("resps", None)
        s["target"] = str(s.get("target"))
        out.append(s)
    return out


def run_cell(cfg: DictConfig) -> dict:
    """Evaluate the cell described by ``cfg``; return its summary (or the finished one, skipped)."""
    cfg = resolve_sweep_cell(cfg)
    cell = cell_from_cfg(cfg)
    validate_cell(cfg, cell)
    root = results_root(cfg)
    out_dir = cell.dir(root)
    state, summary = C.status(cell, root)
    if state == "finished" and not cfg.get("overwrite"):
        print(f"[sharp] skip (finished): {out_dir}")
        return summary
    if state == "mismatch" and not cfg.get("overwrite"):
        diff = "\n  ".join(C.key_diff(summary.get("cell", {}), cell.key()))
        raise HarnessError(f"{out_dir} holds a finished cell with another configuration:\n  {diff}\n"
                           "Pass overwrite=true to replace it, or results_dir=... to write elsewhere.")
    hub_id = cfg.backbone.get("hub_id")
    missing = preflight(cell.backbone, cell.tasks, hub_id=hub_id)
    for m in missing:
        log.warning("not in the local cache, lmms-eval/transformers will download it: %s %s (%s)", m.what, m.name, m.detail)

    out_dir.mkdir(parents=True, exist_ok=True)
    if summary is not None:  # overwrite=true: the old summary goes first, so no stale cell counts as finished
        os.unlink(out_dir / C.SUMMARY)
    removed = C.clear_partial(out_dir)
    if removed:
        log.info("removed the files of an interrupted run: %s", removed)
    started, t0 = _now(), time.time()
    atomic_write_json(out_dir / C.RUN_MARKER, {"cell": cell.key(), "host": socket.gethostname(), "pid": os.getpid(),
                                               "started": started})
    print(f"[sharp] running {cell.backbone} {cell.method} r={cell.retention:g} tasks={','.join(cell.tasks)} -> {out_dir}")

    try:
        results, requests = _evaluate(cfg, cell)
    except HarnessError:
        raise
    except Exception as err:  # noqa: BLE001
        explained = explain(err, cell.backbone, cell.tasks, hub_id=hub_id)
        if explained is not None:
            raise explained from None
        raise

    samples = results.pop("samples", None) or {}
    files = {"results": C.RESULTS, "requests": C.REQUESTS, "samples": {}}
    for task, rows in sorted(samples.items()):
        name = f"samples_{task}.jsonl"
        atomic_write_jsonl(out_dir / name, _sanitize_samples(rows))
        files["samples"][task] = name
    atomic_write_json(out_dir / C.RESULTS, results)
    atomic_write_jsonl(out_dir / C.REQUESTS, requests)
    summary = build_summary(
        cell_key=cell.key(), config=OmegaConf.to_container(cfg, resolve=True), results=results, samples=samples,
        requests=requests, repo=str(REPO_ROOT), files=files, started=started, finished=_now(),
        wall_s=time.time() - t0,
        extra={"model": {"lmms_eval_model": _model_id(cfg, cell), "model_args": _model_kwargs(cfg, cell),
                         "model_args_string": format_model_args(_model_kwargs(cfg, cell))}},
    )
    atomic_write_json(out_dir / C.SUMMARY, summary)  # last: marks the cell finished
    try:
        os.unlink(out_dir / C.RUN_MARKER)
    except FileNotFoundError:
        pass
    print(f"[sharp] finished: {out_dir / C.SUMMARY}")
    return summary


def _generic(cell: C.Cell) -> bool:
    """Composed names (``fastv+sharp``) have no per-method id: the generic id gets ``method=``."""
    return cell.method not in lmms_method_ids()


def _model_id(cfg: DictConfig, cell: C.Cell) -> str:
    from sharp.lmms.manifest import FAMILIES

    family = backbone_family(cell.backbone)
    return FAMILIES[family][0] if _generic(cell) else f"{family}_{cell.method}"


def _model_kwargs(cfg: DictConfig, cell: C.Cell) -> dict:
    kwargs = {"backbone": cell.backbone, **({"method": cell.method} if _generic(cell) else {}),
              "retention": cell.retention, "batch_size": cfg.get("batch_size", 1), **cell.method_kwargs}
    kwargs.update(cell.backbone_overrides)
    if cfg.get("device"):
        kwargs["device"] = str(cfg.device)
    if cfg.get("seed") is not None:
        kwargs["seed"] = int(cfg.seed)
    return kwargs


def _evaluate(cfg: DictConfig, cell: C.Cell) -> tuple[dict, list[dict]]:
    from lmms_eval import evaluator, models
    from lmms_eval.tasks import TaskManager

    from sharp.lmms.models import SharpVideoLMM

    model_id = _model_id(cfg, cell)
    ensure_registered(model_id)
    cls = models.get_model(model_id)
    lm: SharpVideoLMM = cls(**_model_kwargs(cfg, cell))
    tm = TaskManager("WARNING", include_path=include_paths(cfg) or None, model_name=cls.builtin_name or model_id)
    unknown = [t for t in cell.tasks if t not in tm.all_tasks]
    if unknown:
        raise HarnessError(f"unknown lmms-eval task(s) {unknown}; include_path={include_paths(cfg)}. "
                           "Check tasks=... (configs/tasks/) and the task's include_path.")
    results = evaluator.simple_evaluate(
        model=lm, tasks=list(cell.tasks), batch_size=1, limit=cell.limit, log_samples=bool(cfg.log_samples),
        task_manager=tm, gen_kwargs=cell.gen_kwargs, random_seed=int(cfg.seed), numpy_random_seed=int(cfg.seed),
        torch_random_seed=int(cfg.seed), fewshot_random_seed=int(cfg.seed), bootstrap_iters=int(cfg.get("bootstrap_iters", 1000)),
        verbosity="WARNING",
    )
    if results is None:  # non-zero rank in a distributed run
        raise HarnessError("simple_evaluate returned no results (not rank 0?)")
    results.setdefault("config", {})["model_args"] = _model_kwargs(cfg, cell)
    results["config"]["model"] = model_id
    if lm.failed_requests:
        log.warning("%d request(s) failed to decode their video and were answered ''", lm.failed_requests)
    return results, list(lm.request_stats)
