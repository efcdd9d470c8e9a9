#!/usr/bin/env python
"""One Markdown report of a results folder: Tables 1-5 (ours beside the paper's, with their figures),
the toy retention curves, the toy ablation and the figures, so a sweep's outcome is one file to open.

    python scripts/report.py                                   # results/ -> results/report/report.md
    python scripts/report.py --results-dir /path/to/results --out /tmp/report/report.md
    python scripts/report.py --figures docs/figures results/figures --tables 1 2

Tables: the same Markdown as ``scripts/make_tables.py`` (cells of configs/sweep/tableN.yaml);
figures of the tables and curves go to ``<report folder>/figures/``; the PNGs of the ``--figures``
folders (default: ``<results>/figures`` and ``docs/figures``) are linked at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sharp.figures import report  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="results", help="results root (default: results)")
    ap.add_argument("--out", default=None, help="report .md path (default: <results-dir>/report/report.md)")
    ap.add_argument("--figures", nargs="*", default=None,
                    help="folders whose PNGs are shown (default: <results-dir>/figures, docs/figures)")
    ap.add_argument("--tables", nargs="*", type=int, default=[1, 2, 3, 4, 5], help="table numbers (1..5)")
    args = ap.parse_args(argv)
    bad = [n for n in args.tables if n not in (1, 2, 3, 4, 5)]
    if bad:
        print(f"error: --tables {' '.join(map(str, bad))}: accepted values: 1 2 3 4 5", file=sys.stderr)
        return 2
    if not Path(args.results_dir).is_dir():
        print(f"error: --results-dir {args.results_dir!r} does not exist", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else report.default_out(args.results_dir)
    if out.suffix.lower() != ".md":
        print(f"error: --out {str(out)!r}: expected a .md file name", file=sys.stderr)
        return 2
    figures = args.figures if args.figures is not None else report.default_figures(args.results_dir, REPO)
    path = report.build_report(args.results_dir, out, figures=figures, tables=args.tables)
    print(f"wrote {path} (figures in {path.parent / 'figures'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
