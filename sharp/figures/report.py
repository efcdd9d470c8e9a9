"""One Markdown report of a results folder: Tables 1-5 with their figures, the toy retention curves,
the toy ablation and the figure PNGs, so a sweep's outcome is one file to open (``scripts/report.py``).

The tables come from :mod:`sharp.harness.tables` (``build`` + ``to_markdown``, what
``scripts/make_tables.py`` writes) and their figures from :func:`sharp.figures.tables.plot_table`;
the curves from ``<results>/retention_curve/<backbone>/retention_curve.{md,json}``
(:mod:`sharp.figures.curves`); the toy ablation from ``<results>/ablation/ablation.md``. Images are
linked relative to the report, so the report folder can be moved with its ``figures/``.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from pathlib import Path
from typing import Optional, Sequence, Union

from sharp.figures import curves
from sharp.figures import tables as table_figures


def _demote(markdown: str, levels: int = 1) -> str:
    """Push every Markdown heading ``levels`` deeper (an included file's ``#`` becomes ``##``)."""
    return re.sub(r"^(#+)", lambda m: m.group(1) + "#" * levels, markdown, flags=re.M)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def table_sections(results_dir: Path, out_dir: Path, figures_dir: Path, numbers: Sequence[int]) -> list[str]:
    """Markdown of each table (ours / paper per cell) followed by its figure."""
    from sharp.harness import tables as T
    from sharp.harness.resources import HarnessError

    parts = ["## Paper tables", ""]
    for n in numbers:
        try:
            sweep, rows = T.build(n, results_dir)
        except HarnessError as err:
            parts += [f"### Table {n}", "", f"error: {err}", ""]
            continue
        parts.append(_demote(T.to_markdown(n, sweep, rows, results_dir), 1))
        png = table_figures.plot_table(n, rows, figures_dir / f"table{n}.png")
        what = "average score per variant" if n == 5 else "average score against prefill TFLOPs"
        parts += [f"![Table {n}: {what}]({_rel(png, out_dir)})", ""]
    return parts


def curve_sections(results_dir: Path, out_dir: Path, figures_dir: Path) -> list[str]:
    """The toy retention curves (their Markdown tables) and one figure per backbone."""
    found = curves.find_curves(results_dir)
    parts = ["## Toy retention curves", ""]
    if not found:
        return parts + [f"No `retention_curve/<backbone>/retention_curve.json` under `{results_dir}` "
                        "(`python scripts/retention_curve.py --backbone toy_llava_onevision`).", ""]
    for backbone, path in found.items():
        rows, info = curves.load_curve(path)
        png = curves.plot_retention_curve(rows, info, figures_dir / f"retention_curve_{backbone}.png")
        md = path.with_suffix(".md")
        parts.append(_demote(md.read_text(), 2) if md.is_file() else f"### {backbone}\n")
        parts += [f"![{backbone}: accuracy against retention and TFLOPs]({_rel(png, out_dir)})", ""]
    return parts


def ablation_section(results_dir: Path) -> list[str]:
    path = results_dir / "ablation" / "ablation.md"
    if not path.is_file():
        return []
    return ["## Toy ablation (Table 5 in the toy world)", "", _demote(path.read_text(), 2), ""]


def figure_sections(folders: Sequence[Path], out_dir: Path, skip: Path) -> list[str]:
    """Every PNG of ``folders`` (but the report's own figures), with its file name as caption."""
    parts = []
    for folder in folders:
        if not folder.is_dir():
            continue
        pngs = sorted(p for p in folder.glob("*.png") if p.resolve().parent != skip.resolve())
        if not pngs:
            continue
        parts += [f"## Figures in `{folder}`", ""]
        for p in pngs:
            parts += [f"### {p.stem}", "", f"![{p.stem}]({_rel(p, out_dir)})", ""]
    return parts


def build_report(results_dir: Union[str, Path], out: Union[str, Path], figures: Sequence[Union[str, Path]] = (),
                 tables: Sequence[int] = (1, 2, 3, 4, 5)) -> Path:
    """Write the report Markdown to ``out`` (its figures into ``<out folder>/figures/``); returns ``out``."""
    results_dir, out = Path(results_dir), Path(out)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {str(results_dir)!r} does not exist")
    if out.suffix.lower() != ".md":
        raise ValueError(f"report path {str(out)!r}: expected a .md file name")
    out_dir = out.parent
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"# Results report: `{results_dir}`", "",
             f"Generated {stamp} by `scripts/report.py` at commit `{_commit()}`. Tables: ours / paper (ours - paper) "
             "per cell, `—` = not run yet; figures: ours filled, the paper's hollow.", ""]
    parts += table_sections(results_dir, out_dir, figures_dir, tables)
    parts += curve_sections(results_dir, out_dir, figures_dir)
    parts += ablation_section(results_dir)
    parts += figure_sections([Path(f) for f in figures], out_dir, figures_dir)
    from sharp.harness.io import atomic_write_text

    atomic_write_text(str(out), "\n".join(parts).rstrip() + "\n")
    return out


def default_out(results_dir: Union[str, Path]) -> Path:
    return Path(results_dir) / "report" / "report.md"


def default_figures(results_dir: Union[str, Path], repo: Optional[Path] = None) -> list[Path]:
    """The figure folders a report shows by default: ``<results>/figures`` and the README's ``docs/figures``."""
    repo = repo or Path(__file__).resolve().parents[2]
    return [Path(results_dir) / "figures", repo / "docs" / "figures"]
