"""The toy retention curves (``scripts/retention_curve.py``'s ``retention_curve.json``) as one figure per
backbone: accuracy against retention and against prefill TFLOPs, every method of the file, the
unpruned model (vanilla) and chance as reference lines; each curve ends at the unpruned model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from sharp.figures import style

CHANCE = 25.0  # four options


def load_curve(path: Union[str, Path]) -> tuple[list[dict], dict]:
    """(rows, info) of a ``retention_curve.json``."""
    blob = json.loads(Path(path).read_text())
    return blob["rows"], blob["info"]


def find_curves(results_dir: Union[str, Path]) -> dict[str, Path]:
    """backbone -> its ``retention_curve/<backbone>/retention_curve.json`` under ``results_dir``."""
    root = Path(results_dir) / "retention_curve"
    if not root.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(root.glob("*/retention_curve.json"))}


def plot_retention_curve(rows: list[dict], info: dict, path: Union[str, Path]) -> Path:
    """Accuracy vs retention (log axis) and vs prefill MFLOPs (TFLOPs x 1e6) of every method."""
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    vanilla = next((r for r in ok if r["method"] == "vanilla"), None)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "vanilla"]
    fig, axes = plt.subplots(1, 2, figsize=(13.0, 4.8))
    for m in methods:
        pts = sorted((r for r in ok if r["method"] == m), key=lambda r: r["retention"])
        if not pts:
            continue
        if vanilla is not None:
            pts = pts + [vanilla]
        st = style.method_style(m)
        kw = dict(marker=st["marker"], color=st["color"], linewidth=st["linewidth"], label=m,
                  markersize=9 if st["marker"] == "*" else 6)
        axes[0].plot([r["retention"] for r in pts], [r["accuracy"] for r in pts], **kw)
        axes[1].plot([r["tflops"] * 1e6 for r in pts], [r["accuracy"] for r in pts], **kw)
    for ax in axes:
        ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1, label="chance (25%)")
        if vanilla is not None:
            ax.axhline(vanilla["accuracy"], color="black", linestyle="--", linewidth=1,
                       label=f"vanilla ({vanilla['accuracy']:.1f}%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(min([CHANCE] + [r["accuracy"] for r in ok]) - 5, 102)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    ticks = sorted({float(r["retention"]) for r in ok})
    axes[0].set_xticks(ticks)
    axes[0].set_xticklabels([f"{t:g}" for t in ticks])
    axes[0].minorticks_off()
    axes[0].set_xlabel("retention (kept share of the visual tokens; log scale)")
    axes[1].set_xlabel("prefill MFLOPs of the video tokens (TFLOPs x 1e6, paper convention)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.855, 0.9), fontsize=8, frameon=False)
    fig.suptitle(f"{info.get('backbone', '?')}: synthetic {info.get('split', '?')} split ({info.get('n', '?')} docs, "
                 f"{info.get('n_visual', '?')} visual tokens per video)", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.84, bottom=0.12, top=0.9, wspace=0.22)
    return style.save(fig, path, dpi=110)


def plot_retention_curves(results_dir: Union[str, Path], out_dir: Union[str, Path]) -> list[Path]:
    """``<out_dir>/retention_curve_<backbone>.png`` for every curve found under ``results_dir``."""
    written = []
    for backbone, path in find_curves(results_dir).items():
        rows, info = load_curve(path)
        written.append(plot_retention_curve(rows, info, Path(out_dir) / f"retention_curve_{backbone}.png"))
    return written
