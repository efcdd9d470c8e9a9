"""Gather finished cells into the layout of the paper's Tables 1-5, with the paper's numbers beside ours.

The rows of table N are the cells of ``configs/sweep/tableN.yaml`` (in the paper's order); the paper's
numbers are ``results/paper/*.csv``. Every row is kept: a cell without results shows ``—`` and its
status (``missing``, ``partial``, ``differs: ...`` for a finished cell run with another config, or
``not implemented`` when its method is only planned, see :mod:`sharp.harness.catalog`).
A finished cell with failed requests (videos that could not be used, answered '') says so in its status
(``finished (3 failed requests)``) and in the CSV's ``failed_requests`` column.
Outputs: Markdown (``ours / paper (diff)`` per metric) and CSV (``col``, ``col_paper``, ``col_diff``).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sharp.harness import cells as C
from sharp.harness.catalog import NOT_IMPLEMENTED, method_status
from sharp.harness.config import REPO_ROOT, cell_from_cfg, cell_overrides, compose, load_sweep
from sharp.harness.resources import HarnessError

BENCH = ("mvbench", "longvideobench", "mlvu", "videomme")
VMME = ("videomme_short", "videomme_medium", "videomme_long")

# table -> (title, key columns, metric columns, benchmark columns averaged into avg_score)
LAYOUTS: dict[int, dict[str, Any]] = {
    1: dict(title="Table 1: LLaVA-OneVision-7B, methods grouped by matched TFLOPs",
            keys=("method", "retention"), metrics=("tflops", *BENCH, *VMME, "avg_score", "avg_pct"), avg=BENCH),
    2: dict(title="Table 2: Qwen2-VL-7B, methods grouped by matched TFLOPs",
            keys=("method", "retention"),
            metrics=("tokens_in", "tokens_kept", "tflops", "mvbench", "longvideobench", "videomme", *VMME,
                     "avg_score", "avg_pct"),
            avg=("mvbench", "longvideobench", "videomme")),
    3: dict(title="Table 3: ShaRP inside VisionZip and HoliTom (LLaVA-OneVision-7B)",
            keys=("method", "retention"), metrics=("tflops", *BENCH, "avg_score"), avg=BENCH),
    4: dict(title="Table 4: prefill efficiency of ShaRP (LLaVA-OneVision-7B; latency on VideoMME)",
            keys=("method", "retention"),
            metrics=("tflops", "tflops_pct", "attn_ms", "filter_ms", "dedup_ms", "fill_ms", "llm_forward_ms",
                     "total_ms", "speedup", "avg_score", "avg_pct"), avg=BENCH),
    5: dict(title="Table 5: ShaRP ablation at 23.5% retention (LLaVA-OneVision-7B)",
            keys=("variant", "posc", "segm", "regd"), metrics=(*BENCH, "avg_score"), avg=BENCH),
}
MISSING = "—"


@dataclass
class Row:
    index: int
    cell: C.Cell
    raw: dict
    status: str
    summary: Optional[dict]
    paper: Optional[dict]
    keys: dict = field(default_factory=dict)
    ours: dict = field(default_factory=dict)


def _num(v: Any) -> Optional[float]:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _same(a: Any, b: Any) -> bool:
    fa, fb = _num(a), _num(b)
    if fa is not None and fb is not None:
        return abs(fa - fb) < 1e-9
    return str(a).strip() == str(b).strip()


def read_paper(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def find_paper_row(paper: list[dict], filters: dict) -> Optional[dict]:
    for row in paper:
        if all(k in row and _same(row[k], v) for k, v in filters.items()):
            return row
    return None


def _status_of(cell: C.Cell, results_dir: str | Path) -> tuple[str, Optional[dict]]:
    state, summary = C.status(cell, results_dir)
    if state != "finished" and method_status(cell.method)[0] == "planned":
        return NOT_IMPLEMENTED, None  # results of a finished cell count, whoever produced them
    if state == "mismatch":
        diff = [d.split(":")[0] for d in C.key_diff(summary.get("cell", {}), cell.key())]
        state = "differs: " + ",".join(diff)
    return state, summary


def _ours(table: int, sweep: dict, summary: Optional[dict]) -> dict:
    if summary is None:
        return {}
    scores = summary.get("scores") or {}
    out: dict[str, Any] = {k: scores.get(k) for k in (*BENCH, *VMME)}
    vals = [scores.get(c) for c in LAYOUTS[table]["avg"]]
    out["avg_score"] = sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None
    out["tflops"] = (summary.get("tflops") or {}).get("prefill_mean")
    tokens = summary.get("tokens") or {}
    out["tokens_in"] = tokens.get("visual_before")
    out["tokens_kept"] = tokens.get("visual_after")
    if table == 4:
        task = sweep.get("latency_task")
        block = (summary.get("per_task") or {}).get(task) or summary
        stage = block.get("stage_ms") or {}
        total = (block.get("latency_ms") or {}).get("prefill_mean")
        used = 0.0
        for col, names in (sweep.get("stage_columns") or {}).items():
            values = [stage[n] for n in names if isinstance(stage.get(n), (int, float))]
            out[col] = sum(values) if values else None
            used += sum(values)
        out["total_ms"] = total
        fwd = stage.get(sweep.get("forward_key") or "")
        out["llm_forward_ms"] = fwd if isinstance(fwd, (int, float)) else ((total - used) if total is not None else None)
        if task and task in (summary.get("per_task") or {}):
            out["latency_task"] = task
    return out


def build(table: int, results_dir: str | Path = "results") -> tuple[dict, list[Row]]:
    if table not in LAYOUTS:
        raise HarnessError(f"--table {table}: accepted values: {', '.join(map(str, LAYOUTS))}")
    sweep = load_sweep(f"table{table}")
    paper = read_paper(sweep["paper_csv"])
    rows = []
    for i, raw in enumerate(sweep["cells"]):
        cell = cell_from_cfg(compose(cell_overrides(sweep, i)))
        state, summary = _status_of(cell, results_dir)
        filters = raw.get("paper") or {"method": raw["method"], "retention": raw.get("retention", 1.0)}
        prow = find_paper_row(paper, filters)
        keys = {"method": C.method_dirname(cell.method, cell.variant), "retention": cell.retention}
        if table == 5:
            mk = cell.method_kwargs
            keys = {"variant": raw.get("variant") or "sharp",
                    **{f: (prow or {}).get(f, int(bool(mk.get(f, True)))) for f in ("posc", "segm", "regd")}}
        if table == 3 and prow:
            keys["retention"] = prow.get("retention")
        rows.append(Row(i, cell, raw, state, summary, prow, keys, _ours(table, sweep, summary)))
    # relative columns need the table's own reference rows
    if table in (1, 2, 4):
        ref = next((r for r in rows if r.cell.method == "vanilla"), None)
        ref_avg = ref.ours.get("avg_score") if ref else None
        for r in rows:
            a = r.ours.get("avg_score")
            r.ours["avg_pct"] = 100.0 * a / ref_avg if a is not None and ref_avg else None
        if table == 4 and ref:
            for r in rows:
                tf, rtf = r.ours.get("tflops"), ref.ours.get("tflops")
                r.ours["tflops_pct"] = 100.0 * tf / rtf if tf is not None and rtf else None
                tot, rtot = r.ours.get("total_ms"), ref.ours.get("total_ms")
                r.ours["speedup"] = rtot / tot if tot and rtot else None
    return sweep, rows


def _failed(r: Row) -> Optional[int]:
    """Requests of a finished cell whose video could not be used (answered '', scored as wrong)."""
    if r.summary is None or r.status != "finished":
        return None
    n = r.summary.get("failed_requests")
    return int(n) if isinstance(n, (int, float)) else None


def _fmt(v: Optional[float], col: str) -> str:
    if v is None:
        return MISSING
    if col.startswith("tokens"):
        return f"{v:.0f}"
    if col == "tflops":
        return f"{v:.3g}" if v < 100 else f"{v:.1f}"
    if col == "speedup":
        return f"{v:.1f}x"
    return f"{v:.1f}"


def _diff(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours - paper


def to_records(table: int, rows: list[Row]) -> list[dict]:
    layout = LAYOUTS[table]
    records = []
    for r in rows:
        rec: dict[str, Any] = {"cell": str(r.cell.relpath()), "status": r.status,
                               "failed_requests": _failed(r)}
        rec.update(r.keys)
        if "group" in r.raw:
            rec["group_tflops"] = r.raw["group"]
        for col in layout["metrics"]:
            ours = _num(r.ours.get(col))
            paper = _num((r.paper or {}).get(col))
            rec[col] = ours
            rec[f"{col}_paper"] = paper
            rec[f"{col}_diff"] = _diff(ours, paper)
        records.append(rec)
    return records


def to_csv(table: int, rows: list[Row]) -> str:
    records = to_records(table, rows)
    buf = io.StringIO()
    if records:
        writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    return buf.getvalue()


def to_markdown(table: int, sweep: dict, rows: list[Row], results_dir: str | Path) -> str:
    layout = LAYOUTS[table]
    keys = list(rows[0].keys) if rows else list(layout["keys"])
    header = keys + list(layout["metrics"]) + ["status"]
    lines = [f"## {layout['title']}", "",
             f"Each metric: ours / paper (ours - paper); {MISSING} = not run yet. Results: `{results_dir}`, "
             f"cells: `configs/sweep/table{table}.yaml`, paper: `{sweep['paper_csv']}`.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    last_group = None
    for r in rows:
        group = r.raw.get("group")
        if group is not None and group != last_group:
            lines.append("| " + " | ".join([f"*{group} TFLOPs (paper)*"] + [""] * (len(header) - 1)) + " |")
        last_group = group
        cells = [str(r.keys.get(k)) if not isinstance(r.keys.get(k), float) else C.format_retention(r.keys[k])
                 for k in keys]
        for col in layout["metrics"]:
            ours, paper = _num(r.ours.get(col)), _num((r.paper or {}).get(col))
            d = _diff(ours, paper)
            text = f"{_fmt(ours, col)} / {_fmt(paper, col)}"
            if d is not None:
                text += f" ({d:+.1f})" if not col.startswith("tokens") else f" ({d:+.0f})"
            cells.append(text)
        failed = _failed(r)
        cells.append(r.status + (f" ({failed} failed requests)" if failed else ""))
        lines.append("| " + " | ".join(cells) + " |")
    done = sum(r.status == "finished" for r in rows)
    planned = sum(r.status == NOT_IMPLEMENTED for r in rows)
    lines += ["", f"{done}/{len(rows)} cells finished" + (f", {planned} {NOT_IMPLEMENTED} (method planned: "
                                                          "configs/method/<method>.yaml)." if planned else ".")]
    with_failures = [r for r in rows if _failed(r)]
    if with_failures:
        lines.append(f"{len(with_failures)} finished cell(s) had requests whose video could not be used (answered '', "
                     "scored as wrong): see `failures` in their summary.json.")
    if table == 4:
        lines.append("Stage columns sum the method's trace.stage_times keys listed in configs/sweep/table4.yaml "
                     "(stage_columns); LLM forward = the engine's `forward` stage (LLM prefill from decoder layer 0, "
                     "vision tower excluded, minus the selection overhead), else prefill total - stages.")
    return "\n".join(lines) + "\n"


def plot(table: int, rows: list[Row], path: str | Path) -> Path:
    """Average score against prefill TFLOPs, one series per method (ours filled, paper hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    methods = []
    for r in rows:
        name = C.method_dirname(r.cell.method, r.cell.variant)
        if name not in methods:
            methods.append(name)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = 0
    for k, name in enumerate(methods):
        color = colors[k % len(colors)]
        mine = [r for r in rows if C.method_dirname(r.cell.method, r.cell.variant) == name]
        ours = sorted((r.ours.get("tflops"), r.ours.get("avg_score")) for r in mine if r.status == "finished"
                      and _num(r.ours.get("tflops")) is not None and _num(r.ours.get("avg_score")) is not None)
        paper = sorted((_num((r.paper or {}).get("tflops")), _num((r.paper or {}).get("avg_score"))) for r in mine
                       if _num((r.paper or {}).get("tflops")) is not None and _num((r.paper or {}).get("avg_score")) is not None)
        if ours:
            ax.plot(*zip(*ours), "o-", color=color, label=f"{name} (ours)")
            plotted += 1
        if paper:
            ax.plot(*zip(*paper), "o--", color=color, mfc="none", alpha=0.7, label=f"{name} (paper)")
            plotted += 1
    ax.set_xlabel("prefill TFLOPs (paper convention)")
    ax.set_ylabel("average score")
    ax.set_title(LAYOUTS[table]["title"], fontsize=9)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no cells with TFLOPs and scores yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
