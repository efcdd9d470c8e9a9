"""Run the cells of a sweep (configs/sweep/<name>.yaml): locally one after another, or one SLURM job per
cell through Hydra's submitit launcher. Finished cells are skipped, and so are cells whose method is
not implemented yet (its config is marked planned; see :mod:`sharp.harness.catalog`): the dry run
marks them "not implemented" and the summary line counts them."""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from sharp.harness import cells as C
from sharp.harness.catalog import NOT_IMPLEMENTED, method_status
from sharp.harness.config import REPO_ROOT, cell_from_cfg, cell_overrides, compose, list_sweeps, load_sweep
from sharp.harness.resources import HarnessError

RUN_PY = REPO_ROOT / "run.py"


def _quote(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def plan(name: str, results_dir: str, limit: Optional[int] = None, only: Optional[list[int]] = None,
         extra: Sequence[str] = ()) -> list[dict]:
    """One entry per cell: index, Cell (composed with the extra overrides), status, run.py overrides."""
    sweep = load_sweep(name)
    rows = []
    for i, _raw in enumerate(sweep.get("cells") or []):
        if only is not None and i not in only:
            continue
        overrides = cell_overrides(sweep, i)
        if limit is not None:
            overrides = [o for o in overrides if not o.startswith("limit=")] + [f"limit={limit}"]
        replaced = {o.split("=", 1)[0] for o in extra if "=" in o}  # e.g. backbone=qwen2_5_vl_7b: the grid on another backbone
        overrides = [o for o in overrides if o.split("=", 1)[0] not in replaced] + list(extra)
        cfg_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
        cell = cell_from_cfg(compose(cfg_overrides))
        state, _ = C.status(cell, results_dir)
        note = None
        if state != "finished":  # a finished cell's results count, whoever produced them
            method_state, note = method_status(cell.method)
            if method_state == "planned":
                state = NOT_IMPLEMENTED
        rows.append({"index": i, "cell": cell, "status": state, "note": note,
                     "overrides": overrides + [f"results_dir={results_dir}"]})
    return rows


def runnable(row: dict) -> bool:
    return row["status"] not in ("finished", NOT_IMPLEMENTED)


def local_command(row: dict, python: str = sys.executable, display: bool = False) -> list[str]:
    return [python, "run.py" if display else str(RUN_PY), *row["overrides"]]


def _label(status: str) -> str:
    return {"missing": "todo"}.get(status, status)


def _line(row: dict, what: str) -> str:
    """``[ i] <status>  <what>``; a not-implemented cell shows its folder and why, never a command."""
    if row["status"] == NOT_IMPLEMENTED:
        return f"[{row['index']:2d}] {NOT_IMPLEMENTED}  {row['cell'].relpath()}  # planned: {row.get('note')}"
    return f"[{row['index']:2d}] {_label(row['status']):<9} {what}"


def _counts(rows: list[dict]) -> str:
    done = sum(r["status"] == "finished" for r in rows)
    todo = sum(runnable(r) for r in rows)
    text = f"{len(rows)} cells, {done} finished, {todo} to run"
    skipped = len(rows) - done - todo
    if skipped:
        text += f", {skipped} {NOT_IMPLEMENTED} (method planned, skipped)"
    return text


def cell_status_line(row: dict, rc: int, seconds: float, results_dir: str) -> str:
    """``[ i] finished in 44s: sharp_synthetic 95.5, 0/200 failed requests -> <dir>`` or ``[ i] FAILED ...``."""
    head = f"[{row['index']:2d}]"
    if rc != 0:
        return f"{head} FAILED (exit {rc}) after {seconds:.0f}s: {row['cell'].relpath()} (its error is above; rerun the sweep to retry)"
    summary = C.read_summary(row["cell"].dir(results_dir)) or {}
    scores = summary.get("scores") or {}
    shown = ", ".join(f"{k} {v:.1f}" for k, v in scores.items() if isinstance(v, (int, float)))
    avg = summary.get("avg_score")
    if avg is not None:
        shown += f", avg {avg:.1f}"
    return (f"{head} finished in {seconds:.0f}s: {shown or 'no scores'}, {summary.get('failed_requests', 0)}/"
            f"{summary.get('requests', 0)} failed requests -> {row['cell'].dir(results_dir)}")


def launcher_problem(launcher: str) -> Optional[str]:
    """Why ``--slurm --launcher <launcher>`` cannot submit from this machine (None when it can)."""
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return ("--slurm needs Hydra's submitit launcher: pip install hydra-submitit-launcher "
                "(or run the sweep locally, without --slurm)")
    if launcher == "slurm" and shutil.which("sbatch") is None:
        return ("--slurm: SLURM is not available here (no sbatch on PATH); for a local try of the same jobs "
                "use --slurm --launcher submitit_local, or run the sweep without --slurm")
    return None


def slurm_command(name: str, rows: list[dict], results_dir: str, limit: Optional[int], extra: Sequence[str],
                  launcher: str = "slurm", python: str = sys.executable) -> list[str]:
    indices = ",".join(str(r["index"]) for r in rows)
    cmd = [python, str(RUN_PY), "--multirun", f"hydra/launcher={launcher}", f"sweep={name}", f"cell={indices}",
           f"results_dir={results_dir}"]
    if limit is not None:
        cmd.append(f"limit={limit}")
    return cmd + list(extra)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="sweep.py", description="Run the cells of configs/sweep/<SWEEP>.yaml (finished cells are skipped).",
        epilog="Extra arguments (key=value) are passed to run.py as Hydra overrides, e.g. "
               "hydra.launcher.partition=gpu or backbone.overrides.attn_implementation=flash_attention_2.")
    ap.add_argument("sweep", help="sweep name: " + ", ".join(list_sweeps()))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every cell")
    ap.add_argument("--dry-run", action="store_true", help="print one line per cell with the command, run nothing")
    ap.add_argument("--slurm", action="store_true", help="submit one job per unfinished cell (Hydra submitit launcher)")
    ap.add_argument("--launcher", default="slurm", help="Hydra launcher config for --slurm (default: slurm; "
                    "submitit_local runs the jobs on this machine)")
    ap.add_argument("--results-dir", default="results", help="results root (default: results)")
    ap.add_argument("--limit", type=int, default=None, help="samples per task (smoke runs)")
    ap.add_argument("--only", default=None, help="comma-separated cell indices")
    args = ap.parse_intermixed_args(argv)

    results_dir = str(Path(args.results_dir).expanduser().resolve())
    only = [int(x) for x in args.only.split(",")] if args.only else None
    try:
        rows = plan(args.sweep, results_dir, args.limit, only, args.overrides)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    todo = [r for r in rows if runnable(r)]
    planned = [r for r in rows if r["status"] == NOT_IMPLEMENTED]
    sweep = load_sweep(args.sweep)
    name = sweep.get("name", args.sweep)

    if args.slurm:
        problem = launcher_problem(args.launcher) if not args.dry_run and todo else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        cmd = slurm_command(args.sweep, todo, results_dir, args.limit, args.overrides, args.launcher)
        if args.dry_run:
            for r in rows:
                print(_line(r, str(r["cell"].relpath())))
            print(f"# {name}: {_counts(rows)}; submit with:")
            print(_quote(cmd) if todo else "# nothing to submit")
            return 0
        if not todo:
            print(f"{name}: nothing to submit ({_counts(rows)})")
            return 0
        print(f"submitting {len(todo)} cell(s): {_quote(cmd)}", flush=True)
        if planned:
            print(f"skipped {len(planned)} {NOT_IMPLEMENTED} cell(s): {[r['index'] for r in planned]}", flush=True)
        return subprocess.call(cmd, cwd=str(REPO_ROOT))

    if args.dry_run:
        for r in rows:
            print(_line(r, _quote(local_command(r, "python", display=True))))
        print(f"# {name}: {_counts(rows)}")
        return 0

    failed = []
    for r in rows:
        if r["status"] == "finished":
            print(f"[{r['index']:2d}] skip (finished) {r['cell'].relpath()}", flush=True)
            continue
        if r["status"] == NOT_IMPLEMENTED:
            print(f"[{r['index']:2d}] skip ({NOT_IMPLEMENTED}) {r['cell'].relpath()}  # planned: {r['note']}", flush=True)
            continue
        print(f"[{r['index']:2d}] run {_quote(local_command(r, 'python', display=True))}", flush=True)
        t0 = time.time()
        rc = subprocess.call(local_command(r), cwd=str(REPO_ROOT))
        print(cell_status_line(r, rc, time.time() - t0, results_dir), flush=True)
        if rc != 0:
            failed.append(r["index"])
    ran = len(todo)
    print(f"# {name}: {len(rows)} cells: {ran - len(failed)} ran, {len(failed)} failed, "
          f"{sum(r['status'] == 'finished' for r in rows)} skipped (finished), "
          f"{len(planned)} skipped ({NOT_IMPLEMENTED})", flush=True)
    if failed:
        print(f"{len(failed)} cell(s) failed: {failed} (rerun the sweep to retry them)", file=sys.stderr)
        return 1
    return 0
