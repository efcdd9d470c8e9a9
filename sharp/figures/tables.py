"""The harness tables as figures (``scripts/make_tables.py --plot``).

Tables 1-4: the table's average score against prefill TFLOPs, one colour and marker per method;
our finished cells filled and joined by a solid line, the paper's numbers hollow and dashed, so
both are read against the same axes. Table 5 (ablation at one retention, no TFLOPs axis): the
average score per variant, ours beside the paper's. Rows come from
:func:`sharp.harness.tables.build` (``Row.ours``, ``Row.paper``, ``Row.status``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from sharp.figures import style


def _num(value: Any) -> Optional[float]:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _method_of(row) -> str:
    from sharp.harness import cells as C

    return C.method_dirname(row.cell.method, row.cell.variant)


def _points(rows, source: str) -> list[tuple[float, float]]:
    """(TFLOPs, avg score) of the rows that have both: ours (finished cells) or the paper's."""
    out = []
    for r in rows:
        values = r.ours if source == "ours" else (r.paper or {})
        if source == "ours" and r.status != "finished":
            continue
        tf, avg = _num(values.get("tflops")), _num(values.get("avg_score"))
        if tf is not None and avg is not None:
            out.append((tf, avg))
    return sorted(out)


def _style_of(name: str) -> dict:
    base = name.split("-")[0]  # "sharp-posc" (a Table 5 variant folder) keeps ShaRP's colour family
    return style.method_style(name if name in _registered() else base)


def _registered() -> list[str]:
    from sharp.methods import method_names

    return method_names()


def _avg_label(table: int) -> str:
    from sharp.harness.tables import LAYOUTS

    bench = LAYOUTS[table]["avg"]
    return f"average score (%)\nmean of {', '.join(bench)}"


def plot_table(table: int, rows: Sequence, path: Union[str, Path]) -> Path:
    """Write table ``table``'s figure (see the module docstring) to the PNG ``path``."""
    if table == 5:
        return _plot_ablation(rows, path)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from sharp.harness.tables import LAYOUTS

    methods = list(dict.fromkeys(_method_of(r) for r in rows))
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    handles, plotted = [], 0
    for name in methods:
        mine = [r for r in rows if _method_of(r) == name]
        st = _style_of(name)
        ours, paper = _points(mine, "ours"), _points(mine, "paper")
        if ours:
            ax.plot(*zip(*ours), linestyle="-", marker=st["marker"], color=st["color"], linewidth=st["linewidth"],
                    markersize=9 if st["marker"] == "*" else 7)
        if paper:
            ax.plot(*zip(*paper), linestyle="--", marker=st["marker"], color=st["color"], markerfacecolor="none",
                    linewidth=1.0, markersize=9 if st["marker"] == "*" else 7, alpha=0.85)
        if ours or paper:
            plotted += 1
            handles.append(Line2D([], [], color=st["color"], marker=st["marker"], linestyle="-", label=name))
    tflops = [tf for r in rows for tf in (_num(r.ours.get("tflops")), _num((r.paper or {}).get("tflops")))
              if tf is not None]
    log = bool(tflops) and min(tflops) > 0 and max(tflops) / min(tflops) > 4
    if log:  # vanilla's 40 TFLOPs beside pruned 5-10: a log axis keeps the pruned points apart
        ax.set_xscale("log")
        _plain_log_ticks(ax, tflops)
    elif tflops:
        ax.set_xlim(min(tflops) - 1, max(tflops) + 1)
    ax.set_xlabel("prefill TFLOPs per request (paper convention" + ("; log scale)" if log else ")"))
    ax.set_ylabel(_avg_label(table))
    ax.set_title(LAYOUTS[table]["title"], fontsize=9)
    ax.grid(alpha=0.3)
    if plotted:
        methods_legend = ax.legend(handles=handles, title="method", fontsize=7.5, title_fontsize=8,
                                   loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.add_artist(methods_legend)
        kinds = [Line2D([], [], color="black", marker="o", linestyle="-", label="ours (finished cells)"),
                 Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="--", label="paper")]
        ax.legend(handles=kinds, fontsize=7.5, loc="lower left", bbox_to_anchor=(1.01, 0.0), frameon=False)
    else:
        ax.text(0.5, 0.5, "no cells with TFLOPs and scores yet", ha="center", va="center", transform=ax.transAxes)
    fig.subplots_adjust(left=0.11, right=0.76, bottom=0.12, top=0.92)
    return style.save(fig, path, dpi=120)


def _plain_log_ticks(ax, values: Sequence[float]) -> None:
    """Readable ticks (1, 2, 3, 5 x 10^k) on a log axis spanning ``values``."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    if not values:
        return
    lo, hi = min(values) / 1.4, max(values) * 1.25
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 3, 5) if lo <= m * 10.0 ** e <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)


def _plot_ablation(rows: Sequence, path: Union[str, Path]) -> Path:
    """Table 5: average score per ShaRP variant, ours (filled) beside the paper's (hollow)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from sharp.harness.tables import LAYOUTS

    names = [str(r.keys.get("variant")) for r in rows]
    ours = [(_num(r.ours.get("avg_score")) if r.status == "finished" else None) for r in rows]
    paper = [_num((r.paper or {}).get("avg_score")) for r in rows]
    y = np.arange(len(rows))
    colour = style.method_style("sharp")["color"]
    fig, ax = plt.subplots(figsize=(7.6, 0.5 * len(rows) + 1.6))
    ax.barh(y - 0.2, [v or 0 for v in ours], height=0.38, color=colour, label="ours (finished cells)")
    ax.barh(y + 0.2, [v or 0 for v in paper], height=0.38, color="white", edgecolor=colour, hatch="//",
            label="paper")
    values = [v for v in ours + paper if v is not None]
    lo = max(0.0, min(values) - 5) if values else 0.0
    ax.set_xlim(lo, (max(values) + 2.5) if values else 100.0)
    for yi, v in zip(y, ours):
        ax.text(v + 0.2 if v is not None else lo + 0.2, yi - 0.2, f"{v:.1f}" if v is not None else "ours: not run yet",
                va="center", fontsize=7)
    for yi, v in zip(y, paper):
        if v is not None:
            ax.text(v + 0.2, yi + 0.2, f"{v:.1f}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(_avg_label(5))
    ax.set_title(LAYOUTS[5]["title"], fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.subplots_adjust(left=0.16, right=0.74, bottom=0.2, top=0.9)
    return style.save(fig, path, dpi=120)
