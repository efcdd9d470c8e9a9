"""The few lines ``run.py`` prints at the end of a cell: scores, tokens, cost, failures, where it is
(an example is in results/README.md). Everything comes from the cell's summary.json (:func:`format_report`), so a skipped (finished)
cell prints the same table as the run that made it.
"""
from __future__ import annotations

from typing import Optional

from sharp.harness.benchmarks import BENCHMARKS, VIDEOMME_DURATIONS
from sharp.harness.cells import format_retention

_SUB = "accuracy_"  # per-question-type metrics of the synthetic task: accuracy_<qtype>,none
MAX_LISTED_FAILURES = 5


def _num(value, fmt: str = "{:.1f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _question_types(metrics: dict) -> list[tuple[str, float]]:
    """(question type, score) of a task reporting ``accuracy_<type>,none`` (the synthetic benchmark)."""
    out = []
    for key, value in metrics.items():
        name = key.split(",")[0]
        if name.startswith(_SUB) and "stderr" not in name and isinstance(value, (int, float)):
            out.append((name[len(_SUB):], float(value)))
    return sorted(out)  # a fixed order whatever the order lmms-eval gathered the metrics in


def _tflops(value) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.3g}" if value < 100 else f"{value:.1f}"


def format_report(summary: dict, path: Optional[str] = None) -> str:
    """A small plain-text table of one finished cell."""
    cell = summary.get("cell") or {}
    scores = summary.get("scores") or {}
    metrics = summary.get("metrics") or {}
    per_task = summary.get("per_task") or {}
    retention = cell.get("retention")
    shown = format_retention(retention) if isinstance(retention, (int, float)) else retention
    lines = [f"== {cell.get('backbone')} / {cell.get('method')} / retention {shown} =="]
    tasks = list(per_task) or list(scores)
    width = max([len(t) for t in tasks] + [22])
    lines.append(f"{'task':<{width}}  {'score':>6}  {'requests':>8}  {'failed':>6}")
    for task in tasks:
        block = per_task.get(task) or {}
        bench = BENCHMARKS.get(task)
        column = bench.column if bench else task
        line = (f"{task:<{width}}  {_num(scores.get(column)):>6}  {_num(block.get('requests'), '{:d}'):>8}  "
                f"{_num(block.get('failed_requests'), '{:d}'):>6}")
        details = _question_types(metrics.get(task) or {})
        if column == "videomme":
            details = [(d, scores[f"videomme_{d}"]) for d in VIDEOMME_DURATIONS if f"videomme_{d}" in scores]
        if details:
            line += "   (" + ", ".join(f"{name} {value:.1f}" for name, value in details) + ")"
        lines.append(line)
    if summary.get("avg_score") is not None:
        lines.append(f"{'average (4 benchmarks)':<{width}}  {_num(summary['avg_score']):>6}")
    tokens = summary.get("tokens") or {}
    before, after = tokens.get("visual_before"), tokens.get("visual_after")
    kept = f"{_num(after, '{:.0f}')} of {_num(before, '{:.0f}')}"
    if isinstance(tokens.get("retention_measured"), (int, float)):
        kept += f" ({100 * tokens['retention_measured']:.1f}%)"
    lat = summary.get("latency_ms") or {}
    run = summary.get("run") or {}
    batch = run.get("batch_size", 1)
    lines += [
        f"visual tokens kept  {kept} per request (mean)",
        f"prefill TFLOPs      {_tflops((summary.get('tflops') or {}).get('prefill_mean'))} per request (paper convention), "
        f"{_tflops((summary.get('tflops') or {}).get('exact_sequence_mean'))} (exact, every row)",
        f"prefill ms          {_num(lat.get('prefill_mean'))} mean, {_num(lat.get('prefill_median'))} median"
        + (f" (per batch of up to {batch})" if batch and batch > 1 else ""),
    ]
    thr = summary.get("throughput") or {}
    if isinstance(thr.get("requests_per_s"), (int, float)):
        n = run.get("num_processes", 1)
        lines.append(f"throughput          {thr['requests_per_s']:.2f} requests/s (batch {batch}, "
                     f"{n} process{'es' if n != 1 else ''})")
    failed, total = summary.get("failed_requests") or 0, summary.get("requests") or 0
    lines.append(f"failed requests     {failed} of {total}" + (" (answered '', scored as wrong)" if failed else ""))
    for f in (summary.get("failures") or [])[:MAX_LISTED_FAILURES]:
        lines.append(f"  {f.get('task')} doc {f.get('doc_id')}: {f.get('reason')}")
    if failed > MAX_LISTED_FAILURES:
        lines.append(f"  ... {failed - MAX_LISTED_FAILURES} more in requests.jsonl ('failed')")
    if path:
        lines.append(f"summary             {path}")
    return "\n".join(lines)
