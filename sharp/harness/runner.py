"""Run one cell through lmms-eval's ``simple_evaluate`` and write its results atomically."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import time

from omegaconf import DictConfig, OmegaConf

from pathlib import Path
from typing import Optional, Sequence

from sharp.harness import cells as C
from sharp.harness import parallel
from sharp.harness.catalog import backbone_family, check_backbone, check_method, lmms_method_ids
from sharp.harness.checks import RunOptions, check_retention, run_options
from sharp.harness.config import (REPO_ROOT, cell_from_cfg, include_paths, resolve_sweep_cell, results_root,
                                  with_command_line)
from sharp.harness.io import atomic_write_json, atomic_write_jsonl
from sharp.harness.resources import HarnessError, explain, preflight
from sharp.harness.report import format_report
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


def validate_cell(cfg: DictConfig, cell: C.Cell):
    """Before anything is loaded or written: the run options are valid, the backbone is registered (and
    its config agrees on the family), the method is implemented (not only planned), accepts its kwargs
    and acts on layers the backbone has. Returns the run options and the resolved method (or None)."""
    options = run_options(cfg)
    check_backbone(cell.backbone, cfg.backbone.get("family"))
    check_method(cell.method)
    return options, validate_method(cell)


def validate_method(cell: C.Cell):
    """The cell's method resolved for its backbone (``sharp.resolve_method``: depth-mapped layers,
    automatic positions, the config's per-backbone values, the user's kwargs), or None for a backbone
    loaded from another checkpoint (its depth is known once it loads; the kwargs are checked here)."""
    from sharp.methods import make_method
    from sharp.methods.settings import BackboneFacts, resolve_method

    retention = check_retention(cell.retention, cell.method)
    if cell.method == "vanilla" and retention != 1.0:
        raise HarnessError(f"retention={cell.retention} with method=vanilla; accepted values: 1 "
                           "(vanilla keeps every visual token)")
    try:
        if "checkpoint" in cell.backbone_overrides:
            make_method(cell.method, retention, **cell.method_kwargs)
            return None
        return resolve_method(cell.method, cell.backbone, retention, **cell.method_kwargs)
    except (TypeError, ValueError) as err:
        if "checkpoint" in cell.backbone_overrides:
            raise HarnessError(str(err)) from None
        depth = BackboneFacts.of(cell.backbone).num_layers
        raise HarnessError(f"method {cell.method!r} on {cell.backbone} ({depth} decoder layers): {err}") from None


def _sanitize_samples(samples: list[dict], failures: Optional[dict] = None) -> list[dict]:
    """lmms-eval's per-sample log format (as its EvaluationTracker writes it), in doc_id order, with the
    reason of a failed request under ``failed`` (its answer was '')."""
    out = []
    for s in sorted(samples, key=lambda r: (r.get("doc_id") if isinstance(r.get("doc_id"), int) else -1)):
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
        if failures and s.get("doc_id") in failures:
            s["failed"] = failures[s["doc_id"]]
        out.append(s)
    return out


def _print(text: str) -> None:
    print(text, flush=True)


def report(summary: dict, out_dir: Path) -> None:
    """The score table at the end of a run (or of a skipped, finished cell)."""
    _print(format_report(summary, str(out_dir / C.SUMMARY)))


def run_cell(cfg: DictConfig, overrides: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Evaluate the cell described by ``cfg``; return its summary (or the finished one, skipped).

    ``overrides``: the command line's Hydra overrides, needed to start ``num_processes`` > 1 copies of
    ``run.py`` (see :mod:`sharp.harness.parallel`). In a data-parallel child, ranks other than 0
    return None."""
    if overrides is not None and not cfg.get("command_line"):
        cfg = with_command_line(cfg, overrides)
    cfg = resolve_sweep_cell(cfg)
    cell = cell_from_cfg(cfg)
    options, resolved = validate_cell(cfg, cell)
    w = parallel.world()
    if options.num_processes > 1 and not w.parallel:
        return _run_parallel(cfg, cell, options, overrides)
    if w.main and resolved is not None:  # before weights or data are looked for: a run that stops there shows them
        _print(f"[sharp] settings: {resolved.describe()}")
    root = results_root(cfg)
    out_dir = cell.dir(root)
    hub_id = cfg.backbone.get("hub_id")
    missing = preflight(cell.backbone, cell.tasks, hub_id=hub_id, method=cell.method)
    if w.main:
        for m in missing:
            log.warning("not in the local cache, lmms-eval/transformers will download it: %s %s (%s)", m.what, m.name, m.detail)
    state, summary = C.status(cell, root)
    if w.parallel:  # every rank decides on the same state before rank 0 changes the folder
        parallel.init_group(cpu=_cpu(options))
        parallel.barrier(w)
    if state == "finished" and not cfg.get("overwrite"):
        if w.main:
            _print(f"[sharp] skip (finished): {out_dir}")
            if not parallel.has_parent():
                report(summary, out_dir)
        return summary
    if state == "mismatch" and not cfg.get("overwrite"):
        diff = "\n  ".join(C.key_diff(summary.get("cell", {}), cell.key()))
        raise HarnessError(f"{out_dir} holds a finished cell with another configuration:\n  {diff}\n"
                           "Pass overwrite=true to replace it, or results_dir=... to write elsewhere.")

    started, t0 = _now(), time.time()
    if w.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if summary is not None:  # overwrite=true: the old summary goes first, so no stale cell counts as finished
            os.unlink(out_dir / C.SUMMARY)
        removed = C.clear_partial(out_dir)
        if removed:
            log.info("removed the files of an interrupted run: %s", removed)
        atomic_write_json(out_dir / C.RUN_MARKER, {"cell": cell.key(), "host": socket.gethostname(), "pid": os.getpid(),
                                                   "started": started, "processes": w.size})
        _print(f"[sharp] running {cell.backbone} {cell.method} r={cell.retention:g} tasks={','.join(cell.tasks)}"
               + (f" batch={options.batch_size}" if options.batch_size > 1 else "")
               + (f" processes={w.size}" if w.parallel else "") + f" -> {out_dir}")

    try:
        results, requests, busy_s = _evaluate(cfg, cell, options, w)
    except HarnessError:
        raise
    except Exception as err:  # noqa: BLE001
        explained = explain(err, cell.backbone, cell.tasks, hub_id=hub_id)
        if explained is not None:
            raise explained from None
        raise
    if not w.main:
        return None

    samples = results.pop("samples", None) or {}
    failures: dict[str, dict] = {}
    for r in requests:
        if "failed" in r:
            failures.setdefault(str(r.get("task")), {})[r.get("doc_id")] = r["failed"]
    files = {"results": C.RESULTS, "requests": C.REQUESTS, "samples": {}}
    for task, rows in sorted(samples.items()):
        name = f"samples_{task}.jsonl"
        atomic_write_jsonl(out_dir / name, _sanitize_samples(rows, failures.get(task)))
        files["samples"][task] = name
    atomic_write_json(out_dir / C.RESULTS, results)
    atomic_write_jsonl(out_dir / C.REQUESTS, requests)
    n_ok = sum("failed" not in r for r in requests)
    slowest = max(busy_s) if busy_s else None
    summary = build_summary(
        cell_key=cell.key(), config=OmegaConf.to_container(cfg, resolve=True), results=results, samples=samples,
        requests=requests, repo=str(REPO_ROOT), files=files, started=started, finished=_now(),
        wall_s=time.time() - t0,
        extra={"method_settings": _settings(resolved),
               "model": {"lmms_eval_model": _model_id(cfg, cell), "model_args": _model_kwargs(cfg, cell, options),
                         "model_args_string": format_model_args(_model_kwargs(cfg, cell, options))},
               "run": {"batch_size": options.batch_size, "num_processes": w.size, "strict": options.strict},
               "throughput": {"requests_per_s": (len(requests) / slowest) if slowest else None,
                              "answered_per_s": (n_ok / slowest) if slowest else None,
                              "generate_until_s": busy_s}},
    )
    atomic_write_json(out_dir / C.SUMMARY, summary)  # last: marks the cell finished
    try:
        os.unlink(out_dir / C.RUN_MARKER)
    except FileNotFoundError:
        pass
    _print(f"[sharp] finished: {out_dir / C.SUMMARY}")
    if summary["failed_requests"]:
        log.warning("%d of %d request(s) failed (their video could not be used) and were answered '': see "
                    "'failures' in %s", summary["failed_requests"], summary["requests"], out_dir / C.SUMMARY)
    if not parallel.has_parent():
        report(summary, out_dir)
    return summary


def _settings(resolved) -> Optional[dict]:
    """What the summary records of the method that ran: every kwarg on this backbone and what differs
    from the paper's 7B defaults (None for a backbone loaded from another checkpoint: see the log)."""
    if resolved is None:
        return None
    return {"kwargs": resolved.settings, "changes": resolved.changes, "num_layers": resolved.backbone.num_layers}


def _cpu(options: RunOptions) -> bool:
    import torch

    return options.device == "cpu" or not torch.cuda.is_available()


def _run_parallel(cfg: DictConfig, cell: C.Cell, options: RunOptions, overrides: Optional[Sequence[str]]) -> dict:
    """``num_processes`` > 1 without a launcher: skip a finished cell, else start the copies of run.py
    (same overrides) and print the table of the summary rank 0 wrote."""
    root = results_root(cfg)
    out_dir = cell.dir(root)
    state, summary = C.status(cell, root)
    if state == "finished" and not cfg.get("overwrite"):
        _print(f"[sharp] skip (finished): {out_dir}")
        report(summary, out_dir)
        return summary
    if state == "mismatch" and not cfg.get("overwrite"):
        diff = "\n  ".join(C.key_diff(summary.get("cell", {}), cell.key()))
        raise HarnessError(f"{out_dir} holds a finished cell with another configuration:\n  {diff}\n"
                           "Pass overwrite=true to replace it, or results_dir=... to write elsewhere.")
    preflight(cell.backbone, cell.tasks, hub_id=cfg.backbone.get("hub_id"), method=cell.method)
    if overrides is None:
        raise HarnessError(f"num_processes={options.num_processes} starts copies of run.py with the command line's "
                           "overrides: run it as `python run.py ... num_processes=N` (or under accelerate launch)")
    parallel.launch([str(REPO_ROOT / "run.py"), *overrides], options.num_processes)
    summary = C.read_summary(out_dir)
    if summary is None:
        raise HarnessError(f"the {options.num_processes} processes finished but wrote no {out_dir / C.SUMMARY}")
    report(summary, out_dir)
    return summary


def _generic(cell: C.Cell) -> bool:
    """Composed names (``fastv+sharp``) have no per-method id: the generic id gets ``method=``."""
    return cell.method not in lmms_method_ids()


def _model_id(cfg: DictConfig, cell: C.Cell) -> str:
    from sharp.lmms.manifest import FAMILIES

    family = backbone_family(cell.backbone)
    return FAMILIES[family][0] if _generic(cell) else f"{family}_{cell.method}"


def _model_kwargs(cfg: DictConfig, cell: C.Cell, options: Optional[RunOptions] = None) -> dict:
    """The wrapper's arguments (recorded as ``--model_args`` so a cell can be rerun through lmms-eval's CLI)."""
    options = options or RunOptions(batch_size=int(cfg.get("batch_size") or 1))
    kwargs = {"backbone": cell.backbone, **({"method": cell.method} if _generic(cell) else {}),
              "retention": cell.retention, "batch_size": options.batch_size, **cell.method_kwargs}
    kwargs.update(cell.backbone_overrides)
    if cfg.get("device"):
        kwargs["device"] = str(cfg.device)
    if cfg.get("seed") is not None:
        kwargs["seed"] = int(cfg.seed)
    if options.strict:
        kwargs["strict"] = True
    return kwargs


def _evaluate(cfg: DictConfig, cell: C.Cell, options: RunOptions,
              w: parallel.World) -> tuple[Optional[dict], Optional[list[dict]], Optional[list[float]]]:
    """simple_evaluate with our wrapper; on rank 0: (results, per-request rows of every rank in (task, doc_id)
    order, each rank's seconds in generate_until); on other ranks (None, None, None)."""
    from lmms_eval import evaluator, models
    from lmms_eval.tasks import TaskManager

    from sharp.lmms.models import SharpVideoLMM

    model_id = _model_id(cfg, cell)
    ensure_registered(model_id)
    cls = models.get_model(model_id)
    tm = TaskManager("WARNING", include_path=include_paths(cfg) or None, model_name=cls.builtin_name or model_id)
    unknown = [t for t in cell.tasks if t not in tm.all_tasks]
    if unknown:
        raise HarnessError(f"unknown lmms-eval task(s) {unknown}; include_path={include_paths(cfg)}. "
                           "Check tasks=... (configs/tasks/) and the task's include_path.")
    lm: SharpVideoLMM = cls(**_model_kwargs(cfg, cell, options))
    results = evaluator.simple_evaluate(
        model=lm, tasks=list(cell.tasks), batch_size=options.batch_size, limit=cell.limit,
        log_samples=bool(cfg.log_samples), task_manager=tm, gen_kwargs=cell.gen_kwargs, random_seed=int(cfg.seed),
        numpy_random_seed=int(cfg.seed), torch_random_seed=int(cfg.seed), fewshot_random_seed=int(cfg.seed),
        bootstrap_iters=int(cfg.get("bootstrap_iters", 1000)), verbosity="WARNING",
    )
    rows = parallel.gather_rows(lm.request_stats, w)
    busy = parallel.gather_rows([lm.busy_s], w)
    if not w.main:
        return None, None, None
    if results is None:
        raise HarnessError("simple_evaluate returned no results on rank 0")
    results.setdefault("config", {})["model_args"] = _model_kwargs(cfg, cell, options)
    results["config"]["model"] = model_id
    return results, parallel.sort_requests(rows), busy
